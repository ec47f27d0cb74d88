"""Real data in the training loop: the model's vocabulary comes from the tokenizer, training
runs on an indexed dataset, every data-parallel layout reads the same global batches, and the
data flags are validated with one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from datagen import ROOT
from megamoe.config import Config, ConfigError
from megamoe.config_validation import notices, validate
from megamoe.data.loader import with_tokenizer_vocab
from megamoe.model.args import gpt_args
from megamoe.parallel.state import ParallelState
from megamoe.testing.presets import preset
from megamoe.testing.scripts import run_script
from megamoe.training.train import MicroBatches, build_model, build_optimizer, train, train_step


def tiny_config(prefix: str, cache: str) -> Config:
    cfg = preset("demo")
    m = cfg.model
    m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 64, 2, 16
    m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim = 16, 16, 8, 8, 8
    cfg.moe.num_experts, cfg.moe.moe_layer_freq = 4, "[0]*1+[1]*1"
    cfg.moe.moe_ffn_hidden_size = cfg.moe.moe_shared_expert_intermediate_size = 16
    cfg.moe.moe_grouped_gemm_impl = "loop"
    t = cfg.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.lr_warmup_iters = 2, 8, 2, 1
    t.eval_iters, t.eval_interval = 1, 2
    d = cfg.data
    d.data_path, d.split, d.tokenizer_type, d.vocab_size, d.data_cache_path = [prefix], "8,2,0", "NullTokenizer", 50, cache
    return cfg


def _read_batches(cfg: Config) -> dict[str, list[list[torch.Tensor]]]:
    """This rank's token batches: [step][micro-step] for two training steps and one validation step."""
    state = ParallelState.build()
    out = {}
    for split, steps in (("train", 2), ("valid", 1)):
        data = MicroBatches(cfg, state, torch.device("cpu"), split)
        out[split] = [[data.get(step, j)["tokens"] for j in range(data.num_micro)] for step in range(steps)]
    return out


def _train_losses(cfg: Config) -> list[float]:
    return [m.lm_loss for m in train(cfg, ParallelState.build(), torch.device("cpu"))]


@pytest.fixture
def one_thread():
    """The single-process runs use one thread, like the worker ranks (the machine has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_on_real_data_and_the_same_batches_under_dp2(null_dataset, tmp_path, workers, one_thread):
    prefix, _ = null_dataset
    cfg = tiny_config(prefix, str(tmp_path / "cache"))
    validate(cfg, world_size=1)
    once = with_tokenizer_vocab(cfg)  # NullTokenizer: 50 ids + end-of-document, whatever the repeats
    assert gpt_args(once).vocab_size == gpt_args(with_tokenizer_vocab(once)).vocab_size == 51
    single = _read_batches(cfg)
    for split in single:  # one process: global batch = the micro-batches in order
        for batches in single[split]:
            assert torch.cat(batches).shape == (8, 16) and int(torch.cat(batches).max()) <= 50
    ranks = workers(2).run(_read_batches, cfg)
    for split, steps in single.items():
        for step, batches in enumerate(steps):
            # DP rank d, micro-step j reads samples step*G + j*m*dp + d*m ... + m
            dp_order = [ranks[d][split][step][j] for j in range(len(ranks[0][split][step])) for d in range(2)]
            torch.testing.assert_close(torch.cat(dp_order), torch.cat(batches), rtol=0, atol=0)
            assert not torch.equal(ranks[0][split][step][0], ranks[1][split][step][0])  # disjoint slices
    losses = _train_losses(cfg)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    dp_losses = workers(2).run(_train_losses, cfg)
    for rank_losses in dp_losses:
        torch.testing.assert_close(torch.tensor(rank_losses), torch.tensor(losses), rtol=1e-4, atol=0)


def test_workers_and_file_reads_give_the_same_training(null_dataset, tmp_path, one_thread):
    """--num-workers 0 (in the loop), 1 and 3 (threads ahead of the loop) and --no-mmap-bin-files
    train on the same batches in the same order: the same losses, bitwise."""
    prefix, _ = null_dataset
    base = tiny_config(prefix, str(tmp_path / "cache"))
    base.training.train_iters = 4
    losses = []
    for workers, no_mmap in ((0, False), (1, False), (3, True)):
        cfg = _set(base, num_workers=workers, no_mmap_bin_files=no_mmap)
        validate(cfg, 1)
        losses.append(_train_losses(cfg))
    assert len(losses[0]) == 4 and losses[1] == losses[0] and losses[2] == losses[0], losses


def test_eod_mask_loss_leaves_out_the_predictions_from_end_of_document(null_dataset, tmp_path, one_thread):
    """--eod-mask-loss: the mask is zero exactly where the input is the end-of-document id (50,
    NullTokenizer's), and the step's loss is the mean cross entropy over the other positions,
    computed here from the model's logits."""
    prefix, _ = null_dataset
    cfg = tiny_config(prefix, str(tmp_path / "cache"))
    cfg.data.eod_mask_loss = True
    validate(cfg, 1)
    cfg = with_tokenizer_vocab(cfg)
    state = ParallelState.build()
    data = MicroBatches(cfg, state, torch.device("cpu"))
    batches = [data.get(0, j) for j in range(data.num_micro)]
    tokens, labels, mask = (torch.cat([b[key] for b in batches]) for key in ("tokens", "labels", "loss_mask"))
    assert (tokens == 50).any() and torch.equal(mask, (tokens != 50).float())
    model = build_model(cfg, state, "cpu", dtype=torch.float64)
    with torch.no_grad():
        per_token = F.cross_entropy(model.logits(tokens).flatten(0, 1), labels.flatten(), reduction="none")
    by_hand = (per_token * mask.flatten()).sum() / mask.sum()
    opt = build_optimizer(model, cfg, state)
    got = train_step(model, opt, batches, 1, cfg, state, None)
    assert abs(got.lm_loss - by_hand.item()) <= 1e-12 * by_hand.item()
    with pytest.raises(ConfigError, match="--eod-mask-loss needs --data-path"):
        validate(_set(Config(), eod_mask_loss=True), 1)


def _set(cfg: Config, **fields) -> Config:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data), training=dataclasses.replace(cfg.training))
    for name, value in fields.items():
        setattr(cfg.training if name == "eval_iters" else cfg.data, name, value)
    return cfg


