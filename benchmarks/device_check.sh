#!/usr/bin/env bash
# The device check, in one command on a machine with a CUDA GPU (about 5 minutes of GPU time):
#
#   WHEELS=.whl OUT=/tmp/out bash benchmarks/device_check.sh [--model NAME | --random-weights] [...]
#
# 1. installs what the machine lacks from the wheel folder $WHEELS (no index: nothing is downloaded;
#    offramp itself runs from this checkout's src/);
# 2. runs the gpu tests (pytest -m gpu), their JUnit file in $OUT/gpu_tests.xml;
# 3. runs benchmarks/device_check.py: classify bench (overhead, realised / ideal at batch 1 and 32),
#    and decoding at batch 1 (plain HF generate, the engine, self-speculation, HF assistant_early_exit)
#    on SmolLM2-135M-Instruct (--model; --random-weights where the weights cannot be had), every ratio
#    against the plain model on the same GPU in the same run; writes $OUT/device_check.json.
# Arguments go to device_check.py. DEVICE=cpu runs the same on the CPU (a smoke check of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/offramp-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/offramp-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ "$DEVICE" != cpu ]; then
    python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
                'no CUDA GPU visible to torch ' + torch.__version__ + ': run on a GPU machine, or DEVICE=cpu')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
status=0
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="" \
    --junitxml "$OUT/gpu_tests.xml" || status=$?
timeout 420 python3 benchmarks/device_check.py --device "$DEVICE" --tests-xml "$OUT/gpu_tests.xml" \
    --json "$OUT/device_check.json" "$@"
exit $status
