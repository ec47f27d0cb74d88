"""Functions marked to run eagerly under --compile (megamoe/eager.py): importing megamoe loads no
dynamo, and compiled code still calls a marked function (or method) eagerly, between graphs."""

from __future__ import annotations

import subprocess
import sys

import torch

from megamoe.eager import disable_marked_for_compile, eager_under_compile


def test_importing_megamoe_does_not_load_dynamo():
    code = ("import sys, megamoe.training.train, megamoe.parallel.ring_attention, megamoe.extensions.te, "
            "megamoe.kernels.fp8_gemm; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_compiled_code_calls_a_marked_function_eagerly():
    seen = []

    @eager_under_compile
    def marked(x):
        seen.append(("marked", torch.compiler.is_compiling()))
        return x + 1

    def unmarked(x):
        seen.append(("unmarked", torch.compiler.is_compiling()))
        return x + 1

    class Recorder:
        @eager_under_compile
        def observe(self, x):
            seen.append(("method", torch.compiler.is_compiling()))
            return x * 3

    recorder = Recorder()

    def f(x):
        return marked(x) * 2 + unmarked(x) + recorder.observe(x)

    disable_marked_for_compile()
    x = torch.arange(4.0)
    got = torch.compile(f, backend="eager")(x)
    torch.testing.assert_close(got, (x + 1) * 2 + (x + 1) + x * 3)
    # the unmarked function was traced (it ran while compiling, once); the marked ones ran eagerly
    assert sorted(set(seen)) == [("marked", False), ("method", False), ("unmarked", True)]
