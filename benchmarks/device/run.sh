#!/usr/bin/env bash
# Run THERE, on the lent GPU machine (prepared by prepare.sh): installs what its image lacks, runs the
# GPU tests, the joint-training benchmark and the quantised-base (QLoRA) benchmark on a model of
# SmolLM2-135M's shape, and leaves logs and results in $OUT. One command, about 8 minutes; every step's
# output is kept even if a later one fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD" FEDTUNE_CACHE=/tmp/fedtune-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|safetensors|pydantic|tokenizers|bitsandbytes) '
} > "$OUT/setup.log" 2>&1
python3 benchmarks/device/shape_twin.py --weights .device/smollm2-shape >> "$OUT/setup.log" 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/models/test_device.py \
  tests/models/test_quantised.py tests/client/test_joint_training.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/tests.log"
timeout 300 python3 benchmarks/multi_adapter.py --model .device/smollm2-shape --clients 8 --steps 5 --repeats 3 \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
cp benchmarks/results/multi_adapter.json "$OUT/multi_adapter_gpu.json" 2>/dev/null
timeout 150 python3 benchmarks/qlora.py --device cuda --model .device/smollm2-shape --steps 5 --repeats 1 \
  > "$OUT/qlora.log" 2>&1
echo "qlora rc=$?" >> "$OUT/qlora.log"
cp benchmarks/results/qlora_cuda.json "$OUT/qlora_gpu.json" 2>/dev/null
tail -n 5 "$OUT"/*.log
