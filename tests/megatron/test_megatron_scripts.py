"""Megatron-LM's own MoE launch flags (megatron_scripts.py) run unchanged and build the model
Megatron builds: the parameter count (computed independently here from the architecture, and
checked against the released checkpoints), the attention kind, the shared experts and the
router. Each also trains a few steps at 2 ranks, with only its sizes shrunk (appended flags win)
and its layout folded onto 2 ranks.

Only placeholders are filled in: data and tokenizer paths. The tokenizers are made here with the
scripts' tokenizer types and the published vocabulary sizes (a sentencepiece word model of 32000
pieces for Mixtral's Llama2Tokenizer; Hugging Face tokenizer.json directories for the others),
so the vocabulary, and Megatron's padding of it (--make-vocab-size-divisible-by 1187 turns
Qwen3's 151669 ids into 151936 rows), comes out as Megatron's would.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megamoe.cli import parse_config
from megamoe.config import ConfigError
from megamoe.config_validation import notices, validate
from megamoe.data.indexed_dataset import IndexedDatasetWriter
from megamoe.data.loader import with_tokenizer_vocab
from megamoe.model.args import gpt_args
from megamoe.model.attention import GroupedQueryAttention
from megamoe.model.gpt import GPTModel
from megamoe.model.mla import MultiHeadLatentAttention
from megamoe.model.norm import RMSNorm
from megamoe.parallel.state import ParallelState
from megamoe.testing import fake_wandb
from megamoe.testing.fake_wandb import FakeWandb
from megamoe.training.schedule import learning_rate, schedule_lengths
from megamoe.training.train import meta_model, train
from megatron_scripts import MODEL_ZOO_PRECISION, script_argv

# ---------------------------------------------------------------------------------------------
# What Megatron builds from each script: the released models' shapes, written out by hand.

SHAPES = {
    "mixtral": dict(vocab=32000, hidden=4096, layers=32, dense_layers=0, attention="gqa", heads=32, kv_heads=8,
                    head_dim=128, qk_norm=False, experts=8, topk=2, expert_ffn=14336, shared_ffn=0,
                    score="softmax", pre_softmax=False, expert_bias=False, published=46_702_792_704),
    "deepseek_v2_lite": dict(vocab=102400, hidden=2048, layers=27, dense_layers=1, dense_ffn=10944, attention="mla",
                             heads=16, q_lora=0, kv_lora=512, qk=128, rope=64, v=128, experts=64, topk=6,
                             expert_ffn=1408, shared_ffn=2816, score="softmax", pre_softmax=True, expert_bias=False,
                             published=15_706_484_224),
    "qwen3_30b_a3b": dict(vocab=151936, hidden=2048, layers=48, dense_layers=0, attention="gqa", heads=32,
                          kv_heads=4, head_dim=128, qk_norm=True, experts=128, topk=8, expert_ffn=768, shared_ffn=0,
                          score="softmax", pre_softmax=False, expert_bias=False, published=30_532_122_624),
    "deepseek_v3": dict(vocab=129280, hidden=7168, layers=61, dense_layers=3, dense_ffn=18432, attention="mla",
                        heads=128, q_lora=1536, kv_lora=512, qk=128, rope=64, v=128, experts=256, topk=8,
                        expert_ffn=2048, shared_ffn=2048, score="sigmoid", pre_softmax=False, expert_bias=True,
                        published=671_026_419_200),
}
# NVIDIA's benchmarking flags build the same models
SHAPES["deepseek_v3_model_zoo"], SHAPES["qwen3_30b_a3b_model_zoo"] = SHAPES["deepseek_v3"], SHAPES["qwen3_30b_a3b"]
# The tokenizers' own vocabularies; Qwen3's is padded to 151936 by the script's divisor.
TOKENIZER_VOCAB = {"mixtral": 32000, "deepseek_v2_lite": 102400, "qwen3_30b_a3b": 151669, "deepseek_v3": 129280,
                   "deepseek_v3_model_zoo": 129280, "qwen3_30b_a3b_model_zoo": 151669}


def independent_parameter_count(s: dict) -> int:
    """Weights of an RMSNorm / SwiGLU / untied-head MoE transformer, from its shape alone."""
    h = s["hidden"]
    if s["attention"] == "gqa":
        d = s["head_dim"]
        attention = h * s["heads"] * d + 2 * h * s["kv_heads"] * d + s["heads"] * d * h
        attention += 2 * d if s["qk_norm"] else 0
    else:  # MLA with its latent norms
        qk = s["qk"] + s["rope"]
        q = h * s["q_lora"] + s["q_lora"] + s["q_lora"] * s["heads"] * qk if s["q_lora"] else h * s["heads"] * qk
        attention = q + h * (s["kv_lora"] + s["rope"]) + s["kv_lora"] + s["kv_lora"] * s["heads"] * (s["qk"] + s["v"])
        attention += s["heads"] * s["v"] * h
    moe = s["experts"] * h + s["experts"] * 3 * h * s["expert_ffn"] + 3 * h * s["shared_ffn"]
    moe += s["experts"] if s["expert_bias"] else 0  # DeepSeek-V3 releases the routing bias as a weight
    dense = 3 * h * s.get("dense_ffn", 0)
    layers = s["layers"] * (2 * h + attention) + s["dense_layers"] * dense + (s["layers"] - s["dense_layers"]) * moe
    return 2 * s["vocab"] * h + h + layers


# ---------------------------------------------------------------------------------------------
# Tokenizers and data


def _sentencepiece_words(path: Path, vocab: int) -> str:
    """A sentencepiece word model with exactly ``vocab`` pieces (3 specials + words)."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(vocab + 1000)]
    lines = []
    for _ in range(3):  # every word three times, in random lines of 20
        order = rng.permutation(len(words))
        lines += [" ".join(words[j] for j in order[i:i + 20]) for i in range(0, len(words), 20)]
    (path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(path / "corpus.txt"), model_prefix=str(path / "llama2"), vocab_size=vocab,
                                   model_type="word", num_threads=1, minloglevel=2)
    return str(path / "llama2.model")


