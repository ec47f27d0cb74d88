"""Configuration: flags generated from the dataclasses, YAML loading, validation errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
from pathlib import Path

import pytest

from megamoe.cli import build_parser, load_yaml_values, parse_config, parse_values
from megamoe.config import SECTIONS, Config, ConfigError, field_docs, flag_name, section_of
from megamoe.config_validation import check_not_supported_yet, notices, validate
from megamoe.model.args import Recompute
from megamoe.model.args import dense_ffn_hidden_size, gpt_args, parse_moe_layer_freq
from megamoe.testing.scripts import run_script

ROOT = Path(__file__).resolve().parents[1]

# Megatron-LM flag names the foundation issue lists; each must exist with exactly this spelling.
MEGATRON_FLAGS = """
--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups --seq-length
--micro-batch-size --global-batch-size --train-iters --lr --min-lr --lr-warmup-iters --lr-decay-style
--weight-decay --clip-grad --seed --bf16 --fp16 --tensor-model-parallel-size
--pipeline-model-parallel-size --virtual-pipeline-model-parallel-size --context-parallel-size
--expert-model-parallel-size --expert-tensor-parallel-size --sequence-parallel
--use-distributed-optimizer --num-experts --moe-router-topk --moe-ffn-hidden-size
--moe-shared-expert-intermediate-size --moe-router-score-function --moe-router-load-balancing-type
--moe-aux-loss-coeff --moe-z-loss-coeff --moe-router-enable-expert-bias --moe-router-bias-update-rate
--moe-router-num-groups --moe-router-group-topk --moe-router-topk-scaling-factor
--moe-expert-capacity-factor --moe-token-dispatcher-type --moe-layer-freq --multi-latent-attention
--q-lora-rank --kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim --v-head-dim --mtp-num-layers
--mtp-loss-scaling-factor --data-path --split --tokenizer-type --tokenizer-model --vocab-size
--mock-data --save --load --save-interval --eval-interval --eval-iters --tensorboard-dir
--log-interval --recompute-granularity --fp8-format --fp8-recipe --transformer-impl
--use-mcore-models --disable-bias-linear --normalization --position-embedding-type --no-position-embedding
--swiglu --group-query-attention --rotary-percent --kv-channels --moe-grouped-gemm --moe-router-dtype
--attention-softmax-in-fp32 --no-masked-softmax-fusion --no-rope-fusion --no-bias-swiglu-fusion
--recompute-activations --moe-layer-recompute
""".split()


def test_every_field_has_a_docstring_and_unique_flag():
    seen = set()
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert f.name not in seen, f"field {f.name} appears in two sections"
            seen.add(f.name)


def test_help_documents_every_flag():
    text = build_parser(prog="pretrain_moe.py").format_help()
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert flag_name(f.name) in text
    for flag in MEGATRON_FLAGS:
        assert flag in text, flag
    assert "Number of routed experts per MoE layer" in text  # docstrings, not just names


def test_cli_values_types_and_booleans():
    cfg = parse_config(["--num-layers", "6", "--lr", "1e-4", "--bf16", "--no-multi-latent-attention",
                        "--data-path", "0.3", "a", "0.7", "b", "--moe-router-score-function", "softmax"])
    assert cfg.model.num_layers == 6 and cfg.training.lr == 1e-4 and cfg.training.bf16
    assert cfg.model.multi_latent_attention is False
    assert cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.moe.moe_router_score_function == "softmax"
    assert parse_config([]) == Config()


# Megatron-LM's defaults (megatron/training/arguments.py, parsed with no flags, at the commit named
# in tests/megatron/megatron_scripts.py) for every flag megamoe shares and builds the same way.
MEGATRON_DEFAULTS = dict(
    kv_channels=None, max_position_embeddings=None, ffn_hidden_size=None, group_query_attention=False,
    normalization="LayerNorm", norm_epsilon=1e-5, swiglu=False, qk_layernorm=False, rotary_percent=1.0,
    rotary_base=10000, rope_type=None, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0,
    multi_latent_attention=False, q_lora_rank=None, kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64,
    v_head_dim=128, untie_embeddings_and_output_weights=False, init_method_std=0.02, attention_dropout=0.1,
    hidden_dropout=0.1, mtp_loss_scaling_factor=0.1, recompute_granularity=None, fp8_recipe="delayed",
    num_experts=None, moe_layer_freq="1", moe_ffn_hidden_size=None, moe_shared_expert_intermediate_size=None,
    moe_router_topk=2, moe_router_score_function="softmax", moe_router_pre_softmax=False,
    moe_router_num_groups=None, moe_router_group_topk=None, moe_router_topk_scaling_factor=None,
    moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
    moe_router_enable_expert_bias=False, moe_router_bias_update_rate=1e-3, moe_expert_capacity_factor=None,
    moe_pad_expert_input_to_capacity=False, moe_token_drop_policy="probs", moe_token_dispatcher_type="allgather",
    moe_grouped_gemm=False, moe_shared_expert_overlap=False, moe_layer_recompute=False,
    tensor_model_parallel_size=1, sequence_parallel=False, pipeline_model_parallel_size=1,
    context_parallel_size=1, expert_model_parallel_size=1, expert_tensor_parallel_size=None,
    use_distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False,
    distributed_backend="nccl", distributed_timeout_minutes=10, min_lr=0.0, lr_warmup_iters=0,
    lr_decay_style="linear", lr_decay_iters=None, lr_wsd_decay_iters=None, lr_wsd_decay_style="exponential",
    optimizer="adam", weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, clip_grad=1.0,
    seed=1234, bf16=False, fp16=False, eval_interval=None, eval_iters=100, data_path=None,
    make_vocab_size_divisible_by=128, log_interval=100, tensorboard_dir=None, save=None, load=None,
    save_interval=None,
)


def test_defaults_are_megatrons():
    """Where Megatron has the flag and megamoe builds its default, the defaults agree, so a launch
    script that leaves a flag out builds the same model and optimizer. (Megatron requires the
    sizes, batch sizes, lr and iterations; megamoe defaults them small for a bare run.)"""
    config = Config()
    got = {name: getattr(getattr(config, section_of(name)), name) for name in MEGATRON_DEFAULTS}
    assert got == MEGATRON_DEFAULTS


def test_megatron_spellings_and_unset_values():
    cfg = parse_config(["--disable-bias-linear", "--recompute-activations", "--no-masked-softmax-fusion",
                        "--use-mcore-models", "--attention-softmax-in-fp32", "--no-position-embedding"])
    assert cfg.model.add_bias_linear is False and cfg.model.recompute_granularity == "selective"
    assert cfg.megatron.no_masked_softmax_fusion and cfg.megatron.use_mcore_models
    # an optional value is unset with None (over a preset's), a size also with 0 as Megatron spells it
    preset = ["--config", str(ROOT / "examples/configs/deepseek_v3.yaml")]
    cfg = parse_config(preset + ["--moe-shared-expert-intermediate-size", "None", "--q-lora-rank", "none",
                                 "--moe-router-topk-scaling-factor", "None", "--rope-type", "None"])
    assert cfg.moe.moe_shared_expert_intermediate_size is None and cfg.model.q_lora_rank is None
    assert cfg.moe.moe_router_topk_scaling_factor is None and cfg.model.rope_type is None
    dense = parse_config(preset + ["--num-experts", "0"])
    validate(dense, 1)
    assert gpt_args(dense).moe is None and not any(gpt_args(dense).moe_layers)
    assert gpt_args(parse_config(preset + ["--moe-shared-expert-intermediate-size", "0"])).moe.shared_ffn_hidden_size is None
    with pytest.raises(SystemExit):
        parse_config(["--num-layers", "None"])  # a required size cannot be unset


def test_bare_config_is_a_dense_megatron_gpt():
    config = Config()
    validate(config, 1)
    args = gpt_args(config)
    assert args.moe is None and args.attention.kind == "gqa" and args.attention.num_kv_heads == 4
    assert (args.normalization, args.swiglu, args.tie_embeddings) == ("LayerNorm", False, True)
    assert args.ffn_hidden_size == 4 * 128 and args.attention.yarn is None
    assert dense_ffn_hidden_size(4096, swiglu=True) == 10880  # Megatron's rule: int(8h/3 / 64) * 64
    said = notices(config)
    assert len(said) == 2 and "learned absolute" in said[0] and "--disable-bias-linear" in said[1]
    # --num-query-groups needs --group-query-attention, as in Megatron
    assert gpt_args(_config(num_query_groups=2)).attention.num_kv_heads == 4
    assert any("--num-query-groups 2 is ignored" in n for n in notices(_config(num_query_groups=2)))
    gqa = _config(num_query_groups=2, group_query_attention=True)
    assert gpt_args(gqa).attention.num_kv_heads == 2 and not any("ignored" in n for n in notices(gqa))
    assert gpt_args(_config(group_query_attention=True)).attention.num_kv_heads == 1  # Megatron's default 1
    # MLA takes YaRN unless told otherwise (Megatron's rule); a factor of 1 is plain RoPE
    assert gpt_args(_config(multi_latent_attention=True, rotary_scaling_factor=40.0)).attention.yarn.factor == 40.0


@pytest.mark.parametrize("argv, message", [
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute: not supported"),
    (["--add-bias-linear"], "--add-bias-linear: not supported; megamoe's linear layers have no biases"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: not supported; megamoe rotates whole heads"),
    (["--group-query-attention", "--multi-latent-attention"], "are alternatives: give one"),
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 needs routed experts"),
    (["--num-experts", "-1"], "--num-experts -1: must be positive, or 0 / None for none"),
])
def test_megatron_values_megamoe_cannot_build_are_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(argv), 2 if "--expert-model-parallel-size" in argv else 1)


@pytest.mark.parametrize("argv, message", [
    (["--cp-comm-type", "a2a"], "--cp-comm-type a2a: megamoe exchanges .* with 'p2p' .* or 'allgather'"),
    (["--attention-dropout", "0.1"], "--attention-dropout 0.1: ring context-parallel attention .* has no attention "
                                     "dropout; set --attention-dropout 0 or use --cp-comm-type allgather"),
])
def test_context_parallel_exchange_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        validate(parse_config(["--context-parallel-size", "2", "--seq-length", "16", *argv]), 2)
    # the all-gather exchange takes attention dropout
    validate(parse_config(["--context-parallel-size", "2", "--seq-length", "16", "--attention-dropout", "0.1",
                           "--cp-comm-type", "allgather"]), 2)


def test_unknown_choice_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--normalization", "BatchNorm"], prog="pretrain_moe.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--normalization: invalid choice: 'BatchNorm' (choose from LayerNorm, RMSNorm)" in err


def test_yaml_sections_and_flat_keys_with_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num-layers: 8\n  hidden_size: 256\nmoe_router_topk: 4\nlr: 1\n")
    parser = build_parser()
    cfg_values = parse_values(["--config", str(path), "--hidden-size", "512"], parser)
    assert cfg_values == {"num_layers": 8, "hidden_size": 512, "moe_router_topk": 4, "lr": 1.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_layerz: 3\n", "unknown key 'num_layerz'"),
        ("model:\n  lr: 0.1\n", "'lr' belongs to section 'training', not 'model'"),
        ("num_layers: three\n", "--num-layers must be an integer"),
        ("bf16: 1\n", "--bf16 must be true or false"),
        ("moe_router_score_function: relu\n", "must be one of"),
        ("model: [1, 2]\n", "section 'model' must be a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_yaml_values(str(path))


def test_missing_yaml_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml_values("/nonexistent/x.yaml")


def test_moe_layer_freq():
    assert parse_moe_layer_freq("[0]*1+[1]*3", 4) == [False, True, True, True]
    assert parse_moe_layer_freq("2", 4) == [True, False, True, False]
    assert parse_moe_layer_freq("1", 3) == [True, True, True]
    with pytest.raises(ConfigError, match="one 0 or 1 per layer"):
        parse_moe_layer_freq("[1]*3", 4)
    with pytest.raises(ConfigError, match="only integers"):
        parse_moe_layer_freq("__import__('os')", 4)


def _config(**fields) -> Config:
    cfg = Config()
    for name, value in fields.items():
        section = next(s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)})
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize(
    "fields, world, message",
    [
        (dict(tensor_model_parallel_size=3), 4, "--tensor-model-parallel-size 3"),
        (dict(expert_model_parallel_size=3, num_experts=6), 4, r"tp\*cp\*dp != etp\*ep\*edp"),
        (dict(num_experts=4, moe_router_topk=6), 1, "--moe-router-topk 6 is larger than --num-experts 4"),
        (dict(num_experts=6, expert_model_parallel_size=4), 4, "--num-experts 6 is not divisible"),
        (dict(global_batch_size=6, micro_batch_size=4), 1, "--global-batch-size 6"),
        (dict(num_attention_heads=6, hidden_size=96, tensor_model_parallel_size=4), 4, "--num-attention-heads 6"),
        (dict(bf16=True, fp16=True), 1, "--bf16 and --fp16"),
        (dict(num_experts=8, moe_router_num_groups=4), 1, "--moe-router-group-topk must be given together"),
        (dict(num_experts=8, moe_router_num_groups=3, moe_router_group_topk=1), 1, "--moe-router-num-groups 3"),
        (dict(mock_data=True, data_path=["x"]), 1, "mutually exclusive"),
        (dict(data_path=["x"]), 1, "--data-path x: x.bin and x.idx are needed"),
        (dict(min_lr=1.0), 1, "--min-lr 1.0 is larger than --lr"),
        (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=3),
         2, "--num-layers 4 cannot be split over --pipeline-model-parallel-size 2 stages with "
            "--decoder-first-pipeline-num-layers 3"),
        (dict(decoder_last_pipeline_num_layers=1), 1, "need --pipeline-model-parallel-size > 1"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), 2,
         r"--virtual-pipeline-model-parallel-size 4 does not divide the layers of every pipeline stage \(\[2, 2\]"),
        (dict(virtual_pipeline_model_parallel_size=2), 1, "needs --pipeline-model-parallel-size > 1"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2, global_batch_size=6,
              micro_batch_size=2), 2, r"micro-batches per step \(3 = .* multiple of --pipeline-model-parallel-size 2"),
        (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
              num_layers_per_virtual_pipeline_stage=1), 2, "are alternatives: give one"),
        (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=3), 2,
         "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers per stage"),
        (dict(num_experts=8, moe_a2a_overlap_chunks=2), 1, "--moe-a2a-overlap-chunks 2 needs --moe-token-dispatcher-type alltoall"),
        (dict(num_experts=8, moe_a2a_overlap_chunks=0), 1, "--moe-a2a-overlap-chunks 0: must be positive"),
        (dict(num_experts=8, moe_a2a_overlap_chunks=2, moe_token_dispatcher_type="alltoall",
              moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True), 1,
         "cannot pad each chunk to the micro-batch's capacity"),
        (dict(num_experts=8, overlap_moe_expert_parallel_comm=True), 1,
         "--overlap-moe-expert-parallel-comm needs routed experts on --moe-token-dispatcher-type alltoall"),
        (dict(num_experts=8, delay_wgrad_compute=True), 1,
         "--delay-wgrad-compute delays weight gradients inside the pieces of --overlap-moe-expert-parallel-comm: "
         "give --overlap-moe-expert-parallel-comm too"),
        (dict(num_experts=8, overlap_moe_expert_parallel_comm=True, moe_token_dispatcher_type="alltoall",
              moe_a2a_overlap_chunks=2), 1, "with --moe-a2a-overlap-chunks 2 is not supported yet"),
        (dict(pipeline_schedule="dualpipev"), 1, "--pipeline-schedule dualpipev needs --pipeline-model-parallel-size 2"),
        (dict(pipeline_schedule="dualpipev", pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
              global_batch_size=8), 2, "places two chunks per rank itself: drop --virtual-pipeline-model-parallel-size 2"),
        (dict(pipeline_schedule="dualpipev", pipeline_model_parallel_size=4, global_batch_size=8), 4,
         r"splits --num-layers 4 over 2 x --pipeline-model-parallel-size = 8 stages"),
        (dict(pipeline_schedule="dualpipev", pipeline_model_parallel_size=2, global_batch_size=3, micro_batch_size=1), 2,
         r"dualpipev needs at least 2 x --pipeline-model-parallel-size = 4 micro-batches per step, got 3"),
        (dict(fp8_format="e4m3"), 1,
         r"--fp8-recipe delayed: the linear layers run on megamoe's FP8 kernels \(--transformer-impl local\), "
         "which take --fp8-recipe rowwise or tensorwise"),
        (dict(fp8_format="e4m3", fp8_recipe="rowwise"), 1, "--fp8-format e4m3: needs --bf16"),
        (dict(fp8_format="hybrid", fp8_recipe="rowwise", bf16=True, transformer_impl="transformer_engine"), 1,
         r"--fp8-recipe rowwise: the linear layers run on Transformer Engine \(--transformer-impl transformer_engine"),
        (dict(num_experts=8, moe_grouped_gemm=True, fp8_format="hybrid", fp8_recipe="blockwise", bf16=True,
              transformer_impl="transformer_engine"), 1,
         r"--fp8-recipe blockwise: the experts run on megamoe's FP8 kernels \(--moe-grouped-gemm-impl torch\)"),
        (dict(fp8_format="hybrid", bf16=True, transformer_impl="transformer_engine", recompute_granularity="full"), 1,
         "--fp8-recipe delayed with --recompute-granularity full is not supported yet"),
        (dict(fp8_amax_history_len=16), 1, "--fp8-amax-history-len: only used by --fp8-recipe delayed"),
        (dict(fp8_format="hybrid", fp8_recipe="rowwise", bf16=True, tp_only_amax_red=True), 1,
         "--tp-only-amax-red: only used by --fp8-recipe delayed"),
        (dict(num_experts=8, moe_fp8_dispatch=True, moe_token_dispatcher_type="alltoall"), 1,
         "--moe-fp8-dispatch needs --fp8-format with --fp8-recipe rowwise: the rows are quantized"),
        (dict(num_experts=8, moe_fp8_dispatch=True, fp8_format="hybrid", fp8_recipe="rowwise", bf16=True), 1,
         "--moe-fp8-dispatch needs --moe-token-dispatcher-type alltoall"),
        (dict(fp8_amax_history_len=0), 1, "--fp8-amax-history-len 0: must be positive"),
        (dict(fp8_format="hybrid", fp8_recipe="mxfp8", bf16=True), 1, "--fp8-recipe mxfp8 needs Blackwell"),
        (dict(num_layers_at_start_in_bf16=-1), 1, "--num-layers-at-start-in-bf16 -1: must be 0 or more"),
        (dict(overlap_param_gather=True), 1, "--overlap-param-gather needs --use-distributed-optimizer"),
        (dict(ddp_bucket_size=0), 1, "--ddp-bucket-size 0: must be positive"),
        (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|tL"), 2,
         r"--pipeline-model-parallel-layout Ett\|tL: 3 x 't' \(a decoder layer\) where the model has 4"),
        (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|ttL",
              decoder_first_pipeline_num_layers=2), 2, "places every layer itself: drop --decoder-first"),
        (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Et|t|t|tL",
              virtual_pipeline_model_parallel_size=3), 2, "4 virtual stages, 2 per pipeline rank"),
        (dict(recompute_modules=["core_attn", "mla_up_proj"], recompute_granularity="selective"), 1,
         "--recompute-modules mla_up_proj: not supported yet"),
        (dict(recompute_modules=["moe"]), 1, "applies with --recompute-granularity selective"),
        (dict(recompute_modules=["attn"], recompute_granularity="selective"), 1, "attn: not a module Megatron-LM"),
        (dict(exp_avg_sq_dtype="fp8"), 1, "--exp-avg-sq-dtype fp8: not supported yet"),
        (dict(exp_avg_dtype="bf16"), 1, "--exp-avg-dtype bf16 needs --use-precision-aware-optimizer"),
        (dict(exp_avg_dtype="bf16", use_precision_aware_optimizer=True, optimizer="muon"), 1,
         "--exp-avg-dtype bf16: Adam's moments only; --optimizer muon"),
        (dict(main_grads_dtype="bf16", use_precision_aware_optimizer=True), 1, "--main-grads-dtype bf16: not supported"),
        (dict(num_experts=8, moe_token_dispatcher_type="flex"), 1, "DeepEP / HybridEP dispatcher is not built"),
        (dict(tp_comm_overlap=True), 1, "--tp-comm-overlap: not supported yet"),
    ],
)
def test_validation_errors_name_the_flags(fields, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(_config(**fields), world)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed here")
def test_te_backend_without_te_names_the_flag():
    with pytest.raises(ConfigError, match="--moe-grouped-gemm-impl te needs Transformer Engine"):
        validate(_config(num_experts=8, moe_grouped_gemm_impl="te"), 1)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed here")
def test_te_linears_without_te_name_the_flag():
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine needs Transformer Engine"):
        validate(_config(fp8_format="hybrid", fp8_recipe="tensorwise", bf16=True, transformer_impl="transformer_engine"), 1)


def test_pipeline_layout_sets_the_virtual_size():
    cfg = _config(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Et|t|t|tL", global_batch_size=8)
    layout = validate(cfg, 2)
    assert layout.vpp == 2 and cfg.parallel.virtual_pipeline_model_parallel_size == 2


@pytest.mark.parametrize("granularity, modules, moe_layer_recompute, want", [
    (None, ["core_attn"], False, Recompute()),
    ("selective", ["core_attn"], False, Recompute(core_attn=True)),  # --recompute-activations
    ("selective", ["moe"], False, Recompute(moe=True)),  # the MoE layers only: the attention core is kept
    (None, ["core_attn"], True, Recompute(moe=True)),  # --moe-layer-recompute
    ("selective", ["core_attn", "mlp", "shared_experts"], False,
     Recompute(core_attn=True, mlp=True, shared_experts=True)),
    ("full", ["core_attn"], True, Recompute(full=True, moe=True)),
])
def test_what_is_recomputed(granularity, modules, moe_layer_recompute, want):
    cfg = _config(recompute_granularity=granularity, recompute_modules=modules, moe_layer_recompute=moe_layer_recompute,
                  num_experts=8)
    validate(cfg, 1)
    assert Recompute.of(cfg.model, cfg.moe) == want


def test_num_layers_per_virtual_stage_sets_the_virtual_size():
    cfg = _config(num_layers=8, moe_layer_freq="1", pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2,
                  global_batch_size=8, micro_batch_size=2)
    assert validate(cfg, 2).vpp == 2 and cfg.parallel.virtual_pipeline_model_parallel_size == 2


def test_not_supported_yet_is_an_error_not_a_no_op():
    cfg = Config()
    check_not_supported_yet(cfg, frozenset({"fp16"}))  # defaults are fine
    cfg.training.fp16 = True
    with pytest.raises(ConfigError, match="--fp16: not supported yet"):
        check_not_supported_yet(cfg, frozenset({"fp16"}))


def _run(*args: str, env_world: int | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_world is not None:
        env.update(RANK="0", WORLD_SIZE=str(env_world), LOCAL_RANK="0")
    return run_script(*args, cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize(
    "argv, world, needle",
    [
        (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3"),
        (["--expert-model-parallel-size", "3"], 4, "tp*cp*dp != etp*ep*edp"),
        (["--num-experts", "4", "--moe-router-topk", "6"], None, "--moe-router-topk 6"),
        (["--no-such-flag"], None, "unrecognized arguments: --no-such-flag"),
        (["--lr", "fast"], None, "argument --lr: invalid float value"),
        (["--config", "/nonexistent.yaml"], None, "--config /nonexistent.yaml: no such file"),
        (["--rotary-percent", "0.5"], None, "--rotary-percent 0.5: not supported"),
    ],
)
def test_pretrain_bad_input_is_one_line_exit_2(argv, world, needle):
    proc = _run("pretrain_moe.py", *argv, env_world=world)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_pretrain_help_lists_flags():
    proc = _run("pretrain_moe.py", "--help")
    assert proc.returncode == 0
    assert "--moe-router-enable-expert-bias" in proc.stdout and "--parallel-rank-order" in proc.stdout


def test_parallel_layout_tool():
    proc = _run("tools/parallel_layout.py", "--world-size", "64", "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "4", "--expert-model-parallel-size", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "world 64 = tp 2 x cp 1 x dp 8 x pp 4 (dense) = etp 2 x ep 8 x edp 1 x pp 4" in out
    assert "[0,16,32,48]" in out and "[0,2,4,6,8,10,12,14]" in out and "[0,48]" in out
    bad = _run("tools/parallel_layout.py", "--world-size", "6", "--tensor-model-parallel-size", "4")
    assert bad.returncode == 2 and "does not divide the world size 6" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_config_reference_is_current():
    proc = _run("tools/gen_config_docs.py", "--check")
    assert proc.returncode == 0, proc.stderr
