"""``--pipeline-model-parallel-layout``: Megatron-LM's string that places every layer on a
virtual pipeline stage.

``E`` is the embedding, ``t`` a decoder layer, ``m`` an MTP layer, ``L`` the final norm, head and
loss; ``|`` ends a virtual stage. ``x*n`` repeats a symbol, ``(...)*n`` a group (groups may
contain ``|`` and nest), and commas are only for reading. ``"Et|(tt|)*30mL"`` is DeepSeek-V3 on
PP 8 x VPP 4: 32 virtual stages, the first with the embedding and one layer, the last with the
MTP layer and the head but no decoder layer.

Virtual stage ``v`` runs on pipeline rank ``v % pp`` as its chunk ``v // pp`` (Megatron-LM's
interleaved placement), so the string's length in stages fixes the virtual size. megamoe places
the embedding on the first virtual stage and the head, with the MTP layers, on the last; a stage
may hold no decoder layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megamoe.parallel.pipeline_parallel import ranges_by_rank

SYMBOLS = {"E": "the embedding", "t": "a decoder layer", "m": "an MTP layer", "L": "the head and loss"}


def expand(text: str) -> str:
    """The layout with every repetition written out (``"(tt|)*2L"`` -> ``"tt|tt|L"``)."""
    s = text.replace(",", "").replace(" ", "")
    out, at = _sequence(s, 0)
    if at != len(s):
        raise ValueError(f"unmatched ')' at character {at + 1}")
    return out


def _sequence(s: str, at: int) -> tuple[str, int]:
    out = []
    while at < len(s) and s[at] != ")":
        if s[at] == "(":
            inner, at = _sequence(s, at + 1)
            if at >= len(s) or s[at] != ")":
                raise ValueError("a '(' is never closed")
            at += 1
        elif s[at] in SYMBOLS or s[at] == "|":
            inner, at = s[at], at + 1
        else:
            raise ValueError(f"'{s[at]}' is not a layout symbol (E, t, m, L, |, (...), *N)")
        if at < len(s) and s[at] == "*":
            digits = at + 1
            while digits < len(s) and s[digits].isdigit():
                digits += 1
            if digits == at + 1:
                raise ValueError("'*' needs a count after it")
            inner, at = inner * int(s[at + 1:digits]), digits
        out.append(inner)
    return "".join(out), at


@dataclass(frozen=True)
class PipelineLayout:
    """The virtual stages of a layout string, in virtual-stage order."""

    stages: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "PipelineLayout":
        return cls(tuple(expand(text).split("|")))

    def virtual_size(self, pp: int) -> int:
        if len(self.stages) % pp:
            raise ValueError(f"{len(self.stages)} virtual stages do not divide over {pp} pipeline ranks")
        return len(self.stages) // pp

    def check(self, num_layers: int, mtp_layers: int, pp: int) -> None:
        """ValueError naming the first way the layout does not describe this model on ``pp`` ranks."""
        self.virtual_size(pp)
        joined = "|".join(self.stages)
        for symbol, want in (("E", 1), ("L", 1), ("t", num_layers), ("m", mtp_layers)):
            have = joined.count(symbol)
            if have != want:
                raise ValueError(f"{have} x '{symbol}' ({SYMBOLS[symbol]}) where the model has {want}")
        # the embedding opens the first virtual stage; the MTP layers and the head close the last
        # (megamoe keeps them together); every other symbol is a decoder layer
        last = len(self.stages) - 1
        for v, stage in enumerate(self.stages):
            shape = ("E" if v == 0 else "") + "t*" + ("m*L" if v == last else "")
            if not re.fullmatch(shape, stage):
                where = "the only" if last == 0 else "the first" if v == 0 else "the last" if v == last else "a middle"
                raise ValueError(f"virtual stage {v} is '{stage}': {where} virtual stage must be '{shape}' "
                                 "(E opens the first, decoder layers t, then MTP layers m and L close the last)")

    def ranges(self, pp: int) -> list[list[tuple[int, int]]]:
        """``ranges[rank][chunk]``: the ``[start, end)`` decoder layers of each rank's chunks."""
        self.virtual_size(pp)
        return ranges_by_rank([stage.count("t") for stage in self.stages], pp)
