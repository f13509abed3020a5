#!/usr/bin/env bash
# The confidence scheduler's GPU figures (BENCHMARKS.md, "Confidence-scheduled verification"),
# side by side in one run of one GPU (about five minutes on an H100):
#   1. the Poisson serving sweep at concurrency 1 / 4 / 16 / 64 (GSM8K test prompts, 128 tokens,
#      greedy): the confidence policy (the default), fixed K = 7, and plain decoding (--drafter none);
#   2. batch 1 offline, plain vs DSpark / DFlash under both policies (bench_generate.py);
#   3. the step-cost table the spec server measured at start-up (for plot_scheduler.py);
#   4. with DECODE=1, batch 1 in one process: the scheduler, fixed K, plain decoding with graphs
#      and transformers static + compile on a GSM8K prompt (bench_decode.py --speculative).
#
#   OUT=results_dir GGUF=SmolLM2-135M-Instruct.gguf [WHEELS=dir of fastapi/uvicorn/pydantic wheels] \
#       [MODES="spec fixed eager_prefill plain"] [SERVER_ARGS="--prefill-graphs"] [GENERATE=0] [DECODE=1] \
#       [DATASET=mtbench.jsonl SWEEP=poisson_mtbench] benchmarks/scheduler_gpu.sh
# MODES: serve_bench.py's modes (eager_prefill: the spec server with --no-prefill-graphs);
# SERVER_ARGS: flags every server gets; GENERATE=0 skips part 2. DATASET: serve_bench's prompts
# (default gsm8k-test, which ships with the package; MT-Bench's package is not on the GPU machines,
# so its prompts go there as a JSONL written by training.prompts.save_prompts); SWEEP: the results'
# name. The servers' logs are searched for prompt chunks that left the prefill graphs, then packed
# into one file (at most 8 files come back from the GPU machine).
set -uo pipefail
OUT=${OUT:?where the results go}
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export ASCEND_DSPARK_DEFAULT_GGUF=${GGUF:?the default model GGUF} ASCEND_DSPARK_CACHE=${ASCEND_DSPARK_CACHE:-/tmp/ascend-dspark-cache}
export PYTHONUNBUFFERED=1
quiet() { grep -v "it/s\]"; }
# shellcheck disable=SC2086  # MODES and SERVER_ARGS are word lists
timeout "${SWEEP_TIMEOUT:-420}" python3 benchmarks/serve_bench.py --launch --concurrency 1 4 16 64 \
  --request-rate 2 8 32 128 --max-tokens 128 --modes ${MODES:-spec fixed plain} --slo-ttft-ms 500 --slo-tpot-ms 20 \
  --dataset "${DATASET:-gsm8k-test}" --out "$OUT/${SWEEP:-poisson_scheduler}.json" -- --device cuda --max-num-seqs 64 ${SERVER_ARGS:-} 2>&1 | quiet
cp "$ASCEND_DSPARK_CACHE"/step_costs/*.json "$OUT/" 2>/dev/null
echo "prompt chunks that left the prefill graphs (logged once per reason):"
grep -H "runs eagerly" "$OUT"/*.server.log | cut -c1-300
tar czf "$OUT/server_logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls ./*.server.log) && rm "$OUT"/*.server.log
if [ "${GENERATE:-1}" = 1 ]; then
  timeout 150 python3 benchmarks/bench_generate.py --device cuda --drafters none dspark dflash \
    --speculation confidence fixed --batch-sizes 1 --num-prompts 8 --max-tokens 128 \
    --out "$OUT/generate_policies.json" 2>&1 | quiet
fi
if [ "${DECODE:-0}" = 1 ]; then
  timeout 240 python3 benchmarks/bench_decode.py --model default --speculative --out "$OUT/decode_spec.json" 2>&1 | quiet
fi
