#!/usr/bin/env bash
# The figures a lent GPU machine (one H100/H200, 16 cores) gives, in one run under 10 min:
#   1. the MAE's training step in bf16 (mae_104m, 512 px): samples/s and MFU;
#   2. the data path at the node's cores, where a Ray Train worker receives it: the loader
#      benchmark's (w) contenders at 512 px (streaming, float32 and float16 physical units,
#      prepared shards) against the codec's limit, with the reader cores per GPU;
#   3. the GPU fed by the real data path: the same bf16 steps with batches from the
#      streaming pipeline (a TorchTrainer worker, the engine's DeviceShard): samples/s and
#      the share of each step spent waiting for data;
#   4. DDP over NCCL with two workers, when the machine has two GPUs.
# Usage (repository root, after `make venv`): bash bench/gpu_check.sh [OUT_DIR]
# Every part writes its output to OUT_DIR (default $OUT or /tmp/gpu_check) and the last
# line of each is one JSON line.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
PY=${PY:-.venv/bin/python}
CPUS=$(nproc)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
GPUS=$(nvidia-smi -L | wc -l)

echo "== 1. mae_104m bf16 training step (plain PyTorch)"
timeout 150 "$PY" bench/train_step.py --model mae_104m --img-size 0 --patch-size 0 \
  --batch 32 --precision bf16 --no-ray --steps 60 --warmup 10 | tee "$OUT/train_step.txt"

echo "== 2. the data path at $CPUS cores, at the Ray Train worker (512 px)"
timeout 300 "$PY" bench/loader.py --days 2 --resolution 512 --cpus "$CPUS" --samples 0 \
  --epochs 2 --warmup 1 --repeat 1 --object-store-gb 24 --root /tmp/sdofm-bench \
  --only a0,w,w16,wp --stores 15 | tee "$OUT/loader.txt"

echo "== 3. the GPU fed by the streaming pipeline"
timeout 150 "$PY" bench/train_step.py --model mae_104m --img-size 0 --patch-size 0 \
  --batch 32 --precision bf16 --steps 200 --warmup 10 \
  --data /tmp/sdofm-bench/r512-d2-aia12m-fpc15 --readers $((CPUS - 2)) | tee "$OUT/fed.txt"

if [ "$GPUS" -ge 2 ]; then
  echo "== 4. DDP over NCCL, two workers"
  timeout 150 "$PY" bench/train_step.py --model mae_104m --img-size 0 --patch-size 0 \
    --batch 32 --precision bf16 --steps 100 --warmup 10 --workers 2 \
    --data /tmp/sdofm-bench/r512-d2-aia12m-fpc15 --readers $((CPUS - 4)) | tee "$OUT/ddp.txt"
else
  echo "== 4. DDP over NCCL: skipped, one GPU" | tee "$OUT/ddp.txt"
fi
