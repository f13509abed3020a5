#!/usr/bin/env bash
# Train, evaluate and time the shipped drafts of the default target (SmolLM2-135M-Instruct)
# on one GPU, in phases that each fit inside a ten-minute run and add up across GPU runs
# that share nothing but the drafts' weights (README.md, "Continuing training on the next GPU run"):
#
#   benchmarks/train_default_drafts.sh stage            # HERE (CPU): prompts, code snapshot, GGUF parts -> $STAGE
#   benchmarks/train_default_drafts.sh setup            # GPU: reassemble the GGUF, install wheels, unpack the code
#   benchmarks/train_default_drafts.sh regen  SECONDS   # GPU: the target regenerates SAMPLES responses per prompt
#   benchmarks/train_default_drafts.sh train  SECONDS   # GPU: $DRAFTS jointly on the same batches, from $INIT
#   benchmarks/train_default_drafts.sh eval             # GPU: held-out tau with bootstrap CIs, new vs $BASE drafts
#   benchmarks/train_default_drafts.sh merge            # GPU: WHICH=base and WHICH=new evals joined, with ratios
#   benchmarks/train_default_drafts.sh collect          # GPU: exports, logs, eval -> $OUT (each file < 16 MiB)
#   benchmarks/train_default_drafts.sh bench            # GPU: plain vs speculative tokens/s, batch 1
#   benchmarks/train_default_drafts.sh all    SECONDS   # GPU: setup .. collect in one call (base eval beside regen/train)
#
# Variables: RUN (default /tmp/runs) holds everything between phases on the GPU machine;
# STAGE (default .stage) what is prepared here; DRAFTS the configs trained together
# (default "dspark_smollm2 dflash_smollm2"; "dspark_deep_smollm2 dflash_deep_smollm2" for the
# 2-layer drafts); INIT the directory holding one draft per config name to continue from
# (default: the shipped drafts; a draft with train_progress.json continues its schedule);
# PROMPT_OFFSET the training prompt this run's regeneration starts at (continued drafts: past the
# prompts earlier runs reached, their samples_seen_total / SAMPLES); TRAIN_SET extra `--set` overrides for train (e.g. "lr=4e-4"); FIT=1 ends the schedule
# inside the budget (the default when INIT has no progress: a fresh schedule per run); DATA_FROM a
# directory of earlier runs' shard directories (results.tar.gz's shards/, one subdirectory per run)
# trained on beside this run's fresh data.
set -euo pipefail
PHASE=${1:?phase: stage | setup | regen | train | eval | merge | collect | bench | all}
BUDGET=${2:-480}
RUN=${RUN:-/tmp/runs}
STAGE=${STAGE:-.stage}
PY=${PYTHON:-python3}
CODE=${CODE:-/tmp/code}
DRAFTS=${DRAFTS:-"dspark_smollm2 dflash_smollm2"}
SHIPPED=ascend_dspark/drafts/smollm2-135m-instruct
SAMPLES=${SAMPLES:-2}
PART_MB=${PART_MB:-16}          # a part plus the tree (~50 MB with the shipped drafts) stays under an upload's 64 MiB
BOX_STAGE=${BOX_STAGE:-/tmp/stage}          # on the GPU machine: where each call leaves its GGUF part
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export ASCEND_DSPARK_CACHE=${ASCEND_DSPARK_CACHE:-/tmp/ascend-dspark-cache}
kind() { case "$1" in dspark*) echo dspark ;; dflash*) echo dflash ;; eagle3*) echo eagle3 ;; esac; }
ratio_pairs() {     # new/base per drafter, then DSpark / DFlash among the new and among the base drafts
  local r=""
  for d in $DRAFTS; do r="$r,new_$(kind "$d")/base_$(kind "$d")"; done
  echo "${r#,},new_dspark/new_dflash,base_dspark/base_dflash"
}

