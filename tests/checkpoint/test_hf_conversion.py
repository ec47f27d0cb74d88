"""Hugging Face <-> megamoe conversion against transformers itself.

Import: a tiny random HF model of each family (every weight random, norms and the router bias
included, so a misplaced or unpermuted tensor shows), saved by transformers in several shards,
imported, loaded with ``load_checkpoint`` as ``--load`` does; its logits match transformers' on
the same tokens. Export: a random megamoe model of each preset, saved as a checkpoint,
exported; transformers loads it and its logits match megamoe's. Both in float32, to 2e-5 on
logits of magnitude about 1 (measured differences are 1e-7 to 1e-6: summation order only).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megamoe.checkpoint.hf.config_map import ConversionError  # noqa: E402
from megamoe.checkpoint.hf.convert import export_hf, import_hf, plan_import  # noqa: E402
from megamoe.cli import config_from_values, load_yaml_values  # noqa: E402
from megamoe.config_validation import validate  # noqa: E402
from megamoe.parallel.state import ParallelState  # noqa: E402
from megamoe.testing.presets import preset  # noqa: E402
from megamoe.testing.scripts import run_script
from megamoe.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megamoe.training.train import build_model, build_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
ATOL = 2e-5
VOCAB = 256

_DEEPSEEK = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
                 qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=64)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1)
HF_MODELS = {
    # V2-Lite: no query LoRA, greedy softmax routing without renormalisation, YaRN with mscale 0.707
    "deepseek_v2_lite": ("DeepseekV2", dict(_DEEPSEEK, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
                                            n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0,
                                            rope_scaling=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    # V2: query LoRA, group-limited routing, scaled probabilities, plain RoPE
    "deepseek_v2": ("DeepseekV2", dict(_DEEPSEEK, q_lora_rank=32, n_routed_experts=8, num_experts_per_tok=2,
                                       n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                       routed_scaling_factor=16.0)),
    "deepseek_v3": ("DeepseekV3", dict(_DEEPSEEK, q_lora_rank=32, n_routed_experts=16, num_experts_per_tok=4,
                                       n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                       rope_scaling=dict(_YARN, mscale=1.0, mscale_all_dim=1.0))),
    # Kimi K2: DeepSeek-V3's architecture with one expert group (its config says model_type kimi_k2)
    "kimi_k2": ("DeepseekV3", dict(_DEEPSEEK, q_lora_rank=32, n_routed_experts=16, num_experts_per_tok=4,
                                   n_shared_experts=1, n_group=1, topk_group=1, routed_scaling_factor=2.827)),
    # Mixtral with linear RoPE scaling: positions halved (--rotary-seq-len-interpolation-factor 2)
    "mixtral": ("Mixtral", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2, max_position_embeddings=64, rope_theta=1e6,
                                rope_scaling=dict(rope_type="linear", factor=2.0))),
    # Qwen3: QK-norm, a dense first layer, renormalised top-k, tied embeddings
    "qwen3_moe": ("Qwen3Moe", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=80, moe_intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0],
                                   tie_word_embeddings=True, max_position_embeddings=64)),
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and floating buffer random (norm weights around 1), so no tensor is
    left at a value that would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point() or "rope" in name or "rotary" in name or "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                t.copy_(1.0 + 0.3 * noise)
            elif "bias" in name:
                t.copy_(0.1 * noise)
            else:
                t.copy_(0.08 * noise)


def _hf_model(kind: str, seed: int = 0):
    cls, kwargs = HF_MODELS[kind]
    config = getattr(transformers, f"{cls}Config")(**kwargs)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    _randomize(model, seed)
    return model


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


def _load_imported(out: str):
    """What ``--config OUT/megamoe.yaml --load OUT`` builds, in float32 on one process."""
    cfg = config_from_values(load_yaml_values(os.path.join(out, "megamoe.yaml")))
    validate(cfg, 1)
    state = ParallelState.single()
    model = build_model(cfg, state, CPU, dtype=torch.float32)
    loaded = load_checkpoint(out, model, build_optimizer(model, cfg, state), state, cfg, None, CPU)
    assert loaded is not None and loaded.iteration == 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """Each family's tiny HF model, saved by transformers in several shards (with the index)."""
    saved = {}
    for kind in HF_MODELS:
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(kind) / "hf"
        model.save_pretrained(path, max_shard_size="200KB")
        if kind == "kimi_k2":  # Kimi K2 publishes DeepSeek-V3's architecture under its own model_type
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
        with torch.no_grad():
            saved[kind] = (str(path), model(_tokens()).logits)
    return saved


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_an_imported_model_computes_transformers_logits(kind, hf_saved, tmp_path):
    path, want = hf_saved[kind]
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))  # several shards were read
    out = import_hf(path, str(tmp_path / "mm"), quiet=True)
    with torch.no_grad():
        got = _load_imported(out).logits(_tokens())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _randomized_megamoe(name: str, seed: int = 3):
    cfg = preset(name.split(":")[0])
    cfg.model.seq_length = 24
    cfg.model.untie_embeddings_and_output_weights = not name.endswith(":tied")
    if name.endswith(":interpolated"):
        cfg.model.rotary_seq_len_interpolation_factor = 4.0
    state = ParallelState.single()
    model = build_model(cfg, state, CPU, dtype=torch.float32)
    _randomize(model, seed)
    return cfg, state, model.eval()


