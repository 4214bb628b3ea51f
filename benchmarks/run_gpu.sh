#!/usr/bin/env bash
# One GPU session: every test (kernels compiled on the GPU), then every benchmark, results under $OUT.
# Usage (repo root, on a machine with CUDA):  OUT=/tmp/gpu bash benchmarks/run_gpu.sh [tests|bench|all]
# Optional: TESTS="tests/kernels" (what pytest runs), BENCHES="attention lora" (which scripts), BENCH_TIMEOUT=300.
# Writes: $OUT/tests.log, $OUT/bench.log, $OUT/env.txt and $OUT/results.tar.gz (markdown tables + PNGs).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-results}
what=${1:-all}
mkdir -p "$OUT/results"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name())"
  python3 -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest ${TESTS:-tests} -q -n 8 -p no:cacheprovider --timeout 240 --durations=15 2>&1 | tee -a "$OUT/tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in ${BENCHES:-attention lora adamw layernorm cross_entropy engine train_step}; do
    [ -f "benchmarks/$b.py" ] || { echo "== $b: no script"; continue; }
    echo "== $b"
    timeout ${BENCH_TIMEOUT:-300} python3 "benchmarks/$b.py" --out "$OUT/results" 2>&1 | tail -60
  done 2>&1 | tee -a "$OUT/bench.log"
fi
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$OUT/results"