if [ "$PHASE" = stage ]; then
  # On the development machine (prompt packages installed, network for the wheel):
  # everything the GPU machine needs, in pieces that each travel with one call.
  PY=${PYTHON:-.venv/bin/python}
  mkdir -p "$STAGE"
  $PY -m ascend_dspark.cli regen --prompts-out "$STAGE/prompts_train.jsonl"                # every training prompt
  $PY -m ascend_dspark.cli eval --datasets gsm8k-test --limit 200 --prompts-out "$STAGE/eval_gsm8k.jsonl"
  $PY -m ascend_dspark.cli eval --datasets humaneval,mtbench --prompts-out "$STAGE/eval_code_chat.jsonl"
  cat "$STAGE/eval_gsm8k.jsonl" "$STAGE/eval_code_chat.jsonl" > "$STAGE/prompts_eval.jsonl"
  gzip -f "$STAGE/prompts_train.jsonl"
  # The code as committed (other work in progress in the tree stays here), without the drafts
  # (they travel with the tree); CODE_FROM=worktree snapshots the working tree instead.
  if [ "${CODE_FROM:-HEAD}" = worktree ]; then
    tar --exclude=__pycache__ --exclude=ascend_dspark/drafts -czf "$STAGE/code.tar.gz" ascend_dspark ops
  else
    git archive --format=tar.gz -o "$STAGE/code.tar.gz" HEAD ascend_dspark ops ':(exclude)ascend_dspark/drafts'
  fi
  gguf=$($PY -c "from ascend_dspark.models.loader import default_gguf; print(default_gguf())")
  (cd "$STAGE" && rm -f gguf.part.* && split -b "${PART_MB}m" -d "$gguf" gguf.part. && sha256sum "$gguf" | cut -d' ' -f1 > gguf.sha256)
  [ -n "$(ls "$STAGE"/gguf-*.whl 2>/dev/null)" ] || $PY -m pip download -q --no-deps --only-binary=:all: -d "$STAGE" gguf==0.19.0
  ls -la "$STAGE"
  exit 0
fi

if [ "$PHASE" = setup ]; then
  # On the GPU machine, after every gguf.part.* reached $BOX_STAGE (one per call, back to back,
  # while the machine stays warm: `mkdir -p $BOX_STAGE && cp $STAGE/gguf.part.NN $BOX_STAGE/`).
  # The GGUF: this run's parts, or a copy already on the machine (another session's parts:
  # GGUF_PARTS, globs of parts in order), whichever matches the checksum.
  mkdir -p "$BOX_STAGE"
  want=$(cat "$STAGE/gguf.sha256")
  have() { [ -f "$BOX_STAGE/model.gguf" ] && [ "$(sha256sum < "$BOX_STAGE/model.gguf" | cut -c1-64)" = "$want" ]; }
  if ! have; then
    cp "$STAGE"/gguf.part.* "$BOX_STAGE"/ 2>/dev/null || true
    cands="$BOX_STAGE/gguf.part.*