def _hugging_face_dir(path: Path, vocab: int) -> str:
    """A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) with exactly
    ``vocab`` ids, made with the tokenizers library, as DeepSeek and Qwen ship theirs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    table = {"<unk>": 0, "<|endoftext|>": 1}
    table.update({f"w{i}": i + 2 for i in range(vocab - 2)})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return str(path)


def _dataset(prefix: Path, num_docs: int, vocab: int) -> str:
    """An indexed dataset of short random documents; 25000 of them leave Mixtral's --split
    99990,8,2 a validation document."""
    rng = np.random.default_rng(1)
    writer = IndexedDatasetWriter(str(prefix), np.int32)
    for _ in range(num_docs):
        writer.add_document(rng.integers(0, vocab, size=int(rng.integers(8, 40))))
    writer.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron")
    full = {"mixtral": _sentencepiece_words(d, TOKENIZER_VOCAB["mixtral"])}
    for name in ("deepseek_v2_lite", "qwen3_30b_a3b", "deepseek_v3"):
        full[name] = _hugging_face_dir(d / name, TOKENIZER_VOCAB[name])
    full["deepseek_v3_model_zoo"], full["qwen3_30b_a3b_model_zoo"] = full["deepseek_v3"], full["qwen3_30b_a3b"]
    (d / "small").mkdir()
    small = {"mixtral": _sentencepiece_words(d / "small", 300), "hf": _hugging_face_dir(d / "small_hf", 300)}
    return dict(full=full, small=small, data=_dataset(d / "docs", 25_000, 300), dir=str(d))


# The model zoo's variables: the layout sbatch_benchmarking.sh is given, folded to one process
# (the 2-rank run appends its own); wandb's project is the zoo's default form.
MODEL_ZOO_VARIABLES = dict(TP=1, PP=1, EP=1, CP=1, VPP=1, MBS=1, GBS=8, SEQ_LEN=4096, WANDB_PROJECT="moe-benchmarking",
                           COMMENT="megamoe")
# Qwen3's conf always sets the layers per virtual chunk: PP 4, 12 layers a stage in 2 chunks
ZOO_LAYOUT = {"qwen3_30b_a3b_model_zoo": dict(PP=4, VPP=2, LAYERS_PER_VP=6)}


def _argv(name: str, tokenizer: str, files: dict, checkpoints: str | None = None) -> list[str]:
    paths = dict(TOKENIZER_MODEL=tokenizer, DATA_PATH=files["data"],
                 CHECKPOINT_PATH=checkpoints or files["dir"] + "/ckpt")
    if name.endswith("_model_zoo"):
        out = checkpoints or files["dir"] + "/zoo"
        # Transformer Engine is not installed on the CPU machines: its linears are the GPU tier's
        variables = {**MODEL_ZOO_VARIABLES, **ZOO_LAYOUT.get(name, {})}
        return script_argv(name, **paths, **variables, WORKSPACE=out, LOAD_PATH=out + "/load",
                           OUTPUT_PATH=out) + ["--transformer-impl", "local"]
    argv = script_argv(name, **paths)
    if name != "mixtral":  # the modelopt confs leave the tokenizer path and the data to their caller
        argv += ["--tokenizer-model", tokenizer, "--data-path", files["data"]]
    return argv


# ---------------------------------------------------------------------------------------------
# Full size: the model Megatron builds

# pp 4 x ep 8 needs dp 8; the confs set no parallel degrees; the model zoo's Qwen3 at PP 4
WORLD = {"mixtral": 32, "qwen3_30b_a3b_model_zoo": 4}


@pytest.mark.parametrize("name", list(SHAPES))
def test_full_size_flags_build_megatrons_model(name, files, monkeypatch):
    shape = SHAPES[name]
    argv = _argv(name, files["full"][name], files)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())  # the model zoo logs to W&B
    config = parse_config(argv)
    validate(config, WORLD.get(name, 1))
    config = with_tokenizer_vocab(config)
    args = gpt_args(config)
    with torch.device("meta"):
        model = GPTModel(args, ParallelState.single())
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers()
                                                             if n.endswith("gate.bias"))
    assert model.padded_vocab == shape["vocab"]
    assert independent_parameter_count(shape) == shape["published"]  # the formula, against the release
    assert params == shape["published"]
    # structure: norms, attention, FFN kinds, router
    assert isinstance(model.norm, RMSNorm) and args.swiglu and not args.tie_embeddings
    block = model.layers["0"]
    if shape["attention"] == "gqa":
        assert isinstance(block.attn, GroupedQueryAttention)
        assert block.attn.num_local_kv == shape["kv_heads"] and block.attn.head_dim == shape["head_dim"]
        assert (block.attn.q_norm is not None) == shape["qk_norm"]
    else:
        assert isinstance(block.attn, MultiHeadLatentAttention) and isinstance(block.attn.kv_norm, RMSNorm)
        assert hasattr(block.attn, "wq_a") == bool(shape["q_lora"])
        assert block.attn.rope.softmax_scale_multiplier > 1  # YaRN (MLA's default rope type), factor 40
    moe_layers = [layer.ffn for layer in model.layers.values() if hasattr(layer.ffn, "gate")]
    assert len(moe_layers) == shape["layers"] - shape["dense_layers"]
    assert not any(hasattr(model.layers[str(i)].ffn, "gate") for i in range(shape["dense_layers"]))
    gate = moe_layers[0].gate
    assert (gate.num_experts, gate.topk, gate.score_function) == (shape["experts"], shape["topk"], shape["score"])
    assert gate.pre_softmax == shape["pre_softmax"] and (gate.bias is not None) == shape["expert_bias"]
    assert (moe_layers[0].shared_experts is not None) == bool(shape["shared_ffn"])
    grouped = "--moe-grouped-gemm" in argv
    assert moe_layers[0].experts.backend == ("torch" if grouped else "loop")  # Megatron: SequentialMLP
    # Every structural flag the script gives is one megamoe builds, so the notices only point out
    # what Megatron also does without being asked: one GEMM per expert without --moe-grouped-gemm,
    # DeepSeek-R1's --moe-router-pre-softmax, which sigmoid scores ignore, and the modelopt confs'
    # --save-interval, whose --save their caller adds.
    expected = []
    if name.endswith("_model_zoo"):
        _check_model_zoo_run_settings(name, config)
    if name == "deepseek_v3":
        expected.append("--moe-router-pre-softmax has no effect with --moe-router-score-function sigmoid")
    if not grouped:
        expected.append("routed experts run one GEMM per expert (Megatron-LM's default); --moe-grouped-gemm runs "
                        "them as grouped GEMMs")
    if "--save" not in argv:
        expected.append("--save-interval 100000 without --save: nothing is saved (as in Megatron-LM)")
    assert notices(config) == expected


def _check_model_zoo_run_settings(name: str, config) -> None:
    """What NVIDIA's benchmarking flags ask of the run besides the model."""
    t, c, d, log = config.training, config.checkpoint, config.data, config.logging
    if name == "qwen3_30b_a3b_model_zoo":
        assert t.train_iters == 268554688 // 8 and schedule_lengths(t).warmup == 162761
        assert config.parallel.virtual_pipeline_model_parallel_size == 2  # 12 layers a stage, 6 a chunk
        assert (c.finetune, log.log_num_zeros_in_grad, log.log_params_norm, d.num_workers) == (True, True, True, 6)
        assert config.model.rotary_seq_len_interpolation_factor == 1
        return
    assert t.train_iters == 585937500 // 8  # --train-samples over the global batch, as Megatron derives it
    lengths = schedule_lengths(t)
    assert (lengths.warmup, lengths.decay) == (1536000, 584765624)  # in samples
    assert learning_rate(1, t) == t.lr_warmup_init == 3.9e-7 and t.lr == 3.9e-6
    assert (t.manual_gc, t.manual_gc_interval, t.check_for_nan_in_loss_and_grad) == (True, 10, False)
    assert (c.no_save_optim, c.no_load_optim, c.dist_ckpt_strictness) == (True, True, "log_all")
    assert (d.num_workers, d.no_mmap_bin_files) == (6, True)
    assert (log.wandb_project, log.log_timers_to_tensorboard, log.logging_level) == ("moe-benchmarking", True, 40)
    assert config.moe.moe_token_dispatcher_type == "alltoall" and config.training.bf16


