#!/usr/bin/env bash
# The GPU check (`make gpu-check`): the card, every gpu-marked test of tests/, then the GPU
# benchmark, whose table comes last. Without CUDA the GPU tests skip and the benchmark runs
# its CPU cells only, saying that the GPU parts were skipped; the check still exits 0.
#
#   bash tests/gpu/gpu_check.sh [--cpu-smoke] [--output FILE]
#
#   --cpu-smoke  only the benchmark's quick CPU cells, in seconds (a test runs this)
#   --output     the JSON report (default gpu-check.json); when $OUT is set, the report,
#                pytest's junit XML and this whole log are copied there too
#
# HINGELOSS_PYTHON picks the interpreter (default .venv/bin/python, else python3); client/
# and server/ go on PYTHONPATH, so an interpreter without `pip install -e .` works too.
# Each step runs under `timeout` (GPU_CHECK_PYTEST_TIMEOUT, GPU_CHECK_BENCH_TIMEOUT, in
# seconds): the whole check ends within five minutes.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 2

smoke=0
output=gpu-check.json
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --output) output=${2:?--output needs a file}; shift ;;
    --output=*) output=${1#--output=} ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

tee_pid=
if [ -n "${OUT:-}" ] && [ "$smoke" = 0 ]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/gpu-check.log") 2>&1
  tee_pid=$!
fi

py=${HINGELOSS_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root/client:$root/server${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
work=$(mktemp -d "${TMPDIR:-/tmp}/hingeloss-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

# What this interpreter can import: the check needs the core; the deployment tests and the
# proto drift test need more, and hold no GPU test, so they are left out where it is missing.
# Bounded: an import that hangs (a driver that does not answer) fails the check, not the lease.
if ! timeout -k 5 "${GPU_CHECK_PREFLIGHT_TIMEOUT:-120}" "$py" - >"$work/preflight" <<'EOF'; then
import importlib
import sys

core = [
    "torch", "numpy", "grpc", "google.protobuf", "grpc_status", "grpc_health.v1",
    "grpc_reflection", "prometheus_client", "pytest", "pytest_asyncio", "pytest_timeout",
    "hypothesis", "hingeloss", "hingeloss_server", "hingeloss.v1.loss_service_pb2",
]
optional = {
    "tests/deploy": ["yaml", "jsonschema", "kubernetes_validate", "yamllint"],
    "tests/integration/test_lifecycle.py": ["grpc_tools"],
    "tests/integration/test_security.py": ["trustme"],
}


def missing(module):
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a stub refusing an old runtime
        return f"{module} ({type(error).__name__}: {error})"
    return None


broken = [m for m in map(missing, core) if m]
for line in broken:
    print(f"missing {line}")
for path, modules in optional.items():
    lacking = [m for m in map(missing, modules) if m]
    if lacking:
        print(f"ignore {path} {'; '.join(lacking)}")
if not broken:
    import torch

    print(f"torch {torch.__version__} {sys.executable}")
    print(f"cuda {int(torch.cuda.is_available())}")
sys.exit(1 if broken else 0)
EOF
  echo "gpu_check.sh: $py cannot run the check:"
  sed -n 's/^missing /  missing /p' "$work/preflight"
  echo "Install the project (make install), or on a machine without network carry the"
  echo "missing packages as wheels and put them on PYTHONPATH."
  exit 3
fi
cuda=$(sed -n 's/^cuda //p' "$work/preflight")
echo "== interpreter: $(sed -n 's/^torch //p' "$work/preflight")"
# A GPU that this torch cannot use would make every GPU test skip: a green check that ran
# nothing on the GPU. Refuse instead (the usual cause: .venv holds the CPU build of torch).
gpus=$(timeout -k 2 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ "$smoke" = 0 ] && [ "$cuda" != 1 ] && [ "${gpus:-0}" -gt 0 ]; then
  echo "gpu_check.sh: nvidia-smi lists ${gpus} GPU(s), but the torch of $py cannot use CUDA"
  echo "($(sed -n 's/^torch //p' "$work/preflight")). Install a CUDA build of torch"
  echo "(make install TORCH_SPEC=\"torch==... --index-url ...\"), or point HINGELOSS_PYTHON"
  echo "at an interpreter that has one (see docs/gpu.md)."
  exit 4
fi
ignores=()
while read -r path reason; do
  echo "== not collected (no GPU tests there): $path, missing $reason"
  ignores+=("--ignore=$path")
done < <(sed -n 's/^ignore //p' "$work/preflight")

copy_out() {
  if [ -n "${OUT:-}" ] && [ "$smoke" = 0 ]; then
    cp -f "$output" "$OUT/gpu-check.json" 2>/dev/null
    cp -f "$work/gpu-pytest.xml" "$OUT/gpu-pytest.xml" 2>/dev/null
  fi
  return 0
}

finish() {
  local status=$1
  copy_out
  echo "== gpu_check.sh: exit $status"
  if [ -n "$tee_pid" ]; then
    exec >&- 2>&-
    wait "$tee_pid"
  fi
  exit "$status"
}

if [ "$smoke" = 1 ]; then
  timeout -k 5 60 "$py" tests/gpu/bench_gpu.py --quick --device cpu --output "$output"
  finish $?
fi

if [ "$cuda" = 1 ]; then
  echo "== nvidia-smi -L"
  nvidia-smi -L || echo "(nvidia-smi is not available)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.memory \
    --format=csv 2>/dev/null || true
else
  echo "== no CUDA device: the GPU tests skip and the benchmark runs its CPU cells only"
fi

# Every test of tests/gpu is marked gpu by its folder; test_gpu_check_script.py checks this
# script itself on the CPU (`make test` runs it), so it is left out here.
echo "== pytest -m gpu tests"
timeout -k 10 "${GPU_CHECK_PYTEST_TIMEOUT:-140}" "$py" -m pytest -m gpu tests \
  -p no:cacheprovider --timeout 90 --continue-on-collection-errors \
  --ignore=tests/gpu/test_gpu_check_script.py \
  --junitxml "$work/gpu-pytest.xml" "${ignores[@]}"
pytest_rc=$?
case $pytest_rc in
  0 | 5) ;;
  124 | 137) echo "== pytest timed out after ${GPU_CHECK_PYTEST_TIMEOUT:-140}s" ;;
  *) echo "== pytest failed (exit $pytest_rc)" ;;
esac

echo "== GPU benchmark"
timeout -k 10 "${GPU_CHECK_BENCH_TIMEOUT:-160}" "$py" tests/gpu/bench_gpu.py \
  --output "$output" --pytest-junit "$work/gpu-pytest.xml" --pytest-exit-code "$pytest_rc"
bench_rc=$?
case $bench_rc in
  0) ;;
  124 | 137) echo "== the benchmark timed out; $output holds the sections it finished" ;;
  *) echo "== the benchmark reported problems (exit $bench_rc); see PROBLEM lines and $output" ;;
esac

if [ "$pytest_rc" != 0 ] && [ "$pytest_rc" != 5 ]; then finish 1; fi
finish $((bench_rc == 0 ? 0 : 1))