${GGUF_PARTS:-.stage/part.*
/tmp/stage/part.*}
$(find /tmp -name '*.gguf' -size +90M 2>/dev/null | grep -v "^$BOX_STAGE/model.gguf" | head -3 || true)"
    while IFS= read -r parts; do
      # shellcheck disable=SC2086
      [ -n "$parts" ] && ls $parts > /dev/null 2>&1 || continue
      rm -f "$BOX_STAGE/model.gguf.tmp"; cat $(ls $parts | sort) > "$BOX_STAGE/model.gguf.tmp" && mv "$BOX_STAGE/model.gguf.tmp" "$BOX_STAGE/model.gguf"
      if have; then echo "GGUF from $parts"; break; fi
    done <<< "$cands"
  fi
  have || { echo "the GGUF is not on this machine (checksum $want): stage its parts first" >&2; exit 3; }
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/gguf-*.whl
  rm -rf "$CODE" && mkdir -p "$CODE" && tar -xzf "$STAGE/code.tar.gz" -C "$CODE"
  ln -sfn "$PWD/ascend_dspark/drafts" "$CODE/ascend_dspark/drafts"
  # Convert the GGUF once, before the phases' processes start (they share the cache).
  (cd "$CODE" && PYTHONPATH="$CODE:/tmp/site" ASCEND_DSPARK_DEFAULT_GGUF="$BOX_STAGE/model.gguf" \
    $PY -c "from ascend_dspark.models.loader import resolve_checkpoint; print(resolve_checkpoint('default'))")
  mkdir -p "$RUN" && gunzip -c "$STAGE/prompts_train.jsonl.gz" > "$RUN/prompts_train.jsonl" && cp "$STAGE/prompts_eval.jsonl" "$RUN/"
  # Regeneration is deterministic per (prompt, sample seed) and a run reaches only the first few
  # thousand prompts, so a continued draft would see the same responses again: PROMPT_OFFSET
  # starts this run's prompt list there (rotated, nothing dropped).
  o=${PROMPT_OFFSET:-0}
  if [ "$o" -gt 0 ]; then
    { tail -n +$((o + 1)) "$RUN/prompts_train.jsonl"; head -n "$o" "$RUN/prompts_train.jsonl"; } > "$RUN/p.jsonl"
    mv "$RUN/p.jsonl" "$RUN/prompts_train.jsonl"
  fi
  exit 0
fi

if [ "$PHASE" = all ]; then
  # One GPU call of BUDGET seconds: setup; the base drafts' eval beside regen and train; regen
  # (30% of what setup leaves), train (45%), the new drafts' eval, merge, collect into $OUT.
  S=$(readlink -f "$0"); end=$((SECONDS + BUDGET)); left() { echo $((end - SECONDS)); }
  bash "$S" setup 2>&1 | sed -u '/it\/s\]/d' | tail -3 || exit 3
  echo "== setup done, $(left) s left"
  WHICH=base timeout $(( $(left) - 30 )) bash "$S" eval > "$RUN/base_eval.out" 2>&1 & base=$!
  spare=$(( $(left) - 60 ))
  timeout $(( spare * 30 / 100 + 40 )) bash "$S" regen $(( spare * 30 / 100 )) || true
  echo "== regen done, $(left) s left"
  timeout $(( spare * 45 / 100 + 35 )) bash "$S" train $(( spare * 45 / 100 )) || true
  echo "== train done, $(left) s left"
  WHICH=new timeout $(( $(left) - 12 )) bash "$S" eval || true
  wait $base || true
  bash "$S" merge || true
  [ -z "${OUT:-}" ] || bash "$S" collect
  echo "== end, $(left) s left"
  exit 0
fi

# GPU phases run the unpacked snapshot against the reassembled GGUF.
if [ -d "$CODE/ascend_dspark" ]; then
  export PYTHONPATH="$CODE:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export ASCEND_DSPARK_DEFAULT_GGUF=${ASCEND_DSPARK_DEFAULT_GGUF:-$BOX_STAGE/model.gguf}
  cd "$CODE"
fi
CLI="$PY -m ascend_dspark.cli"
INIT=${INIT:-$SHIPPED}
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:+--device $DEVICE}
mkdir -p "$RUN"

case "$PHASE" in
regen)
  # One engine process (graphs, continuous batching): chunks of several batches keep it full.
  # Sample 0 of each prompt is greedy, the rest at T=0.7 / top-p 0.8 / top-k 20; resumable.
  $CLI regen --prompts "$RUN/prompts_train.jsonl" --out "$RUN/regen.jsonl" --samples-per-prompt "$SAMPLES" \
    --max-new-tokens ${REGEN_TOKENS:-384} --batch-size ${REGEN_BATCH:-256} --chunk-size ${REGEN_CHUNK:-2048} \
    --time-budget-s "$BUDGET" --dtype "$DTYPE" $DEVICE --no-progress 2>&1 | tee -a "$RUN/regen.log"
  $PY -m ascend_dspark.training.shards "$RUN/shards" "$RUN/regen.jsonl" | tee -a "$RUN/regen.log"
  ;;
