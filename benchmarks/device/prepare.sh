#!/usr/bin/env bash
# Run HERE (a CPU machine with the package registry) before a session with a lent GPU: fills .device/
# (ignored by git, carried by the device tool: run's carry=[".device"]) with what the GPU machine lacks.
#   - wheels of fedtune's pure requirements missing from its image (pydantic, cryptography and theirs),
#     for its Python 3.12, and bitsandbytes for the quantised-base measurement;
#   - SmolLM2-135M-Instruct's config and tokenizer without weights (the model is 0.5 GB, the carry limit
#     64 MiB): run.sh gives it random weights there, which cost the same to train as the real ones.
# Then, with the device lent: run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
mkdir -p .device/wheels
pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/wheels "pydantic>=2.6" "cryptography>=42"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
  -d .device/wheels "bitsandbytes==0.50.2"  # model.quantization (QLoRA) on the GPU: 43 MB of the 64 MiB carry
python -c "from fedtune.models.loading import ensure_smollm2; ensure_smollm2()"
python benchmarks/device/shape_twin.py "$(python -c 'from fedtune.models.loading import cache_dir; print(cache_dir() / "models" / "smollm2-135m-instruct")')" .device/smollm2-shape
du -sh .device