def test_data_flag_validation(null_dataset, sp_model, tmp_path):
    prefix, _ = null_dataset
    real = tiny_config(prefix, str(tmp_path / "cache"))
    validate(real, 1)
    validate(Config(), 1)  # mock data by default
    sp = _set(real, tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model, vocab_size=512)
    validate(sp, 1)
    assert with_tokenizer_vocab(sp).data.vocab_size == 320
    # a preset's vocabulary gives way to the tokenizer's, and the run says so
    assert any("--vocab-size 102400 is replaced by the vocabulary of --tokenizer-model" in n and "(320 ids)" in n
               for n in notices(_set(sp, vocab_size=102400)))
    assert not any("--vocab-size" in n for n in notices(_set(sp, vocab_size=320)))
    # a published model's padded table (an HF import) keeps its rows; fewer rows than token ids is an error
    assert gpt_args(with_tokenizer_vocab(_set(sp, model_vocab_size=384))).vocab_size == 384
    with pytest.raises(ConfigError, match="--model-vocab-size 300 is smaller than the vocabulary of --tokenizer-model"):
        with_tokenizer_vocab(_set(sp, model_vocab_size=300))
    with pytest.raises(ConfigError, match="--model-vocab-size 100 is smaller than --vocab-size 512"):
        validate(_set(Config(), model_vocab_size=100), 1)
    cases = [
        (_set(real, mock_data=True), "--mock-data and --data-path are mutually exclusive"),
        (_set(Config(), mock_data=False), "--no-mock-data needs --data-path"),
        (_set(real, data_path=[str(tmp_path / "none")]), r"none.bin and .*none.idx are needed"),
        (_set(real, data_path=["0.5", prefix, prefix]), "pairs of WEIGHT PATH"),
        (_set(real, data_path=["0", prefix]), "must be positive"),
        (_set(real, split="90,10,x"), "--split 90,10,x"),
        (_set(real, split="1,0,0"), "leaves the validation split .* set --eval-iters 0"),
        (_set(real, split="0,1,0", eval_iters=0), "leaves the training split"),
        (_set(real, tokenizer_type="SentencePieceTokenizer"), "needs --tokenizer-model"),
        (_set(sp, tokenizer_model="/none.model"), "--tokenizer-model /none.model: no such file"),
        (_set(real, tokenizer_model=sp_model), "--tokenizer-model is not used by --tokenizer-type NullTokenizer"),
        (_set(Config(), tokenizer_type="SentencePieceTokenizer"), "apply to --data-path; mock data uses --vocab-size"),
        (_set(real, num_workers=-1), "--num-workers -1: must be 0"),
        (_set(Config(), data_cache_path=str(tmp_path)), "--data-cache-path applies to --data-path"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(cfg, 1)
    validate(_set(real, split="1,0,0", eval_iters=0), 1)
    (tmp_path / "bad.bin").write_bytes(b"")
    (tmp_path / "bad.idx").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="bad.*not a Megatron indexed-dataset index"):
        validate(_set(real, data_path=[str(tmp_path / "bad")]), 1)


def test_pretrain_reports_a_missing_dataset_in_one_line():
    proc = run_script("pretrain_moe.py", "--data-path", "/nonexistent/corpus_text_document", cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--data-path /nonexistent/corpus_text_document: " in proc.stderr


def test_tokens_outside_the_vocabulary_are_an_error(null_dataset, tmp_path):
    prefix, _ = null_dataset  # ids up to 50 (the end-of-document id of --vocab-size 50)
    cfg = tiny_config(prefix, str(tmp_path / "cache"))
    cfg.data.vocab_size = 20
    data = MicroBatches(cfg, ParallelState.single(), torch.device("cpu"))
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary of 21"):
        data.get(0, 0)
