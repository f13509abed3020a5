#!/usr/bin/env bash
# Tensor parallelism on two GPUs of one host (NCCL), in one run (BENCHMARKS.md, "Tensor parallelism"):
#   1. the tensor-parallel tests on CUDA: TP=2 (torchrun, NCCL) against TP=1 for the default
#      model, every drafter, T=0 and seeded T>0 (tests/distributed/test_tensor_parallel_cuda.py);
#   2. decode tokens/s at batch 1 and 16, TP=1 vs TP=2, for SmolLM2 (its shipped DSpark draft)
#      and a Qwen3-8B-shaped target with random weights, plain and with a DSpark draft, with the
#      collectives' device time per step from the profiler (benchmarks/bench_tp.py).
# Results: $OUT/tp.jsonl (one JSON line per model / drafter / TP / batch), $OUT/tests.log.
#
#   OUT=results_dir GGUF=SmolLM2-135M-Instruct.gguf [WHEELS=dir of wheels to install] benchmarks/tp_gpu.sh
set -uo pipefail
OUT=${OUT:?where the results go}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export ASCEND_DSPARK_DEFAULT_GGUF=${GGUF:?the default model GGUF} ASCEND_DSPARK_CACHE=${ASCEND_DSPARK_CACHE:-/tmp/ascend-dspark-cache}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 2 ] || { echo "needs two GPUs, found $NGPU"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
nvidia-smi topo -m >> "$OUT/machine.txt" 2>&1
quiet() { grep -v "it/s\]\|ops: "; }

echo "== 1. tensor-parallel tests on CUDA (NCCL)"
ASCEND_DSPARK_REQUIRE_CUDA=1 timeout 500 python3 -m pytest -q -p no:cacheprovider \
  tests/distributed/test_tensor_parallel_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -5

echo "== 2. decode tokens/s, TP=1 vs TP=2"
rm -f "$OUT/tp.jsonl"
for model in smollm2 qwen3_8b; do
  for drafter in none dspark; do
    timeout 300 python3 benchmarks/bench_tp.py --model $model --drafter $drafter --device cuda \
      --out "$OUT/tp.jsonl" 2>&1 | quiet | grep '^{' || echo "TP=1 $model $drafter failed"
    timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_tp.py \
      --model $model --drafter $drafter --device cuda --out "$OUT/tp.jsonl" 2>&1 | quiet | grep '^{' \
      || echo "TP=2 $model $drafter failed"
  done
done
python3 - "$OUT/tp.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'model':9} {'drafter':7} {'batch':>5} {'TP=1 tok/s':>11} {'TP=2 tok/s':>11} {'coll. ms/step':>13}")
for key in sorted({(r["model"], r["drafter"], r["batch"]) for r in rows}):
    by = {r["tp"]: r for r in rows if (r["model"], r["drafter"], r["batch"]) == key}
    one, two = by.get(1, {}), by.get(2, {})
    print(f"{key[0]:9} {key[1]:7} {key[2]:5} {one.get('decode_tokens_per_s', '-'):>11} "
          f"{two.get('decode_tokens_per_s', '-'):>11} {two.get('collective_ms_per_step', '-'):>13}")
PY