@pytest.mark.parametrize("name", ["tiny_deepseek_v2_lite", "tiny_deepseek_v3", "tiny_kimi_k2", "tiny_mixtral",
                                  "tiny_mixtral:interpolated", "tiny_qwen3_moe", "tiny_qwen3_moe:tied"])
def test_an_exported_model_computes_megamoe_logits_in_transformers(name, tmp_path):
    cfg, state, model = _randomized_megamoe(name)
    save_checkpoint(str(tmp_path / "ckpt"), 7, model, build_optimizer(model, cfg, state), state, cfg, 0, None, CPU)
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype=torch.float32, max_shard_bytes=150_000,
                    quiet=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_tokens()).logits, model.logits(_tokens()), atol=ATOL, rtol=0)


def _save_in_layout(directory: str) -> None:
    """DeepSeek-V3's tiny preset saved by EP 2 x TP 2 ranks (each writes its own pieces)."""
    cfg = preset("tiny_deepseek_v3")
    cfg.model.seq_length = 24
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.expert_model_parallel_size = 2, 2
    cfg.moe.moe_token_dispatcher_type = "alltoall"
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build_model(cfg, state, CPU, dtype=torch.float32)
    save_checkpoint(directory, 1, model, build_optimizer(model, cfg, state), state, cfg, 0, None, CPU)


def test_a_checkpoint_saved_by_four_ranks_exports(workers, tmp_path):
    workers(4).run(_save_in_layout, str(tmp_path / "ckpt"))
    out = export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype=torch.float32, max_shard_bytes=100_000,
                    quiet=True)
    cfg = preset("tiny_deepseek_v3")
    cfg.model.seq_length = 24
    reference = build_model(cfg, ParallelState.single(), CPU, dtype=torch.float32).eval()  # same seed, one process
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_tokens()).logits, reference.logits(_tokens()), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3's MTP layers and FP8 weights


def _copy_hf(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _add_tensors(path: Path, tensors: dict[str, torch.Tensor], file: str = "extra.safetensors") -> None:
    """Add a shard with ``tensors`` and name it in the index."""
    safetensors_torch.save_file(tensors, str(path / file))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: file for name in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(file)))
    return out


def _global(model, name: str) -> torch.Tensor:
    return dict(list(model.named_parameters()) + list(model.named_buffers()))[name].detach()