train)
  [ -d "$RUN/shards" ] || $PY -m ascend_dspark.training.shards "$RUN/shards" "$RUN/regen.jsonl"
  configs="" inits="" fresh=0
  for d in $DRAFTS; do
    configs="$configs --config $d"
    src="$INIT/$(kind "$d")"; [ -d "$INIT/$d" ] && src="$INIT/$d"
    if [ -f "$src/config.json" ]; then
      inits="$inits --init-from $d=$src"
      [ -f "$src/train_progress.json" ] || fresh=1
    else
      fresh=1
    fi
  done
  fit=""; [ "${FIT:-$fresh}" = 1 ] && fit="--fit-steps"
  sets=""; for s in ${TRAIN_SET:-}; do sets="$sets --set $s"; done
  # Earlier runs' token shards (collect returns them), carried in as DATA_FROM/<run>/: the
  # data adds up across runs instead of each run's ~0.5 M regenerated tokens alone.
  earlier=""; for d in ${DATA_FROM:+"$DATA_FROM"/*/}; do [ -d "$d" ] && earlier="$earlier --data $d"; done
  $CLI train $configs --data "$RUN/shards" $earlier --out "$RUN/train" --export "$RUN/export" $inits $sets \
    --time-budget-s "$BUDGET" $fit $DEVICE --no-progress 2>&1 | tee -a "$RUN/train.log"
  ;;
eval)
  # New drafts against the ones they started from ($BASE, default the shipped ones), same prompts.
  # WHICH=base evaluates only the base drafts (it can run beside regen or train: it needs no new
  # draft), WHICH=new only the new ones; `merge` then joins the reports and adds the ratios.
  BASE=${BASE:-$SHIPPED}
  which=${WHICH:-all}
  specs=""
  for d in $DRAFTS; do
    k=$(kind "$d")
    [ "$which" = base ] || specs="$specs,new_$k=$RUN/export/$d"
    [ "$which" = new ] || specs="$specs,base_$k=$BASE/$k"
  done
  ratios=""; [ "$which" = all ] && ratios=$(ratio_pairs)
  $CLI eval --drafters "${specs#,}" --prompts "$RUN/prompts_eval.jsonl" --temperatures ${TEMPS:-0} \
    --max-new-tokens ${EVAL_TOKENS:-256} --batch-size ${EVAL_BATCH:-256} --graph-buckets 32,128,256 --dtype "$DTYPE" $DEVICE \
    ${ratios:+--ratios $ratios} --out "$RUN/eval_$which" 2>&1 | tee -a "$RUN/eval_$which.log"
  ;;
merge)
  reports=$(ls "$RUN"/eval_*/eval.json | grep -v eval_merged | paste -sd, -)
  $CLI eval --merge "$reports" --ratios "$(ratio_pairs)" --out "$RUN/eval_merged" 2>&1 | tee -a "$RUN/eval_merged.log"
  ;;
collect)
  out=${OUT:?collect writes to \$OUT}
  for d in $DRAFTS; do
    for f in "$RUN/export/$d"/model*.safetensors; do [ -f "$f" ] && cp "$f" "$out/${d}.$(basename "$f")"; done
  done
  tar -czf "$out/results.tar.gz" -C "$RUN" --exclude='*.safetensors' --exclude='trainer_state.pt' \
    --exclude='regen.jsonl' --exclude='prompts_*.jsonl' --exclude='step_*' .     # shards included: ~0.9 MB per M tokens
  ls -la "$out"
  ;;
bench)
  args=""
  for d in ${BENCH_DRAFTS:-$DRAFTS}; do args="$args $RUN/export/$d"; done
  $PY benchmarks/bench_generate.py --device cuda --max-tokens ${BENCH_TOKENS:-128} --batch-sizes ${BENCH_BATCHES:-1 4} \
    --drafters none $args --out "$RUN/bench.json"
  ;;
*) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
