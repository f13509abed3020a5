#!/usr/bin/env bash
# Train, evaluate and time the shipped drafts of the default target (SmolLM2-135M-Instruct)
# on one GPU, in phases that each fit a ten-minute run and resume from what the last left:
#
#   benchmarks/train_default_drafts.sh regen  SECONDS   # target regenerates the training responses
#   benchmarks/train_default_drafts.sh train  SECONDS   # all drafts train side by side, resuming
#   benchmarks/train_default_drafts.sh eval            # tau table + plots, trained drafts
#   benchmarks/train_default_drafts.sh bench           # plain vs speculative tokens/s, batch 1
#
# RUN (default /tmp/runs) holds everything between phases; PROMPTS the training prompts
# (`ascend-dspark prompts`, made where the prompt packages are installed) and EVAL_PROMPTS
# the held-out evaluation prompts. Every draft sees the same data, steps and target layers.
set -euo pipefail
PHASE=${1:?phase: regen | train | eval | bench}
BUDGET=${2:-480}
RUN=${RUN:-/tmp/runs}
PY=${PYTHON:-python3}
CLI="$PY -m ascend_dspark.cli"
DRAFTS=${DRAFTS:-"dspark dflash eagle3 dspark_gated dspark_rnn"}
SHARDS=${SHARDS:-1}
mkdir -p "$RUN"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# Convert the GGUF once before processes start side by side (they share the cache).
$PY -c "import torch; from ascend_dspark.models import load_target; load_target('default', torch.bfloat16, 'cpu')"

case "$PHASE" in
regen)
  # Several engine processes share the GPU (one eager engine is launch-bound); each takes
  # every SHARDS-th prompt and appends to its own file, so a cut run resumes per shard.
  for i in $(seq 0 $((SHARDS - 1))); do
    awk -v n="$SHARDS" -v i="$i" 'NR % n == i' "${PROMPTS:?}" > "$RUN/prompts.$i.jsonl"
    $CLI regen --prompts "$RUN/prompts.$i.jsonl" --out "$RUN/regen.$i.jsonl" \
      --max-new-tokens 384 --batch-size ${REGEN_BATCH:-1024} --time-budget-s "$BUDGET" --dtype bfloat16 --no-progress \
      > "$RUN/regen.$i.log" 2>&1 &
  done
  wait
  tail -n 2 "$RUN"/regen.*.log
  ;;
train)
  data=$(ls "$RUN"/regen.*.jsonl | sed 's/^/--data /' | tr '\n' ' ')
  for d in $DRAFTS; do
    steps=$(eval echo "\${STEPS_$d:-}")      # STEPS_dspark=N: end this draft's schedule at step N
    $CLI train --config "${d}_smollm2" $data --out "$RUN/$d" --time-budget-s "$BUDGET" \
      --export "$RUN/export/$d" ${steps:+--set steps=$steps} --no-progress > "$RUN/train.$d.log" 2>&1 &
  done
  wait
  for d in $DRAFTS; do tail -n 1 "$RUN/train.$d.log"; done
  ;;
eval)
  for d in $DRAFTS; do
    src="$RUN/export/$d"; [ -d "$src" ] || src=$(ls -d "$RUN/$d"/step_* | tail -n 1)
    $CLI eval --drafters "$d=$src" --prompts "${EVAL_PROMPTS:?}" --temperatures 0,1 \
      --max-new-tokens 256 --batch-size 32 --dtype bfloat16 --out "$RUN/eval/$d" > "$RUN/eval.$d.log" 2>&1 &
  done
  wait
  ;;
bench)
  args=""
  for d in ${BENCH_DRAFTS:-dspark dflash eagle3}; do
    src="$RUN/export/$d"; [ -d "$src" ] || src=$(ls -d "$RUN/$d"/step_* | tail -n 1)
    args="$args $src"
  done
  $PY benchmarks/bench_generate.py --device cuda --max-tokens ${BENCH_TOKENS:-128} --batch-sizes ${BENCH_BATCHES:-1 4} \
    --drafters none $args --out "$RUN/bench_h200.json"
  ;;
*) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
