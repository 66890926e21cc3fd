#!/usr/bin/env bash
# The GPU benchmarks, in one go, on the first CUDA device:
#   extraction (top-k on device vs full logits to host), the sparse loss, and a training step.
# Usage: bash benchmarks/run_gpu.sh [OUTPUT_DIR]   (each benchmark's log lands in OUTPUT_DIR)
set -uo pipefail
out=${1:-gpu-bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0
for bench in "bench_extract.py --size 1b --pieces 16 --batch-size 4" \
             "bench_loss.py --device cuda --repeats 10" \
             "bench_train_step.py --device cuda --size 1b"; do
  name=${bench%%.py*}
  echo "== $bench"
  timeout 240 $py benchmarks/$bench 2>&1 | tee "$out/$name.log" || status=1
done
exit $status