def _box(model, m) -> torch.Tensor:
    t = _global(model, m.name)
    return t[tuple(slice(o, o + b) for o, b in zip(m.offsets, m.box))].reshape(m.shape)


def test_mtp_layers_import_when_asked_and_export_back(hf_saved, tmp_path):
    path = _copy_hf(hf_saved["deepseek_v3"][0], tmp_path / "hf")
    hf = _all_tensors(path)
    g = torch.Generator().manual_seed(5)
    # DeepSeek-V3 stores MTP depth 1 as layer 3 (after the 3 decoder layers): a decoder layer
    # plus enorm, hnorm, eh_proj, shared_head and copies of the embedding and head
    mtp = {k.replace("model.layers.2.", "model.layers.3."): 0.05 * torch.randn(v.shape, generator=g)
           for k, v in hf.items() if k.startswith("model.layers.2.")}
    mtp.update({f"model.layers.3.{n}.weight": 1 + 0.3 * torch.randn(64, generator=g) for n in ("enorm", "hnorm")})
    mtp["model.layers.3.shared_head.norm.weight"] = 1 + 0.3 * torch.randn(64, generator=g)
    mtp["model.layers.3.eh_proj.weight"] = 0.05 * torch.randn(64, 128, generator=g)
    mtp["model.layers.3.embed_tokens.weight"] = hf["model.embed_tokens.weight"].clone()
    mtp["model.layers.3.shared_head.head.weight"] = hf["lm_head.weight"].clone()
    _add_tensors(path, mtp)

    skipped = plan_import(str(path)).skipped  # not asked for: left out
    assert sorted(skipped) == sorted(mtp)
    with pytest.raises(ConversionError, match="--mtp-num-layers 2: the checkpoint has 1 MTP layers"):
        plan_import(str(path), mtp_num_layers=2)
    plan = plan_import(str(path), mtp_num_layers=1)
    out = import_hf(str(path), str(tmp_path / "mm"), mtp_num_layers=1, quiet=True)
    model = _load_imported(out)
    mtp_maps = [m for m in plan.maps if m.hf.startswith("model.layers.3.")]
    assert len(mtp_maps) == len(mtp) - 2  # all but the embedding and head copies
    for m in mtp_maps:
        assert m.name.startswith("mtp.0.")
        torch.testing.assert_close(_box(model, m), mtp[m.hf], atol=0, rtol=0, msg=m.hf)

    cfg = config_from_values(load_yaml_values(os.path.join(out, "megamoe.yaml")))
    assert cfg.model.mtp_num_layers == 1
    back = _all_tensors(Path(export_hf(out, str(tmp_path / "back"), dtype=torch.float32, quiet=True)))
    assert set(back) == set(hf) | set(mtp)
    for name, t in {**hf, **mtp}.items():
        torch.testing.assert_close(back[name], t, atol=0, rtol=0, msg=name)


def _quantize_blockwise(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's published layout: float8_e4m3fn weights, one float32 ``scale_inv`` per block."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block), -(-cols // block))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_a_directory_without_an_index_imports(hf_saved, tmp_path):
    """One ``model.safetensors`` and no index, as transformers saves a small model."""
    path = _copy_hf(hf_saved["mixtral"][0], tmp_path / "hf")
    tensors = _all_tensors(path)
    for file in path.glob("*.safetensors"):
        file.unlink()
    (path / "model.safetensors.index.json").unlink()
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    out = import_hf(str(path), str(tmp_path / "mm"), quiet=True)
    with torch.no_grad():
        torch.testing.assert_close(_load_imported(out).logits(_tokens()), hf_saved["mixtral"][1], atol=ATOL, rtol=0)


def test_fp8_block_scaled_weights_are_dequantized_on_import(hf_saved, tmp_path):
    path = _copy_hf(hf_saved["deepseek_v3"][0], tmp_path / "hf")
    block = 16  # smaller than the published 128 so the tiny weights hold several blocks, some partial
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config))
    want = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = safetensors_torch.load_file(str(file))
        for name in list(tensors):
            if name.endswith("proj.weight"):  # as published: norms, router, embedding and head stay bf16/fp32
                q, scale = _quantize_blockwise(tensors[name], block)
                tensors[name], tensors[name + "_scale_inv"] = q, scale
                # the reference dequantization, element by element from its block's scale
                rows = torch.arange(q.shape[0])[:, None] // block
                cols = torch.arange(q.shape[1])[None, :] // block
                want[name] = q.float() * scale[rows, cols]
        safetensors_torch.save_file(tensors, str(file))
        index = json.loads((path / "model.safetensors.index.json").read_text())
        index["weight_map"].update({n: file.name for n in tensors})
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(want) > 40
    plan = plan_import(str(path))
    out = import_hf(str(path), str(tmp_path / "mm"), dtype=torch.float32, quiet=True)
    model = _load_imported(out)
    for m in plan.maps:
        if m.hf in want:
            torch.testing.assert_close(_box(model, m), want[m.hf], atol=0, rtol=0, msg=m.hf)


