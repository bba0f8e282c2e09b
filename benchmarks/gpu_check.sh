#!/usr/bin/env bash
# The scale-out issue's GPU check: one prepared script for the device machine (one H100, sized to run in
# under 8 minutes; not yet run on one). On a SmolLM2-135M-shaped model with random weights (the packaged
# checkpoint is larger than a device call carries; speeds do not depend on the weights):
#   1. benchmarks/gpu_check.py: mergemix's training loop in bf16 autocast against float32 (tokens/s, peak
#      memory), and the in-place merge of 4 experts against a device copy of the same bytes (bandwidth);
#   2. benchmarks/scoring_speed.py --device cuda: mergemix's multiple-choice scorer against lm-eval on the
#      same items, batch and model (items/s ratio, item-by-item agreement).
# Each runs in its own process, so one failing leaves the other's figures. Figures and logs go to $OUT (the
# device tool's folder) or /tmp/gpu-check.
#
# The device's image has torch, transformers, accelerate, peft, safetensors, numpy, pandas, but not pydantic,
# datasets or lm-eval: their wheels (14 MB, for its Python 3.12) travel in .whl/, which git ignores:
#   here, once:   bash benchmarks/gpu_check.sh --wheels
#   the device:   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# datasets 5.2 needs pyarrow >= 24 and fsspec <= 2026.9 from the image (pyarrow's wheel, 53 MB, does not fit
# beside the others): if `import datasets` fails there, the scorer's check says so and the first one stands.
set -uo pipefail
cd "$(dirname "$0")/.."

# what mergemix and lm-eval import that the device's image lacks, at the versions the tests here run with
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 datasets==5.2.0
        dill==0.4.1 multiprocess==0.70.19 lm-eval==0.4.13 chardet==6.0.0.post1 pytz==2026.6)

if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi

out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
base=/tmp/gpu-check-base
timeout 300 python3 benchmarks/gpu_check.py --save "$base" --out "$out" 2>&1 | tee "$out/train_merge.log"
timeout 180 python3 benchmarks/scoring_speed.py --base "$base" --device cuda --items 400 --batch-size 32 \
    --repeats 3 2>&1 | tee "$out/scoring.log"
