#!/usr/bin/env bash
# The GPU runs the open issues wait for (benchmarks/RESULTS.md says which), staged for one H200 lease. The
# machine keeps /tmp only while warm (30 s idle), so after the pieces are in, start the jobs in the
# background and poll:
#   here:  .venv/bin/python benchmarks/gpu_parts.py --out .gpuparts --models smollm2 --server --piece-size 48MiB
#          .venv/bin/python benchmarks/vllm_parts.py --out .vllmparts --piece-size 48MiB
#   there, one call per piece (vLLM's with PIECES=/tmp/vp SITE=/tmp/vsite), the last one then:
#          bash benchmarks/h200_pending.sh start [STAGES]     (default: every stage, in this order)
#   then, each call within 30 s of the last:  bash benchmarks/h200_pending.sh wait SECONDS
# Stages (each writes its JSON and log under /tmp/pending, which `wait` packs into $OUT/pending.tgz):
#   tests       scripts/test-gpu (last run at 1a465c1, 2026-12-04: 273 passed, 7 failed: 6 MoE cases fixed
#               since, the marginal real SmolLM2 bf16 bound); since then the recompute's waits, StableLM
#   structured  bench_structured.py at batch 1 and 32, budget 0.5, Llama-3.1-8B shape (issue 26)
#   prefix      prefix_cache.py: a shared 32k document and many documents, rheads 1.0/0.5 and vLLM (issues 21, 23):
#               the first H200 figures of the recompute of the streaming heads (the run of 2026-12-04 was lost)
#   serving     gpu_serving.py at 8k and 32k, budgets 1.0/0.5/0.25 beside vLLM, then the arrivals phase (issue 23)
#   fp8         the fp8 tests (test_fp8.py, the kernel's fp8 case with arbitrary values on CUDA), then gpu_serving.py
#               at 32k in the same 30 GiB: budgets 1.0/0.5 in bf16 and in fp8, vLLM fp8 beside them (issue 24)
# All of them take more than one session's 30 minutes of device time (tests ~5, structured ~3, prefix ~10,
# fp8 ~10, serving ~20 minutes, estimated; a fresh machine and its pieces take ~3 more): name the stages a
# lease can hold, e.g. `start tests prefix structured`, and keep every call within 30 s of the last.
set -uo pipefail
P=/tmp/pending
mkdir -p "$P"
# shellcheck disable=SC1091
. /tmp/p/env.sh
tok=/tmp/bench/tokenizer
vllm=(--peers vllm --vllm-pythonpath /tmp/vsite)

stage() {
  case $1 in
  tests) RHEADS_GPU_REPORT=$P/gpu-tests.xml scripts/test-gpu ;;
  structured) python3 benchmarks/bench_structured.py --device cuda --json "$P/structured_h200.json" ;;
  prefix)
    python3 benchmarks/prefix_cache.py --device cuda --shape llama-3.1-8b --tokenizer $tok --workdir /tmp/bench \
      --doc-tokens 32000 --max-model-len 33000 --kv-cache-memory 30GiB --max-tokens 16 --shared 16 --documents 24 \
      --caching on --budgets 1.0,0.5 "${vllm[@]}" --json "$P/prefix_cache_h200.json" ;;
  serving)
    python3 benchmarks/gpu_serving.py --tokenizer $tok --workdir /tmp/bench --no-progress "${vllm[@]}" \
      --contexts 8192,32768 --budgets 1.0,0.5,0.25 --max-tokens 1024 --json "$P/gpu_serving_vllm.json" &&
    python3 benchmarks/gpu_serving.py --tokenizer $tok --workdir /tmp/bench --no-progress "${vllm[@]}" \
      --contexts '' --budgets 1.0,0.5 --arrivals 2 --json "$P/gpu_serving_vllm.json" --section arrivals --merge ;;
  fp8)
    python3 -m pytest -q tests/test_fp8.py tests/test_decode_kernel.py -k "fp8" &&
    python3 benchmarks/gpu_serving.py --tokenizer $tok --workdir /tmp/bench --no-progress --no-peer \
      --contexts 32768 --budgets 1.0,0.5 --max-tokens 1024 --json "$P/gpu_serving_bf16.json" &&
    python3 benchmarks/gpu_serving.py --tokenizer $tok --workdir /tmp/bench --no-progress "${vllm[@]}" \
      --kv-cache-dtype fp8 --contexts 32768 --budgets 1.0,0.5 --max-tokens 1024 --json "$P/gpu_serving_fp8.json" ;;
  *) echo "h200_pending.sh: unknown stage $1" >&2; return 2 ;;
  esac
}

case ${1:-} in
start)
  shift
  python3 -c "from rheads.models import resolve_model; resolve_model('smollm2-135m-instruct')"
  mkdir -p $tok && cp /tmp/rheads/models/smollm2-135m-instruct/tokenizer* $tok/
  stages=${*:-tests structured prefix serving}
  # one after another: the timings must not share the GPU
  nohup setsid bash -c "for s in $stages; do PYTHONUNBUFFERED=1 bash $0 run \$s > $P/\$s.log 2>&1;
    echo \$? > $P/\$s.rc; done; touch $P/done" > /dev/null 2>&1 < /dev/null &
  echo "started: $stages"
  ;;
run) stage "$2" ;;
wait)
  end=$((SECONDS + ${2:?wait SECONDS}))
  while [ ! -f $P/done ] && [ $SECONDS -lt $end ]; do sleep 5; done
  for rc in "$P"/*.rc; do [ -f "$rc" ] && echo "$(basename "$rc" .rc): exit $(cat "$rc")"; done
  for log in "$P"/*.log; do echo "== $log"; tail -n 4 "$log"; done
  tar czf "$OUT/pending.tgz" -C "$P" . && ls -la "$OUT"
  ;;
*) echo "usage: h200_pending.sh start [STAGES] | wait SECONDS" >&2; exit 2 ;;
esac
