#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU, nvcc, ninja, torch and Triton and no network:
#   1. builds kdfast in place with its CUDA kernels (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST of the GPU),
#   2. runs tests/test_cuda.py,
#   3. runs bench/gpu_check.py: copy bandwidth, softmax-KL forward+backward against eager PyTorch,
#      torch.compile and Liger-Kernel (from .whl/*.whl when that folder is there), generalized JSD
#      (beta 0.5) and reverse KL against TRL's formula, its torch.compile and LigerJSD, kdfast's kernel
#      configurations, rkd_loss at N = 8192, and each contender's launches per step (kernels on the GPU,
#      top-level ATen calls) in the launch-bound cases; writes bench/results/gpu-<GPU>.json (and to $OUT if set).
# Each stage has its own time limit and runs whatever happened before it; the whole script stays
# under 8 minutes (GPU_CHECK_BUDGET seconds, default 430). Without a GPU it builds (sm_90, as a
# compile check) and skips the rest, saying so. The last thing printed is a short table.
#   PYTHON=python3 bash bench/gpu_check.sh
# .whl/ (gitignored) holds the wheels that travel with the tree: liger-kernel, and pytest, iniconfig,
# pluggy, pygments, packaging, expecttest for images without them. Fetch them on a machine with network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     -d .whl liger-kernel packaging pytest iniconfig pluggy pygments expecttest
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-430}
LOGS=${GPU_CHECK_LOGS:-$ROOT/bench/out/gpu_check}
mkdir -p "$LOGS"
TABLE=$LOGS/table.txt
rm -f "$TABLE"
SUMMARY=()

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  # a development checkout without torch in the system Python: use the CUDA venv if there is one
  if ! "$PYTHON" -c 'import torch' 2>/dev/null && [ -x "$ROOT/.venv-cuda/bin/python" ]; then
    PYTHON=$ROOT/.venv-cuda/bin/python
  fi
fi

left() { echo $(( BUDGET - (SECONDS - START) )); }

# stage NAME CAP RESERVE LOG COMMAND...: runs COMMAND with a limit of min(CAP, time left - RESERVE)
# seconds, its output to LOG (or to the console when LOG is -).
stage() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local limit
  limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, out of time"
    SUMMARY+=("$name: skipped (out of time)")
    return 124
  fi
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS rc=0
  if [ "$log" = - ]; then
    timeout --kill-after=15 "$limit" "$@" || rc=$?
  else
    timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1 || rc=$?
  fi
  local took=$(( SECONDS - t0 ))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("$name: ok (${took} s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    SUMMARY+=("$name: TIMED OUT after ${took} s")
  else
    SUMMARY+=("$name: FAILED rc=$rc (${took} s)")
  fi
  echo "-- $name: rc=$rc, ${took} s"
  return $rc
}

echo "== environment"
"$PYTHON" - <<'EOF' || true
import platform, shutil, subprocess
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for tool in ("nvcc", "ninja"):
    path = shutil.which(tool)
    print(tool, path, subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:] if path else "")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true

