#!/usr/bin/env bash
# Accuracy at the served length (issue 20) on the GPU machine, in stages that each fit one device call:
#   benchmarks/accuracy_long.sh profile OUT   the path check at 31k, then a profile of Qwen2.5-Coder-0.5B at
#                                             16k-31k on the 12 profiling needles, re-ranked four ways
#   benchmarks/accuracy_long.sh eval31 OUT    the 120-cell grid at 31k: full, window, the shipped profile,
#                                             the long profile's rankings at several budgets, window 1024
#   benchmarks/accuracy_long.sh eval16 OUT    the same grid's main rows at 8k and 16k
#   benchmarks/accuracy_long.sh next OUT      what 2026-12-03's runs left open (RESULTS.md, "Accuracy at 8k-31k
#                                             on the H200"): the attention-max ranking at 8k/16k and with a
#                                             1024-token window, and budgets 0.85/0.9 at 31k. OUT holds that
#                                             run's profiles and cells (benchmarks/results/eval_qwen_h200)
# Run after `bash .gpuparts/setup.sh install; . /tmp/p/env.sh` (benchmarks/gpu_parts.py). Every grid uses the
# 12 held-out needles of rheads/data/eval_needles.jsonl at 10 depths: 120 cells per configuration and length.
# The full cache and the window alone do not depend on the profile, so each later run starts from the
# first run's full and window cells instead of computing them again. On the H200 two of these engines fit
# beside each other, three do not (their activations take more than their KV pools); and the preset must be
# assembled and converted before two processes load it, or both write its file.
set -uo pipefail
stage=${1:?usage: accuracy_long.sh profile|eval31|eval16|next OUT}
out=${2:?usage: accuracy_long.sh STAGE OUT}
mkdir -p "$out"
model=qwen2.5-coder-0.5b-instruct
depths=0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95
rheads() { python3 -m rheads.cli "$@"; }
engine=(--device cuda --kv-cache-memory 24GiB --max-num-batched-tokens 8192 --max-num-seqs 128 --random-seeds '')

reuse() {  # reuse FROM TO CONFIGS...: start TO with FROM's cells of these (profile-independent) configurations
  local from=$1 to=$2
  shift 2
  mkdir -p "$to"
  [ -f "$to/cells.jsonl" ] || python3 - "$from/cells.jsonl" "$to/cells.jsonl" "$@" <<'PY'
import json, sys
src, dst, keep = sys.argv[1], sys.argv[2], set(sys.argv[3:])
rows = [line for line in open(src) if json.loads(line)["config"] in keep]
open(dst, "w").writelines(rows)
PY
}

case "$stage" in
profile)
  timeout 150 python3 benchmarks/long_context_oracle.py --length 31000 --prompts 2 --budgets 1.0,0.5 \
    --json "$out/long_context_oracle.json" 2>&1 | tail -30
  timeout 400 python3 -m rheads.cli profile "$model" --lengths 16000,24000,31000 --depths 0,0.2,0.4,0.6,0.8,1 \
    --needles rheads/data/profile_needles.jsonl --device cuda --batch-size 8 --out "$out/qwen-long.json" 2>&1 |
    tr '\r' '\n' | tail -3
  for score in copy attention; do
    for how in max mean; do
      rheads profile rescore "$out/qwen-long.json" --score $score --kv-aggregate $how --out "$out/qwen-$score-$how.json"
    done
  done
  ;;
eval31)
  rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.75,0.6,0.5 \
    --profile "$out/qwen-copy-max.json" "${engine[@]}" --out "$out/eval31-copy-max" 2>&1 | tail -12
  for variant in attention-max attention-mean copy-mean; do
    reuse "$out/eval31-copy-max" "$out/eval31-$variant" full window
    rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.6,0.5 \
      --profile "$out/qwen-$variant.json" "${engine[@]}" --out "$out/eval31-$variant" 2>&1 | tail -8
  done
  reuse "$out/eval31-copy-max" "$out/eval31-shipped" full window
  rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.5 \
    --profile profiles/Qwen2.5-Coder-0.5B-Instruct.json "${engine[@]}" --out "$out/eval31-shipped" 2>&1 | tail -6
  ;;
eval16)
  best=${BEST:-copy-max}
  for window in 1024; do
    reuse "$out/eval31-copy-max" "$out/eval31-$best-w$window" full
    rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.5 --window $window \
      --profile "$out/qwen-$best.json" "${engine[@]}" --out "$out/eval31-$best-w$window" 2>&1 | tail -6
  done
  rheads eval niah "$model" --lengths 8000,16000 --depths "$depths" --budgets 0.75,0.5 \
    --profile "$out/qwen-$best.json" "${engine[@]}" --out "$out/eval16-$best" 2>&1 | tail -8
  ;;
next)
  python3 -c "from rheads.models import resolve_model; resolve_model('$model')"
  rheads profile rescore "$out/profile_qwen_16k-31k.json" --score attention --kv-aggregate max \
    --out "$out/qwen-attention-max.json"
  reuse "$out/8k16k-long-copy-max" "$out/8k16k-attention-max" full window
  reuse "$out/31k-long-copy-max" "$out/31k-attention-max-window1024" full
  reuse "$out/31k-long-copy-max" "$out/31k-long-copy-max-high" full window
  (rheads eval niah "$model" --lengths 8000,16000 --depths "$depths" --budgets 0.6,0.5 \
     --profile "$out/qwen-attention-max.json" "${engine[@]}" --out "$out/8k16k-attention-max" 2>&1 | tail -8
   rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.75,0.6,0.5 --window 1024 \
     --profile "$out/qwen-attention-max.json" "${engine[@]}" --out "$out/31k-attention-max-window1024" 2>&1 |
     tail -8) &
  rheads eval niah "$model" --lengths 31000 --depths "$depths" --budgets 0.9,0.85 \
    --profile "$out/profile_qwen_16k-31k.json" "${engine[@]}" --out "$out/31k-long-copy-max-high" 2>&1 | tail -8
  wait
  ;;
*)
  echo "accuracy_long.sh: unknown stage $stage" >&2
  exit 2
  ;;
esac
