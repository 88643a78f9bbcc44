#!/usr/bin/env bash
# The H200 machine's software on this CPU machine, before spending device minutes on it:
# torch 2.11 + triton 3.6 (numpy < 2.4), pytest, no Hugging Face stack, the extension
# built for 9.0a only as bench/gpu_check.sh builds it; then the whole suite on the CPU
# (Triton under the interpreter), the Triton report for sm_90a, and a summary.
#
#   bash bench/rehearse_gpu_stack.sh            # about 15 min the first time, 10 after
#
# Works in a clone of HEAD under $WORK (default ~/.cache/omoe-gpu-stack), so this checkout's
# build for the newer torch stays as it is. $WORK/venv is kept between runs. What the
# versions found the first time (a C++20 header, the 9.0a-only build, tests needing the
# HF stack): bench/NOTES.md, "The whole GPU machine's stack, rehearsed".
set -uo pipefail

WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/omoe-gpu-stack}
REPO=$(git rev-parse --show-toplevel)
VENV=$WORK/venv
PY=$VENV/bin/python
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$WORK"

if ! "$PY" -c 'import torch, triton, sys; sys.exit(not (torch.__version__.startswith("2.11.") and triton.__version__.startswith("3.6.")))' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$PY" -m pip install --quiet torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest pytest-benchmark \
    pytest-timeout hypothesis expecttest safetensors ninja setuptools wheel || exit 1
fi

rm -rf "$WORK/repo" && git clone --quiet "$REPO" "$WORK/repo" && cd "$WORK/repo" || exit 1
export PYTHONPATH=$PWD   # built in place, not installed (as gpu_check.sh): subprocesses too
echo "rehearsal of $(git rev-parse --short HEAD): $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"

status=0
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1 \
  || { echo "build: FAILED (tail of $WORK/build.log below)"; tail -n 30 "$WORK/build.log"; exit 1; }
echo "build: ok"
TORCH_CUDA_ARCH_LIST=9.0a "$PY" -m pytest -q -p no:cacheprovider python_tests -rfEs >"$WORK/tests.log" 2>&1 || status=1
echo "tests: $(tail -n 1 "$WORK/tests.log")"
grep -E "^(FAILED|ERROR)" "$WORK/tests.log"
"$PY" -m omoe_kernels.tools.kernel_report --arch sm_90a >"$WORK/kernel_report.log" 2>&1 || status=1
echo "kernel_report (triton 3.6): $(tail -n 1 "$WORK/kernel_report.log")"
echo "logs: $WORK/{build,tests,kernel_report}.log"
exit $status