@pytest.mark.parametrize("addition, message", [
    (MODEL_ZOO_PRECISION["bf16"], "--tp-comm-overlap: not supported yet"),
    ("--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend deepep", "DeepEP / HybridEP dispatcher is not built"),
])
def test_model_zoo_additions_megamoe_lacks_are_named(addition, message, files, monkeypatch):
    """What sbatch_benchmarking.sh adds for its precisions and DeepEP: refused by name."""
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    argv = _argv("deepseek_v3_model_zoo", files["full"]["deepseek_v3"], files) + addition.split()
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(argv), 1)


def test_model_zoo_fp8_addition(files, monkeypatch):
    """sbatch_benchmarking.sh's FP8 flags under the zoo's own --transformer-impl
    transformer_engine, with TE's import stood in (the CPU machines have none). The FP8 parameter
    gather of TE's layers is not built, and is refused by name. megamoe's --moe-grouped-gemm
    experts are its own (rowwise or tensorwise FP8): blockwise experts are TE's,
    --moe-grouped-gemm-impl te, which the refusal names. With that, TE blockwise and Adam's
    moments in bf16 (the precision-aware optimizer) validate."""
    import megamoe.extensions.te as te

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    monkeypatch.setattr(te, "import_te", lambda: None)
    argv = _argv("deepseek_v3_model_zoo", files["full"]["deepseek_v3"], files) + MODEL_ZOO_PRECISION["fp8"].split()
    argv += ["--transformer-impl", "transformer_engine"]
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --transformer-impl local"):
        validate(parse_config(argv), 1)
    argv.remove("--fp8-param-gather")
    with pytest.raises(ConfigError, match="--fp8-recipe blockwise: the experts run .*--moe-grouped-gemm-impl torch"):
        validate(parse_config(argv), 1)
    config = parse_config(argv + ["--moe-grouped-gemm-impl", "te"])
    validate(config, 1)
    t, m = config.training, config.model
    assert (m.fp8_recipe, m.fp8_format, m.transformer_impl) == ("blockwise", "e4m3", "transformer_engine")
    assert (t.use_precision_aware_optimizer, t.exp_avg_dtype, t.exp_avg_sq_dtype) == (True, "bf16", "bf16")


