#!/usr/bin/env bash
# The whole check for a lent GPU, as one command from the checkout (no install, no network, Ray optional):
# the machine's facts, benchmarks/gpu.py (its arguments are passed on), then the kernel tests on the GPU.
# Logs go to $OUT (the device tool's folder) or ./gpu-check; exits non-zero if either part failed.
#
#     bash benchmarks/gpu_check.sh             # on the GPU machine
#     bash benchmarks/gpu_check.sh --dry-run   # here, without one: kernel interpreted, merges on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu-check}
mkdir -p "$logs"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
  echo "cpus $(nproc); $(free -g | awk '/Mem/ {print $2 " GiB memory"}'); /tmp: $(df -h /tmp | awk 'NR==2 {print $4 " free"}')"
  "$python" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$logs/machine.log"

"$python" benchmarks/gpu.py "$@" 2>&1 | tee "$logs/gpu.log"
bench=$?
# The kernel tests: on the GPU where there is one (interpreted otherwise); the dry-run test is the above, so skipped.
timeout 300 "$python" -m pytest -q -p no:cacheprovider tests/test_triton.py -k "not dry_run" 2>&1 | tee "$logs/tests.log"
tests=$?
echo "gpu.py exit $bench, tests exit $tests"
[ "$bench" = 0 ] && [ "$tests" = 0 ]
