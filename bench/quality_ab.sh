#!/usr/bin/env bash
# Draft quality A/B on one GPU: train the embedded tiny target's draft to saturation from two source
# trees (e.g. before and after a change to the draft), same seed and data, concurrently, then evaluate
# both final exports with eval.py (tau and per-position acceptance at k=3 and k=7). Used for the rope
# fix of the TTT unroll (docs/benchmarks.md, "Draft quality").
#   bash bench/quality_ab.sh OUT_DIR STEPS EVAL_EVERY NAME_A=TREE_A NAME_B=TREE_B
# Each tree is a checkout of this project (its own assets/ or a link to one).
set -uo pipefail
out=$1 steps=$2 every=$3; shift 3
mkdir -p "$out"
PYTHON=${PYTHON:-python3}
pids=()
for spec in "$@"; do
  name=${spec%%=*} tree=$(cd "${spec#*=}" && pwd)
  # Sequential placement: one process per run, so the two runs share the GPU without MPS.
  (cd "$tree" && PYTHON=$PYTHON timeout "${TRAIN_LIMIT:-1500}" bash launch.sh placement=sequential mps=off train.max_steps="$steps" \
      eval.every="$every" run.dir="$out/$name" data.cache_dir="/tmp/quality_cache_$name" \
      > "$out/$name.train.log" 2>&1; echo "train $name rc=$?" >> "$out/$name.train.log") &
  pids+=($!)
done
wait "${pids[@]}"
for spec in "$@"; do
  name=${spec%%=*} tree=$(cd "${spec#*=}" && pwd)
  (cd "$tree" && $PYTHON eval.py --draft "$out/$name/draft" --out "$out/$name.eval.json" eval.draft_tokens=[3,7] \
      data.cache_dir="/tmp/quality_cache_$name" --no-progress > "$out/$name.eval.log" 2>&1)
  echo "eval $name rc=$?"; tail -n 12 "$out/$name.eval.log"
done
$PYTHON - "$out" "$@" <<'EOF'
import json, sys
out, names = sys.argv[1], [s.split("=", 1)[0] for s in sys.argv[2:]]
for name in names:
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    evals = [r for r in rows if "accept_len_k3" in r]
    last = [r for r in rows if "loss" in r][-1]
    accs = " ".join(f"{last[f'acc_{i}']:.3f}" for i in range(7) if f"acc_{i}" in last)
    print(f"{name}: last step {last['step']} loss {last['loss']:.4f} train acc_i {accs}")
    print(f"{name}: tau curve (step: k3 / k7) " + ", ".join(
        f"{r['step']}: {r['accept_len_k3']:.3f}/{r['accept_len_k7']:.3f}" for r in evals))
EOF
