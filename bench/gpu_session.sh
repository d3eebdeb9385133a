#!/usr/bin/env bash
# The GPU checks of issues 11 and 12 in two commands, each within a lent GPU's 10-minute command limit:
#
#   bash bench/gpu_session.sh tests   # gpu-marked tests of every schedule (and the graphed path's)
#   bash bench/gpu_session.sh bench   # bench/gpu.py: dense, zoo and columns suites, bf16
#   bash bench/gpu_session.sh dry     # without a GPU: the same plumbing, logs and versions, on the
#                                     # interpreter (bench/gpu.py --dry-run; the gpu tests collected)
#
# Each writes its log, with the machine's versions first, to $OUT (the folder a device command's files
# come back from) or, without $OUT, to docs/results/gpu/session/. Commit the logs under
# docs/results/gpu/ with this command, and only then make a schedule a CUDA default
# (VERIFIED_ON_HARDWARE in celldsl/targets/triton/choice.py) for the tests that passed.
# STAGE_SECONDS (default 270) bounds each stage, so that both fit a 15-minute device budget with the
# machine's start-up; a stage that runs out says so in its log ("exit 124") with what it had done.
#
# Preparing (on the machine without a GPU, once, from the repository root): the GPU image has torch,
# triton, pytest, pytest-xdist and pytest-timeout but not lark, so carry its wheel:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .whl 'lark>=1.1.9' interegular
# and call the device tool's `run` with carry [".whl"] and, e.g., timeout_s 330:
#   bash bench/gpu_session.sh tests
# then, on the still warm machine, `bash bench/gpu_session.sh bench`. The tests stage compiles in 12
# processes (the machine has 16 cores); every test also has a watchdog that kills a hung kernel's
# process with a traceback (tests/test_triton_schedules_gpu.py). tests/test_bench_gpu_dryrun.py runs
# the dry stage in CI.
set -u -o pipefail
stage="${1:-}"
case "$stage" in
  tests|bench|dry) ;;
  *) echo "usage: bash bench/gpu_session.sh tests|bench|dry" >&2; exit 2 ;;
esac
limit="${STAGE_SECONDS:-270}"
python="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
logs="${OUT:-docs/results/gpu/session}"
mkdir -p "$logs"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export CELLDSL_CACHE=/tmp/celldsl-cache TRITON_CACHE_DIR=/tmp/triton-cache PYTHONUNBUFFERED=1
mkdir -p -m 700 "$CELLDSL_CACHE"
unset TRITON_INTERPRET
if [ "$stage" = dry ]; then
  export CELLDSL_CACHE="${TMPDIR:-/tmp}/celldsl-dry-cache-$$"
  mkdir -p -m 700 "$CELLDSL_CACHE"
fi

versions() {
  echo "# $(date -u +%FT%TZ) bash bench/gpu_session.sh $stage"
  echo "# commit $(git rev-parse HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | sed 's/^/# /'
  "$python" -c "import torch, triton; print('# torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'triton', triton.__version__)"
}

if [ "$stage" = tests ]; then
  log="$logs/gpu_tests_schedules.log"
  { versions; echo; } > "$log"
  timeout "$limit" "$python" -m pytest -q -m gpu -n 12 -p no:cacheprovider --timeout=600 --timeout-method=thread \
    -rs tests/test_triton_schedules_gpu.py tests/test_triton_gpu.py 2>&1 | tee -a "$log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
elif [ "$stage" = bench ]; then
  log="$logs/bench_schedules.md"
  { versions; echo; echo '```'; echo "python bench/gpu.py --jobs 12 --warmup 2 --repeats 5"; echo '```'; echo; } > "$log"
  timeout "$limit" "$python" bench/gpu.py --jobs 12 --warmup 2 --repeats 5 2>&1 | tee -a "$log"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
else
  log="$logs/dry_run.log"
  { versions; echo; } > "$log"
  status=0
  timeout "$limit" "$python" -m pytest -q -p no:cacheprovider -m gpu --collect-only \
    tests/test_triton_schedules_gpu.py tests/test_triton_gpu.py 2>&1 | tail -3 | tee -a "$log" || status=1
  timeout "$limit" "$python" bench/gpu.py --dry-run 2>&1 | tee -a "$log" || status=1
  rm -rf "$CELLDSL_CACHE"
  echo "exit $status" | tee -a "$log"
  exit "$status"
fi