GPU=$("$PYTHON" -c 'import torch; print(1 if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$GPU" = 1 ]; then
  ARCHS=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print(";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))')}
else
  ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0}
fi

# 1. build in place (kdfast/_C*.so next to the sources; build/ keeps ninja's objects for a rerun)
stage "build (KDFAST_CUDA=1, TORCH_CUDA_ARCH_LIST=$ARCHS)" 200 230 "$LOGS/build.log" \
  env KDFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PYTHON" setup.py -q build_ext --inplace
BUILD_RC=$?
if [ "$BUILD_RC" = 0 ]; then tail -n 3 "$LOGS/build.log"; else grep -E "error|Error" "$LOGS/build.log" | head -n 30; tail -n 30 "$LOGS/build.log"; fi
"$PYTHON" -c 'import kdfast, json; i = kdfast.build_info(); print("build_info:", json.dumps({k: i.get(k) for k in ("torch", "cuda", "cuda_archs", "cpu_isa_selected", "extension_loaded")}))' || true

if [ "$GPU" != 1 ]; then
  echo "== no CUDA device visible: CUDA tests and GPU benchmarks SKIPPED (build checked only)"
  SUMMARY+=("CUDA tests: skipped (no GPU)" "GPU benchmarks: skipped (no GPU)")
else
  # Wheels from the local folder .whl/ (no network): Liger-Kernel first on the path; pytest and the
  # pure-Python packages it and Liger need only where the image lacks them (last on the path).
  # pip when the image has it; a wheel is a zip file, so unpacking it is the fallback.
  SITE=$(mktemp -d /tmp/kdfast-site.XXXXXX)
  FALLBACK=$(mktemp -d /tmp/kdfast-site-fallback.XXXXXX)
  install_wheel() {
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$2" "$1" 2>/dev/null ||
      "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
  }
  for pkg in packaging pytest iniconfig pluggy pygments expecttest; do
    if ! "$PYTHON" -c "import $pkg" 2>/dev/null; then
      for w in "$ROOT"/.whl/"$pkg"-*.whl; do [ -f "$w" ] && install_wheel "$w" "$FALLBACK"; done
    fi
  done
  if ls "$ROOT"/.whl/liger_kernel-*.whl >/dev/null 2>&1; then
    for w in "$ROOT"/.whl/liger_kernel-*.whl; do install_wheel "$w" "$SITE"; done
  else
    echo "== no .whl/liger_kernel-*.whl: Liger-Kernel is skipped"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}:$FALLBACK"

  # 2. CUDA tests
  stage "tests/test_cuda.py" 170 140 "$LOGS/tests.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfs --durations=8 tests/test_cuda.py
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -n 40
  grep -E "^E  " "$LOGS/tests.log" | head -n 40  # the failures' messages (the summary cuts them short)
  tail -n 22 "$LOGS/tests.log"
  # kdfast.distributed on NCCL (one rank per GPU)
  stage "tests/test_distributed.py nccl" 60 100 "$LOGS/tests_nccl.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfs tests/test_distributed.py -k nccl
  tail -n 12 "$LOGS/tests_nccl.log"
  # The first few failures again with dynamo's internal stack (torch.compile errors are otherwise
  # one cut-off line), into failed_verbose.log, which travels back with $OUT.
  FAILED_IDS=$(grep -E "^FAILED " "$LOGS/tests.log" | awk '{print $2}' | sort -u | head -n 3)
  if [ -n "$FAILED_IDS" ]; then
    # shellcheck disable=SC2086
    stage "failed tests again, verbose" 60 200 "$LOGS/failed_verbose.log" \
      env TORCHDYNAMO_VERBOSE=1 "$PYTHON" -m pytest -q -p no:cacheprovider --tb=long $FAILED_IDS
    grep -E "^E  " "$LOGS/failed_verbose.log" | head -n 20
  fi

  # 3. benchmarks (they measure the build from step 1, whatever the tests said)
  BENCH_LIMIT=$(( $(left) - 10 ))
  stage "gpu_check.py benchmarks" 300 10 - \
    "$PYTHON" bench/gpu_check.py --budget $(( BENCH_LIMIT - 25 )) --table-file "$TABLE"
fi

# The logs travel back with the device tool's $OUT (its printed output is cut to the last 12 KB).
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu_check_logs" && cp "$LOGS"/*.log "$OUT/gpu_check_logs/" 2>/dev/null
fi

echo
echo "== stages (total $((SECONDS - START)) s)"
for s in "${SUMMARY[@]}"; do echo "   $s"; done
echo
if [ -f "$TABLE" ]; then
  cat "$TABLE"
elif [ "$GPU" != 1 ]; then
  echo "kdfast GPU check: no CUDA device here; build $([ "$BUILD_RC" = 0 ] && echo ok || echo FAILED); GPU parts skipped"
else
  echo "kdfast GPU check: no benchmark table (see the stages above)"
fi
