#!/usr/bin/env bash
# Issue 18's "Must show": SIGTERM to launch.sh mid-run, the time to exit, then the resume.
#
#   bash bench/sigterm.sh [N_STEPS] [hydra overrides...]
#
# Starts launch.sh in the background (on a GPU: placement=colocate mps=on; with device=cpu among the
# overrides: on CPU), waits until N_STEPS (default 25) training rows are in metrics.jsonl, sends
# SIGTERM to launch.sh, measures the time until it exits, then runs the resume command it printed.
# Prints one line per figure: signal_step (steps in metrics.jsonl when the signal was sent),
# checkpoint_step, exit_code (75 expected), time_to_exit_s, resume_step (the step the resume started
# from) and resume_exit_code. Logs stay in the run directory's bench-*.log.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${1:-25}; shift || true
PY=${PYTHON:-$REPO/.venv/bin/python}; [[ -x $PY ]] || PY=python3
RUN_DIR=${RUN_DIR:-$REPO/outputs/sigterm-$(date +%Y%m%d-%H%M%S)}
ARGS=("$@")
if [[ " ${ARGS[*]} " != *" device=cpu "* ]]; then ARGS=(placement=colocate mps=on "${ARGS[@]}"); fi
ARGS=(train.max_steps=100000 checkpoint.every=10 train.log_every=1 eval.every=0 "${ARGS[@]}" "run.dir=$RUN_DIR")
rows() { local n; n=$(grep -c "\"loss\"" "$RUN_DIR/metrics.jsonl" 2>/dev/null); echo "${n:-0}"; }

mkdir -p "$RUN_DIR"
bash "$REPO/launch.sh" "${ARGS[@]}" >"$RUN_DIR/bench-run.log" 2>&1 &
PID=$!
while (( $(rows) < N )); do
  kill -0 "$PID" 2>/dev/null || { echo "sigterm.sh: launch.sh ended before $N steps; see $RUN_DIR/bench-run.log" >&2; exit 1; }
  sleep 0.2
done
SIGNAL_STEP=$(rows)
T0=$(date +%s.%N)
kill -TERM "$PID"
wait "$PID"; RC=$?
T1=$(date +%s.%N)
CKPT_STEP=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$RUN_DIR/stopped.json" 2>/dev/null || echo none)
echo "signal_step=$SIGNAL_STEP"
echo "checkpoint_step=$CKPT_STEP"
echo "exit_code=$RC"
echo "time_to_exit_s=$("$PY" -c "print(round($T1 - $T0, 2))")"
RESUME=$(grep -o 'resume with: .*' "$RUN_DIR/bench-run.log" | tail -1 | sed 's/^resume with: //')
[[ -n $RESUME ]] || { echo "sigterm.sh: launch.sh printed no resume command; see $RUN_DIR/bench-run.log" >&2; exit 1; }
# Resume for a few steps only: enough to show where it starts.
eval "$RESUME run.stop_after_steps=${RESUME_STEPS:-5}" >"$RUN_DIR/bench-resume.log" 2>&1; RRC=$?
echo "resume_step=$(grep -o 'resumed from .* at step [0-9]*' "$RUN_DIR/bench-resume.log" | grep -o '[0-9]*$' | tail -1)"
echo "resume_exit_code=$RRC"
echo "run_dir=$RUN_DIR"