def test_model_zoo_best_practice_layouts(files, monkeypatch):
    """best-practice/DeepSeekV3/run.sh's H100 layouts: its pipeline layout strings (with MTP, which
    the yaml's comment turns on) place DeepSeek-V3 on PP 8 x VPP 4, the last virtual stage holding
    only the MTP layer and the head; its recompute modules other than mla_up_proj and layernorm
    are built, those two are refused by name."""
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    variables = {**MODEL_ZOO_VARIABLES, "TP": 2, "PP": 8, "EP": 64, "VPP": 4, "GBS": 8192}
    out = files["dir"] + "/zoo"
    argv = script_argv("deepseek_v3_model_zoo", TOKENIZER_MODEL=files["full"]["deepseek_v3"], DATA_PATH=files["data"],
                       WORKSPACE=out, LOAD_PATH=out + "/load", OUTPUT_PATH=out, **variables)
    argv += ["--transformer-impl", "local", "--mtp-num-layers", "1", "--recompute-granularity", "selective"]
    for layout in ("Et|(tt|)*30mL", "Et*2|(tt|)*22t|(tt|)*7mL"):
        config = parse_config(argv + ["--recompute-modules", "moe", "mlp", "--pipeline-model-parallel-layout", layout])
        assert validate(config, 1024).vpp == 4
        state = ParallelState.without_process_groups(validate(config, 1024), 1023)  # the last rank
        model = meta_model(config, state)
        assert model.chunk_layers[-1] == [] and len(model.mtp) == 1 and model.head is not None
    config = parse_config(argv + ["--recompute-modules", "mla_up_proj", "mlp"])
    with pytest.raises(ConfigError, match="--recompute-modules mla_up_proj: not supported yet"):
        validate(config, 1024)


