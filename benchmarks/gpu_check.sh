#!/usr/bin/env bash
# The prepared command for the day a GPU is lent: in one call, the GPU tests, the fused-kernel benchmark
# (against device copy bandwidth), nnaccel's training steps against PyTorch in fp32, TF32 and bf16 (against
# autocast) with the share of the GEMM peak in each, and whole fit calls (CUDA graphs) against a PyTorch
# loop, with the machine's description, results (JSON) and logs in OUTDIR (8 files at most). Under
# 8 minutes on an H100/H200: each part has its own time limit, 470 s together; a bench part stopped
# by its limit (SIGTERM) still writes the configurations it measured, marked "stopped_early".
#
#   benchmarks/gpu_check.sh OUTDIR            # on the GPU machine, from the repository root or anywhere
#   PYTHONPATH=tests/cuda_standin benchmarks/gpu_check.sh --quick OUTDIR
#                                             # the dry run on the emulated device (tests/test_bench.py runs it)
#
# nnaccel runs from this checkout (PYTHONPATH), so nothing needs installing where nothing can be fetched.
# The exit status is 0 only when every part succeeded; the summary lines say which did not.
set -uo pipefail

quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
out=${1:?usage: benchmarks/gpu_check.sh [--quick] OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0

# part NAME SECONDS COMMAND...: run one part, its output to OUTDIR/NAME.log
part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most $limit s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "   $name: exit $status after $((SECONDS - start)) s"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
  [ "$status" = 0 ] || failed=1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git log -1 --format="commit %H %s" 2>/dev/null
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$python" -c "import sys, numpy; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
  "$python" -m nnaccel.cli info 2>&1
} >"$out/machine.txt"
grep -E "^(cupy|cuda:|GPU not usable|torch)" "$out/machine.txt" | sed 's/^/   /'

if [ "$quick" = 1 ]; then
  part gpu-tests 300 "$python" -m pytest -q -rfE -p no:cacheprovider -m gpu tests/test_cuda_kernels.py \
    -k "relu and float32"
  part fused-kernels 120 "$python" benchmarks/fused_kernels.py --rows 256 --cols 256 --repeat 3 \
    --json "$out/fused-kernels.json"
  part bench 300 "$python" -m nnaccel.cli bench --quick --devices cpu,cuda --compare torch --precision fp32,bf16 \
    --json "$out/bench.json"
  part fit 300 "$python" -m nnaccel.cli bench --fit --quick --devices cuda --compare torch --json "$out/fit.json"
else
  part gpu-tests 150 "$python" -m pytest -q -rfE -p no:cacheprovider -m gpu tests
  part fused-kernels 45 "$python" benchmarks/fused_kernels.py --json "$out/fused-kernels.json"
  part bench 200 "$python" -m nnaccel.cli bench --devices cpu,cuda --compare torch --precision fp32,tf32,bf16 \
    --json "$out/bench.json"
  part fit 75 "$python" -m nnaccel.cli bench --fit --devices cuda --compare torch --json "$out/fit.json"
fi

echo "results in $out: $(cd "$out" && ls | tr '\n' ' ')"
exit "$failed"
