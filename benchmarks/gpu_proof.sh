#!/usr/bin/env bash
# The GPU proof, in one call on one CUDA GPU (about 6-8 minutes on an H200 with RECIPE=0 measured without the
# two full-logits bench.py runs, which add about a minute each, estimated; plus ~7 min estimated for the recipe
# comparison; never run by CI, it needs CUDA). For the ~40M
# (config/train_fineweb.py) and 124M (config/train_fineweb_124m.py) models with bf16 + torch.compile +
# fused AdamW + fused (flash) attention it records:
#   - bench.py: ms/iter, tokens/s, MFU against this GPU's peak (runtime.PEAK_TFLOPS), peak memory
#     (torch.cuda.max_memory_allocated) with the chunked loss (the default) and with the full logits
#     (--chunked_loss=False), at each config's micro-batch (40M: 16 x 1024, the seed shape; 124M: 8 x 1024),
#     any graph break dynamo reports (TORCH_LOGS=graph_breaks), and which attention kernel the profiler saw;
#   - bench.py --fit_memory=11GiB for the 124M model (the reference user's 12 GB card);
#   - a short real training run of the 40M model: its val loss must go down; plot.py draws it;
#   - the per-token recipe at 40M: AdamW vs Muon vs Muon + the per-token switches, 32.8M tokens each
#     (benchmarks/ablation.py --study=gpu; ~7 min estimated from the FLOPs, not yet measured on a GPU;
#     RECIPE=0 skips it, RECIPE=only runs it alone).
#
#   DATA_DIR=.device_data/fineweb bash benchmarks/gpu_proof.sh [RESULTS_DIR]
#
# DATA_DIR (default data/fineweb) holds train.bin/val.bin from data/fineweb/prepare.py. If it has none
# and PARQUET names a parquet file in FineWeb's schema, it is prepared there first, e.g.
#   PARQUET=.device_data/en_docs_part.parquet DATA_DIR=/tmp/fineweb bash benchmarks/gpu_proof.sh "$OUT"
# RESULTS_DIR (default $OUT, else gpu_proof_results) gets gpu_proof.log, the run's metrics.jsonl,
# loss_40m.png and the gzipped profiler traces; checkpoints stay in /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${1:-${OUT:-gpu_proof_results}}
DATA_DIR=${DATA_DIR:-data/fineweb}
RUN_DIR=${RUN_DIR:-/tmp/gpu_proof_run_40m}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_proof.log") 2>&1

$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_proof.sh needs a CUDA GPU')"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

recipe_comparison() {  # AdamW vs Muon vs Muon + document rows, softcap, zero head, Muon's own decay
  echo
  echo "== the per-token recipe at 40M: benchmarks/ablation.py --study=gpu (three runs of 32.8M tokens)"
  rm -rf "$RUN_DIR-recipe"
  $PY benchmarks/ablation.py --study=gpu --data_dir="$DATA_DIR" --device=cuda --dtype=bfloat16 --compile=True \
    --jobs=1 --out_root="$RUN_DIR-recipe" --table="$RESULTS/ablation-gpu.md"
}

if [ ! -f "$DATA_DIR/train.bin" ]; then
  if [ -z "${PARQUET:-}" ]; then
    echo "error: $DATA_DIR/train.bin not found; set DATA_DIR to prepared bins or PARQUET to a parquet file" >&2
    exit 2
  fi
  echo "== preparing $PARQUET into $DATA_DIR"
  $PY data/fineweb/prepare.py --input "$PARQUET" --out_dir "$DATA_DIR"
fi

if [ "${RECIPE:-1}" = only ]; then
  recipe_comparison
  exit 0
fi

attention_kernels() {  # which fused attention kernels a trace shows (flash, cuDNN, memory-efficient)
  grep -o -i -E "flash_attention|flash_fwd|flash_bwd|cudnn_attention|efficient_attention" "$1" | sort | uniq -c || true
}

for cfg in train_fineweb train_fineweb_124m; do
  for chunked in True False; do  # the default loss, then the full logits: tokens/s, MFU and memory side by side
    echo
    echo "== bench.py config/$cfg.py --chunked_loss=$chunked: bf16, compile, fused AdamW, synthetic tokens"
    trace="$RESULTS/trace_${cfg}_chunked_$chunked.json"
    TORCH_LOGS=graph_breaks $PY bench.py "config/$cfg.py" --dtype=bfloat16 --compile=True --chunked_loss=$chunked \
      --bench_warmup=5 --bench_iters=20 --profile=True --profile_file="$trace" | grep -v "^USDT"
    echo "attention kernels in the profile:"
    attention_kernels "$trace"
    gzip -f "$trace"
  done
done

echo
echo "== bench.py --fit_memory=11GiB for the 124M model: a 12 GB card less its CUDA context and display"
echo "   (eager: compiled kernels need less memory, so this errs on the safe side)"
$PY bench.py config/train_fineweb_124m.py --dtype=bfloat16 --compile=False --fit_memory=11GiB

echo
echo "== a short real training run of the 40M model (65,536 tokens/iter, 300 iterations, ~20M tokens)"
rm -rf "$RUN_DIR"
$PY train.py config/train_fineweb.py --data_dir="$DATA_DIR" --out_dir="$RUN_DIR" --dtype=bfloat16 --compile=True \
  --batch_size=16 --gradient_accumulation_steps=4 --max_iters=300 --lr_decay_iters=300 --warmup_iters=30 \
  --learning_rate=1e-3 --min_lr=1e-4 --eval_interval=100 --eval_iters=20 --log_interval=10
cp "$RUN_DIR/metrics.jsonl" "$RESULTS/metrics_40m.jsonl"
$PY plot.py "$RUN_DIR" --out="$RESULTS/loss_40m.png" --title="40M, H200 proof run: 300 iterations"
$PY - "$RUN_DIR/metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
logs = [r for r in records if "loss" in r]
print("val loss by iteration:", ", ".join(f"{i}: {v:.3f}" for i, v in val))
last = logs[-1]
print(f"last logged: {last['tokens_per_sec']:,.0f} tokens/s, MFU "
      + (f"{last['mfu'] * 100:.1f}%" if last["mfu"] is not None else "unknown")
      + (f", peak memory {last['peak_mem_gib']:.2f} GiB" if last["peak_mem_gib"] is not None else ""))
ok = val[-1][1] < val[0][1] - 2.0
print("loss goes down:", "yes" if ok else "NO")
sys.exit(0 if ok else 1)
EOF

if [ "${RECIPE:-1}" != 0 ]; then
  recipe_comparison
fi