def test_checkpoint_flags_carry_over(files):
    ckpt = files["dir"] + "/ckpt"
    argv = script_argv("mixtral", TOKENIZER_MODEL=files["full"]["mixtral"], DATA_PATH=files["data"], CHECKPOINT_PATH=ckpt)
    config = parse_config(argv)
    validate(config, 32)
    c = config.checkpoint
    assert (c.save, c.load, c.save_interval, c.no_load_optim, c.no_load_rng) == (ckpt, ckpt, 10000, True, True)
    assert c.ckpt_format == "torch_dist"  # Megatron's default


# ---------------------------------------------------------------------------------------------
# Tiny size at 2 ranks: the flags train

MOE_TINY = ["--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2"]
TINY = {
    # pp 4 x ep 8 folded to pp 2; the script's distributed optimizer and overlaps stay
    "mixtral": ["--num-layers", "2", "--num-query-groups", "2", "--pipeline-model-parallel-size", "2",
                "--expert-model-parallel-size", "1",
                *MOE_TINY],
    # experts over EP 2 (sequence parallel is a no-op without TP, as in Megatron)
    "deepseek_v2_lite": ["--num-layers", "3", "--moe-layer-freq", "([0]+[1]*2)", "--kv-lora-rank", "16",
                         "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
                         "--moe-shared-expert-intermediate-size", "32", "--expert-model-parallel-size", "2",
                         *MOE_TINY, "--moe-router-topk", "3"],
    # attention over TP 2 with sequence parallel
    "qwen3_30b_a3b": ["--num-layers", "2", "--kv-channels", "16", "--num-query-groups", "2",
                      "--tensor-model-parallel-size", "2", *MOE_TINY],
    # EP 2 with group-limited routing, recomputation and the dropout it replays (the conf sets
    # no dropout, so Megatron's 0.1 applies)
    "deepseek_v3": ["--num-layers", "3", "--moe-layer-freq", "[0]*1+[1]*2", "--q-lora-rank", "32",
                    "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim",
                    "16", "--moe-shared-expert-intermediate-size", "32", "--expert-model-parallel-size", "2",
                    "--num-experts", "16", "--moe-ffn-hidden-size", "32", "--train-iters", "3"],
    # EP 2 under the distributed optimizer, the sample-based schedule shrunk to 3 steps of 4, and
    # the forced balancing its run.sh suggests for benchmarks (group-limited routing on noise)
    "deepseek_v3_model_zoo": ["--num-layers", "3", "--moe-layer-freq", "[0]*1+[1]*2", "--q-lora-rank", "32",
                              "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
                              "--v-head-dim", "16", "--moe-shared-expert-intermediate-size", "32",
                              "--expert-model-parallel-size", "2", "--num-experts", "16", "--moe-ffn-hidden-size", "32",
                              "--train-samples", "12", "--lr-decay-samples", "12", "--lr-warmup-samples", "4",
                              "--moe-router-force-load-balancing"],
    # interleaved PP 2 (2 virtual chunks of one layer), the interleaved schedule's 4 micro-batches,
    # --finetune from an empty --load, the zero count and parameter norm logged
    "qwen3_30b_a3b_model_zoo": ["--num-layers", "4", "--kv-channels", "16", "--num-query-groups", "2",
                                "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                                *MOE_TINY, "--train-samples", "12", "--lr-decay-samples", "12",
                                "--lr-warmup-samples", "4"],
}
for _name in ("mixtral", "deepseek_v2_lite", "qwen3_30b_a3b"):
    TINY[_name] += ["--train-iters", "3"]
