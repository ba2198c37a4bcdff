#!/usr/bin/env bash
# Everything the GPU figures of BENCHMARKS.md come from, on one lent GPU, writing to $OUT (default ./gpu-out):
# the CUDA tests, the fused kernels' checks, the memory update at growing lengths (eager and from its CUDA graph),
# its kernel profile (`vstream bench profile`), and `vstream bench all` (ceilings, answer, encode, memory, streams,
# profile) in the flash-vstream-7b shapes, in one process with one model load.
# Usage: bash benchmarks/gpu.sh [parts...]   e.g. bash benchmarks/gpu.sh answer profile
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python -m pytest -q -p no:cacheprovider tests/kernel_checks.py tests/test_gpu.py > "$OUT/tests.txt" 2>&1; tail -4 "$OUT/tests.txt"
for graph in --no-cuda-graph --cuda-graph; do
  python -m vstream bench memory --preset flash-vstream-7b --device cuda --lengths 100,1000,10000 --repeats 200 \
    $graph --json > "$OUT/memory_update$graph.json"
done
python -m vstream bench profile > "$OUT/profile_memory.txt" 2>&1
parts=${*:-ceilings answer encode memory streams profile}
python -m vstream bench all --preset flash-vstream-7b --device cuda --out "$OUT" --parts "${parts// /,}" \
  --counts 16,32,64,96,128 2>&1 | grep -v "Loading weights" | tee "$OUT/all.log"
