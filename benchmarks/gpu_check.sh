#!/usr/bin/env bash
# One GPU check, from a fresh clone on a CUDA machine, in <= 8 minutes on one H100/H200-class GPU: set up with the
# GPU extras, check kdlora's Triton LoRA kernels on the device, serve and measure. Every step is bounded by `timeout`;
# a failed step is reported and the next one still runs; the exit status is non-zero if any step failed.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR default: benchmarks/results/gpu_check)
#
# Steps (seconds allowed):
#   setup    150  KDLORA_EXTRAS=gpu,dev scripts/setup (upstream vLLM; a no-op when already set up)
#   doctor    30  scripts/kdlora doctor (which LoRA path serves here)
#   kernels   90  tests/test_cuda_kernels.py: kdlora's kernels == vLLM's stock kernels on the GPU, every layer shape
#                 of the embedded model, R = 64, bf16 and fp16, in a CUDA graph replayed after the tables change
#   serve    210  benchmarks/serve_bench.py --dtypes bfloat16 --concurrency 1,8,32 --rounds 1 --tokens 32: stock vs rank-aware,
#                 every rank and a mixed batch, CUDA graphs on (vLLM's default), a random nested R = 64 adapter on the
#                 embedded teacher; the server logs hold the self-check's line
# Writes OUT_DIR/<step>.log, the benchmark's JSON + PNG (benchmarks/results/serve_gpu.*) copied there, and
# OUT_DIR/summary.txt: one line per step, "PASS|FAIL <step> <seconds>s <log>".
# --dry-run: print the plan and check that every file and command it uses is here (CPU machines, the test suite).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out=${1:-$root/benchmarks/results/gpu_check}
venv=${KDLORA_VENV:-$root/.venv}

steps=(setup doctor kernels serve)
declare -A limit=([setup]=150 [doctor]=30 [kernels]=90 [serve]=210)
declare -A command=(
  [setup]="KDLORA_EXTRAS=gpu,dev $root/scripts/setup"
  [doctor]="$root/scripts/kdlora doctor"
  [kernels]="$venv/bin/python -m pytest -p no:cacheprovider -q $root/tests/test_cuda_kernels.py"
  [serve]="$venv/bin/python $root/benchmarks/serve_bench.py --dtypes bfloat16 --concurrency 1,8,32 --rounds 1 --tokens 32"
)
needed_files=(scripts/setup scripts/kdlora tests/test_cuda_kernels.py benchmarks/serve_bench.py pyproject.toml)
needed_commands=(timeout python3 nvidia-smi)

if [ $dry_run = 1 ]; then
  missing=0
  for file in "${needed_files[@]}"; do
    [ -e "$root/$file" ] || { echo "missing: $root/$file" >&2; missing=1; }
  done
  grep -q '^gpu = ' "$root/pyproject.toml" 2>/dev/null || { echo "missing: the gpu extra in pyproject.toml" >&2; missing=1; }
  for cmd in "${needed_commands[@]}"; do
    if ! command -v "$cmd" >/dev/null; then
      if [ "$cmd" = nvidia-smi ]; then echo "note: nvidia-smi not found (no GPU here; needed only for the real run)"
      else echo "missing command: $cmd" >&2; missing=1; fi
    fi
  done
  total=0
  for step in "${steps[@]}"; do
    echo "plan: $step (<= ${limit[$step]} s): ${command[$step]}"
    total=$((total + limit[$step]))
  done
  echo "plan: at most $total s; logs and summary.txt in $out"
  [ $missing = 0 ] && echo "dry run: every file and command is here" || echo "dry run: FAILED (see above)" >&2
  exit $missing
fi

command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU found (nvidia-smi)" >&2; exit 1; }
mkdir -p "$out"
: > "$out/summary.txt"
failed=0
for step in "${steps[@]}"; do
  started=$(date +%s)
  echo "gpu_check: $step (<= ${limit[$step]} s)" >&2
  (cd "$root" && timeout --kill-after=10 "${limit[$step]}" bash -c "${command[$step]}") > "$out/$step.log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - started ))
  if [ $status = 0 ]; then verdict=PASS; else verdict=FAIL; failed=1; fi
  [ $status = 124 ] || [ $status = 137 ] && verdict="FAIL (timed out)"
  echo "$verdict $step ${seconds}s $out/$step.log" | tee -a "$out/summary.txt"
done
cp "$root"/benchmarks/results/serve_gpu.* "$out"/ 2>/dev/null || true
grep -h "LoRA kernel self-check" "$root"/benchmarks/.work/*.log "$out"/*.log 2>/dev/null | sort -u | tee -a "$out/summary.txt"
exit $failed