# ---------------------------------------------------------------------------------------------
# the tool: refusals, atomic output, dry run, and a training run from an import


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _rewrite_shards(path: Path, edit) -> None:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for file in sorted(path.glob("*.safetensors")):
        tensors = edit(safetensors_torch.load_file(str(file)))
        safetensors_torch.save_file(tensors, str(file))
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name}
        index["weight_map"].update({k: file.name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_models_that_would_convert_wrongly_are_refused_naming_the_cause(hf_saved, tmp_path):
    def case(kind: str, name: str, config=None, shards=None) -> Path:
        path = _copy_hf(hf_saved[kind][0], tmp_path / name)
        if config:
            _edit_config(path, **config)
        if shards:
            _rewrite_shards(path, shards)
        return path

    expert = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    cases = [
        (case("mixtral", "llama", {"model_type": "llama"}), "model_type 'llama' is not supported"),
        (case("mixtral", "missing", shards=lambda t: {k: v for k, v in t.items() if k != expert}),
         f"tensor {expert} is missing"),
        (case("mixtral", "shape", {"intermediate_size": 40}),
         "tensor model.layers.0.block_sparse_moe.experts.0.w1.weight is [48, 64] in the weights, [40, 64] from "
         "config.json"),
        (case("mixtral", "extra", shards=lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
         "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
        (case("deepseek_v3", "norm", {"norm_topk_prob": False}), "norm_topk_prob is false with the sigmoid router"),
        (case("mixtral", "window", {"sliding_window": 4096}), "sliding-window attention is on"),
        (case("qwen3_moe", "act", {"hidden_act": "gelu"}), "hidden_act 'gelu'"),
    ]
    for path, message in cases:
        with pytest.raises(ConversionError) as err:
            import_hf(str(path), str(tmp_path / f"out-{path.name}"), quiet=True)
        assert message in str(err.value) and "\n" not in str(err.value), (path.name, str(err.value))
        assert not os.path.exists(tmp_path / f"out-{path.name}")


@pytest.mark.parametrize("change, message", [
    ({"moe_router_score_function": "sigmoid"}, "--moe-router-score-function sigmoid: qwen3_moe in transformers"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 2}, "--moe-router-num-groups: qwen3_moe"),
    ({"normalization": "LayerNorm"}, "the model is not RMSNorm + SwiGLU: qwen3_moe"),
])
def test_megamoe_models_transformers_cannot_express_are_not_exported(change, message, tmp_path):
    from megamoe.checkpoint.hf.config_map import family_of_config, hf_config
    from megamoe.model.args import gpt_args

    cfg = preset("tiny_qwen3_moe")
    for name, value in change.items():
        setattr(cfg.model if hasattr(cfg.model, name) else cfg.moe, name, value)
    with pytest.raises(ConversionError, match=message.replace("+", r"\+")):
        hf_config(cfg, gpt_args(cfg), family_of_config(cfg))


def test_a_failed_import_leaves_no_output(hf_saved, tmp_path, monkeypatch):
    import threading

    from megamoe.checkpoint.hf import safetensors_io

    calls = []
    real = safetensors_io.HFReader.read

    def dies_midway(self, name):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("disk read error")
        return real(self, name)

    monkeypatch.setattr(safetensors_io.HFReader, "read", dies_midway)
    out = tmp_path / "mm"
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # DCP's writer thread's own report
    with pytest.raises(Exception, match="disk read error|pieces were not written"):
        import_hf(hf_saved["mixtral"][0], str(out), quiet=True)
    assert len(calls) >= 20 and not out.exists() and not Path(str(out) + ".tmp").exists()
    monkeypatch.undo()
    out.mkdir()
    with pytest.raises(ConversionError, match="exists; give a new output directory"):
        import_hf(hf_saved["mixtral"][0], str(out), quiet=True)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return run_script("tools/convert_checkpoint.py", *args, cwd=ROOT, timeout=300)


def test_the_tool_dry_runs_refuses_in_one_line_and_its_import_trains(hf_saved, tmp_path):
    path = hf_saved["qwen3_moe"][0]
    dry = _tool("import", "--hf-dir", path, "--out", str(tmp_path / "mm"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert ("model.layers.1.self_attn.q_proj.weight [128, 64] -> model/layers.1.attn.wq.weight "
            "(RoPE rows half-split -> interleaved)") in dry.stdout
    assert "model.layers.1.mlp.experts.15.up_proj.weight [24, 64] -> model/layers.1.ffn.experts.w13 at [15, 24, 0]" \
        in dry.stdout
    assert "lm_head" not in dry.stdout  # tied: the embedding is the head
    assert "peak memory about" in dry.stdout and not (tmp_path / "mm").exists()

    bad = _tool("import", "--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such directory" in bad.stderr

    assert _tool("import", "--hf-dir", path, "--out", str(tmp_path / "mm")).returncode == 0
    run = run_script("pretrain_moe.py", "--config", str(tmp_path / "mm" / "megamoe.yaml"),
                     "--load", str(tmp_path / "mm"), "--seq-length", "16", "--micro-batch-size", "2",
                     "--global-batch-size", "2", "--train-iters", "2", "--eval-iters", "0",
                     "--tensorboard-dir", str(tmp_path / "tb"), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "iteration        2/" in run.stdout + run.stderr


def _imported_loss_in_layout(out: str, tokens: torch.Tensor) -> float:
    """The LM loss sum of ``tokens`` under EP 2 (all-to-all dispatch), loaded with ``--load``."""
    cfg = config_from_values(load_yaml_values(os.path.join(out, "megamoe.yaml")))
    cfg.parallel.expert_model_parallel_size, cfg.moe.moe_token_dispatcher_type = 2, "alltoall"
    cfg.model.seq_length = tokens.shape[1] - 1
    state = ParallelState.build(**cfg.parallel.degrees())
    model = build_model(cfg, state, CPU, dtype=torch.float32)
    load_checkpoint(out, model, build_optimizer(model, cfg, state), state, cfg, None, CPU)
    with torch.no_grad():
        return model.eval()(tokens[:, :-1], tokens[:, 1:]).lm_loss_sum.item()


def test_an_import_loads_under_expert_parallelism(workers, hf_saved, tmp_path):
    out = import_hf(hf_saved["deepseek_v3"][0], str(tmp_path / "mm"), quiet=True)
    tokens = _tokens()
    hf = _hf_model("deepseek_v3")  # the same random weights as the saved model (same seed)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(tokens[:, :-1]).logits.flatten(0, 1), tokens[:, 1:].flatten(),
                                                 reduction="sum").item()
    for got in workers(2).run(_imported_loss_in_layout, out, tokens):
        assert abs(got - want) <= 1e-5 * abs(want), (got, want)