COMMON_TINY = ["--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "32",
               "--max-position-embeddings", "64", "--global-batch-size", "4", "--eval-iters", "2"]


def _train(argv: list[str]):
    fake_wandb.install()  # the model zoo logs to W&B: the stand-in records what rank 0 sends
    config = parse_config(argv)
    validate(config, dist.get_world_size())
    state = ParallelState.build(**config.parallel.degrees())
    history = train(config, state, torch.device("cpu"))
    return [m.lm_loss for m in history]


@pytest.mark.parametrize("name", list(SHAPES))
def test_script_trains_at_two_ranks(name, files, workers, tmp_path):
    tokenizer = files["small"]["mixtral" if name == "mixtral" else "hf"]
    argv = _argv(name, tokenizer, files, str(tmp_path / "ckpt")) + COMMON_TINY + TINY[name]
    argv += ["--tensorboard-dir", str(tmp_path / "tb")] if name == "mixtral" else []
    losses = workers(2).run(_train, argv)
    assert losses[0] == losses[1] and len(losses[0]) == 3  # every rank reports the job's losses
    assert all(math.isfinite(x) and 4.0 < x < 7.0 for x in losses[0]), losses[0]  # ln(300) = 5.7
    if name == "deepseek_v3_model_zoo":  # --no-save-optim: the weights only, at the last step
        saved = dcp.FileSystemReader(str(tmp_path / "ckpt" / "checkpoints" / "iter_0000003")).read_metadata()
        assert all(key.startswith("model/") for key in saved.state_dict_metadata)
