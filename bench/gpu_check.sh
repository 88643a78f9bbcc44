#!/usr/bin/env bash
# The GPU check, in two stages sized for a 15-minute device lease (at most 10 per call).
#
#   OUT=/some/dir bash bench/gpu_check.sh            # stage 1 (run it first, on its own)
#   OUT=/some/dir bash bench/gpu_check.sh 2          # stage 2, in a second call
#   bash bench/gpu_check.sh --dry-run                # stage 1 on a CPU: interpreter, tiny shapes
#
# Stage 1 (at most 6 minutes; bench/README.md, "The GPU check", gives the time of each
# part): no build and no test suite; fixed launch configs; `python -m bench.gpu_stage1`
# (accuracy per dtype, the step of triton / plain LoRA / peft-style LoRA by do_bench and
# CUDA-graph replay, per-kernel µs from torch.profiler, dZ with and without G, the
# per-token kernels at two program sizes) writes $OUT/bench/results/<card>.{md,json};
# then the host time per step and the kernel report on the machine's own triton.
# Stage 2: the autotuned benchmark at the three shapes, the CUDA extension built in place
# with its GPU tests, and torch.compile(reference) at llama7b.
#
# At most 8 files come back from $OUT: gpu_check.log (environment and every part's
# summary), stage1.log or stage2.log, and the stage's result files.
set -u
set -o pipefail

STAGE=1
DRY=""
for arg in "$@"; do
  case $arg in
    1|2) STAGE=$arg ;;
    --dry-run) DRY="--dry-run" ;;
    *) echo "usage: bash bench/gpu_check.sh [1|2] [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT/bench/results"
if [[ $STAGE == 1 ]]; then BUDGET_S=${GPU_CHECK_BUDGET_S:-360}; else BUDGET_S=${GPU_CHECK_BUDGET_S:-540}; fi
START=$(date +%s)
PY=${PYTHON:-python3}
SUMMARY="$OUT/gpu_check.log"
LOG="$OUT/stage$STAGE.log"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"

note() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# run_part NAME SECONDS CMD...: runs CMD under timeout, at most the budget left.
run_part() {
  local name=$1 want=$2; shift 2
  local avail; avail=$(left)
  local limit=$(( want < avail ? want : avail ))
  if (( limit < 5 )); then note "$name: skipped, budget spent"; return 1; fi
  note "$name: start (limit ${limit}s)"
  echo "===== $name: $*" >>"$LOG"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  if (( rc == 124 || rc == 137 )); then note "$name: TIMED OUT after ${limit}s (rc $rc)"
  else note "$name: rc $rc"; fi
  return $rc
}

note "gpu_check stage $STAGE ${DRY}: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S}s, repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
{
  [[ -z $DRY ]] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)'
} >>"$SUMMARY" 2>&1

if [[ $STAGE == 1 ]]; then
  # Fixed configs: autotuning would compile about 70 configs (stage 2 does it).
  export OMOE_TRITON_FIXED_CONFIG=1
  run_part stage1 $(( BUDGET_S - 40 )) "$PY" -m bench.gpu_stage1 $DRY \
    --budget-s $(( BUDGET_S - 70 )) --out "$OUT/bench/results"
  grep -E '^\[stage1\]|^\| (triton|lora|peft-lora|fp32|bf16|fp16) ' "$LOG" | sed 's/^/  stage1| /' >>"$SUMMARY"
  # The host side of a step on this machine's CPU, launches stubbed (seconds).
  run_part host_time 30 "$PY" -m omoe_kernels.tools.launch_count --host --repeats 50
  grep "host µs per step" "$LOG" | sed 's/^/  host| /' >>"$SUMMARY"
  if [[ -z $DRY ]]; then
    # The compiler's view on this machine's triton, if time is left (its own cache is cold).
    run_part kernel_report 45 "$PY" -m omoe_kernels.tools.kernel_report --only "wide]"
    grep -E "^\| wide|^OK|^FAIL" "$LOG" | tail -n 4 | sed 's/^/  kernel_report| /' >>"$SUMMARY"
  fi
else
  unset OMOE_TRITON_FIXED_CONFIG
  # 1. The autotuned benchmark (no torch.compile: that is part 3, at one shape).
  run_part bench_autotuned 200 "$PY" -m bench.bench_omoe --shapes llama7b,llama7b-top2,wide \
    --providers triton,lora --no-memory --out "$OUT/bench/results/autotuned"
  # 2. The CUDA extension, built in place, and its GPU tests.
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} OMOE_BUILD_CUDA=1
  run_part build 200 "$PY" setup.py build_ext --inplace
  run_part tests_cuda 90 env OMOE_TEST_DEVICE=cuda OMOE_TRITON_FIXED_CONFIG=1 "$PY" -m pytest -q \
    -p no:cacheprovider python_tests/test_cuda_backend.py python_tests/test_triton.py \
    python_tests/test_host_path.py -x -rfEs
  # 3. torch.compile(reference) against the fused backends at one shape.
  run_part bench_compile 120 "$PY" -m bench.bench_omoe --shapes llama7b \
    --providers triton,cuda,ref-compile,lora --no-memory --out "$OUT/bench/results/compile"
  tail -n 30 "$LOG" | sed 's/^/  stage2| /' >>"$SUMMARY"
fi
note "gpu_check stage $STAGE: done in $(( $(date +%s) - START ))s"
