#!/usr/bin/env bash
# Launch one node of a training run: detect GPUs, pick the process count, check the config once,
# bring MPS up for colocation, run torchrun with every argument forwarded as a Hydra override, then
# quit MPS (only if this script started it) and report which rank failed, its role and its error.
# SIGTERM/SIGINT stop the run at a checkpoint: the ranks finish the step in flight and save, and this
# script exits 75 and prints the command that resumes (docs/reliability.md).
#
#   bash launch.sh [--print-plan] [hydra overrides...]
#
# slurm/train.sbatch runs this once per node with the SPECDRAFT_NNODES / SPECDRAFT_RDZV_* variables
# set; docs/launching.md lists every variable this script reads or sets.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "launch.sh: error: $*" >&2; exit 2; }
warn() { echo "launch.sh: warning: $*" >&2; }
info() { echo "launch.sh: $*" >&2; }

usage() {
  sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  echo "Reads from the overrides: placement= (colocate|disaggregate|sequential, default colocate),"
  echo "mps= (auto|on|off, default auto), device= (auto|cuda|cpu), run.dir= (default outputs/<time>)."
}

# ---- arguments: everything is forwarded verbatim; a few keys also shape the launch ----
PRINT_PLAN=${LAUNCH_DRY_RUN:-0}
OVERRIDES=()
PLACEMENT=colocate
MPS_MODE=auto
DEVICE=""
USER_RUN_DIR=""
SAVE_TIMEOUT_S=120  # run.save_timeout_s's default in lib/config/__init__.py RunConfig
EXIT_STOPPED=75  # lib/launch/stopping.py EXIT_STOPPED: stopped by a signal at a checkpoint; resume it
RESUME_ARGS=()  # the arguments of a resume: these, plus run.dir and checkpoint.resume=true
for arg in "$@"; do
  case "$arg" in
    --print-plan) PRINT_PLAN=1; continue ;;
    -h|--help) usage; exit 0 ;;
  esac
  OVERRIDES+=("$arg")
  case "${arg#++}" in
    run.dir=*|+run.dir=*|checkpoint.resume=*|+checkpoint.resume=*|run.overwrite=*|+run.overwrite=*) ;;
    *) RESUME_ARGS+=("$arg") ;;
  esac
  [[ $arg == *=* ]] || continue
  key=${arg%%=*}
  key=${key#++}
  key=${key#+}
  value=${arg#*=}
  case "$key" in
    placement|placement.name) PLACEMENT=$value ;;
    mps) MPS_MODE=$value ;;
    device) DEVICE=$value ;;
    run.dir) USER_RUN_DIR=$value ;;
    run.save_timeout_s) [[ $value =~ ^[0-9]+$ ]] && SAVE_TIMEOUT_S=$value ;;
  esac
done

case "$PLACEMENT" in colocate|disaggregate|sequential) ;;
  *) die "placement=$PLACEMENT is not a placement; use placement=colocate, disaggregate or sequential" ;;
esac
case "$MPS_MODE" in auto|on|off) ;;
  *) die "mps=$MPS_MODE is not a mode; use mps=auto, on or off" ;;
esac
case "$DEVICE" in ""|auto|cuda|cpu) ;;
  *) die "device=$DEVICE is not a device; use device=auto, cuda or cpu" ;;
esac

if [[ -n ${PYTHON:-} ]]; then :
elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=python3
fi
command -v "$PYTHON" >/dev/null || die "python '$PYTHON' not found; set PYTHON=/path/to/python (with torch installed)"
ENTRY=${SPECDRAFT_ENTRY:-$REPO/train.py}

# ---- GPUs ----
count_gpus() {
  # CUDA_VISIBLE_DEVICES (also what Slurm sets) bounds what the ranks can see.
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} && -z $CUDA_VISIBLE_DEVICES ]]; then echo 0; return; fi
  local n
  if command -v nvidia-smi >/dev/null; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  else
    n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || n=0
  fi
  if (( n > 0 )) && [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    local visible
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    n=${#visible[@]}
  fi
  echo "$n"
}

if [[ $DEVICE == cpu ]]; then GPUS=0; else GPUS=$(count_gpus); fi
if (( GPUS == 0 )); then
  [[ $DEVICE == cuda ]] && die "device=cuda but no GPU is visible (nvidia-smi / torch found none, CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-}'); drop device=cuda to run on CPU"
  RUN_DEVICE=cpu
else
  RUN_DEVICE=cuda
fi

# The process count comes from lib/config/launch.py ProcessLayout, the rule train.py and the topology use;
# it prints its own one-line error (odd GPU count for disaggregate, odd NPROC) and exits 2.
config_cli() { (cd "$REPO" && "$PYTHON" -m lib.config.check "$@"); }
if [[ -n ${NPROC:-} ]]; then
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive integer; unset NPROC to derive it from the GPUs"
  NPROC_EFFECTIVE=$(config_cli nproc --placement "$PLACEMENT" --gpus "$GPUS" --nproc "$NPROC") || exit 2
else
  NPROC_EFFECTIVE=$(config_cli nproc --placement "$PLACEMENT" --gpus "$GPUS") || exit 2
fi

EXTRA=()
[[ $RUN_DEVICE == cpu && -z $DEVICE ]] && EXTRA+=(device=cpu)

# ---- MPS decision ----
if [[ $RUN_DEVICE == cuda && $PLACEMENT == colocate && $MPS_MODE != off ]]; then
  MPS_PLAN="start (mps=$MPS_MODE)"
else
  if [[ $MPS_MODE == off ]]; then why="mps=off"
  elif [[ $RUN_DEVICE == cpu ]]; then why="no GPU"
  else why="placement=$PLACEMENT does not share GPUs"
  fi
  [[ $MPS_MODE == on ]] && die "mps=on but MPS does not apply here ($why); use mps=auto or mps=off"
  MPS_PLAN="off ($why)"
fi

# ---- run directory: chosen once here so every rank (and every node) writes to the same place ----
if [[ -n $USER_RUN_DIR ]]; then
  RUN_DIR=$USER_RUN_DIR
  # Hydra strips one layer of quotes from the value; so must we, to find topology.json there.
  if [[ $RUN_DIR =~ ^\'(.*)\'$ || $RUN_DIR =~ ^\"(.*)\"$ ]]; then RUN_DIR=${BASH_REMATCH[1]}; fi
elif [[ -n ${SPECDRAFT_RUN_DIR:-} ]]; then
  RUN_DIR=$SPECDRAFT_RUN_DIR
else
  RUN_DIR=$REPO/outputs/$(date +%Y%m%d-%H%M%S)
  suffix=1
  base=$RUN_DIR
  while [[ -e $RUN_DIR ]]; do suffix=$(( suffix + 1 )); RUN_DIR=$base-$suffix; done
fi
CHECK_OVERRIDES=("${EXTRA[@]}" "${OVERRIDES[@]}")
if [[ -z $USER_RUN_DIR ]]; then
  # Hydra's override grammar needs quotes around values with spaces or other special characters.
  [[ $RUN_DIR == *\'* ]] && die "run directory '$RUN_DIR' contains a single quote; pass run.dir=<path without quotes>"
  if [[ $RUN_DIR =~ ^[A-Za-z0-9_./:+-]+$ ]]; then EXTRA=("run.dir=$RUN_DIR" "${EXTRA[@]}")
  else EXTRA=("run.dir='$RUN_DIR'" "${EXTRA[@]}")
  fi
  # A directory someone chose (SPECDRAFT_RUN_DIR by hand) may hold a checkpoint to resume; one made
  # fresh here or by train.sbatch cannot, and the check must see run.dir=auto to say so.
  if [[ -n ${SPECDRAFT_RUN_DIR:-} && ${SPECDRAFT_RUN_DIR_FRESH:-0} != 1 ]]; then
    CHECK_OVERRIDES=("${EXTRA[0]}" "${CHECK_OVERRIDES[@]}")
  fi
fi

# ---- config: checked once here, as every rank of train.py will check it, before MPS or torchrun ----
# A bad value prints its one line (from lib/config/check.py) and the launch exits 2. Another entry
# script (SPECDRAFT_ENTRY) takes other arguments, so only train.py's config is checked.
CONFIG_STATUS="not checked (SPECDRAFT_ENTRY is not train.py)"
if [[ $ENTRY -ef $REPO/train.py ]]; then
  if [[ $PRINT_PLAN == 1 ]]; then
    if err=$(config_cli check --gpus "$GPUS" --nproc "$NPROC_EFFECTIVE" --nnodes "${SPECDRAFT_NNODES:-1}" \
             -- "${CHECK_OVERRIDES[@]}" 2>&1 >/dev/null); then CONFIG_STATUS=ok; else CONFIG_STATUS=$err; fi
  else
    config_cli check --gpus "$GPUS" --nproc "$NPROC_EFFECTIVE" --nnodes "${SPECDRAFT_NNODES:-1}" \
      -- "${CHECK_OVERRIDES[@]}" >/dev/null || exit 2
    CONFIG_STATUS=ok
  fi
fi

# ---- environment for the ranks ----
if [[ -z ${PYTORCH_CUDA_ALLOC_CONF:-} && -z ${PYTORCH_ALLOC_CONF:-} ]]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  threads=$(( $(nproc) / NPROC_EFFECTIVE ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi
export SPECDRAFT_MPS=off  # becomes "on" once the daemon answers and a client probe passed

if [[ -n ${SPECDRAFT_RDZV_ENDPOINT:-} ]]; then
  [[ ${SPECDRAFT_NNODES:-} =~ ^[1-9][0-9]*$ ]] || die "SPECDRAFT_NNODES='${SPECDRAFT_NNODES:-}' must be the node count when SPECDRAFT_RDZV_ENDPOINT is set"
  RENDEZVOUS=(--nnodes "$SPECDRAFT_NNODES" --rdzv_backend c10d --rdzv_endpoint "$SPECDRAFT_RDZV_ENDPOINT"
              --rdzv_id "${SPECDRAFT_RDZV_ID:-specdraft}")
else
  RENDEZVOUS=(--standalone)
  # One node: gloo's sockets bind to loopback, not to the address the host name resolves to.
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
fi
# torchrun signals its ranks on SIGTERM and kills them --shutdown-timeout later: give the save its
# whole bound (run.save_timeout_s) plus 10 s for the step in flight. --log-dir puts each rank's error file
# (TORCHELASTIC_ERROR_FILE) where the failure summary below reads it.
# torchrun has --shutdown-timeout from torch 2.12 on; older ones kill their ranks 30 s after the signal
# (its fixed default), which still covers the default save bound. Found without importing torch.
SHUTDOWN=()
TORCHRUN_SRC=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' \
               2>/dev/null)/distributed/run.py
if grep -q -- '--shutdown-timeout' "$TORCHRUN_SRC" 2>/dev/null; then
  SHUTDOWN=(--shutdown-timeout "$(( SAVE_TIMEOUT_S + 10 ))")
fi
build_cmd() {
  # tools/torchrun.py is torchrun (torch.distributed.run's main) without the agent's ~0.9 s teardown.
  CMD=("$PYTHON" "$REPO/tools/torchrun.py" "${RENDEZVOUS[@]}" --nproc_per_node="$NPROC_EFFECTIVE"
       "${SHUTDOWN[@]}" --log-dir "$1"
       "$ENTRY" "${EXTRA[@]}" "${OVERRIDES[@]}")
}
build_cmd "${TMPDIR:-/tmp}/specdraft-launch.XXXXXX/elastic"  # the real directory is made at run time

if [[ $PRINT_PLAN == 1 ]]; then
  echo "gpus=$GPUS"
  echo "device=$RUN_DEVICE"
  echo "placement=$PLACEMENT"
  echo "nproc=$NPROC_EFFECTIVE"
  echo "mps=$MPS_PLAN"
  echo "run_dir=$RUN_DIR"
  echo "config=$CONFIG_STATUS"
  echo "env=PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF-} PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF-} OMP_NUM_THREADS=$OMP_NUM_THREADS"
  printf 'command='; printf '%q ' "${CMD[@]}"; echo
  exit 0
fi

# ---- run ----
mkdir -p -m 700 "$RUN_DIR" || die "cannot create run directory $RUN_DIR; pass run.dir=<writable path>"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/specdraft-launch.XXXXXX") || die "cannot create a temporary directory; set TMPDIR"
build_cmd "$WORK/elastic"
TORCHRUN_PID=""
TEE_PID=""
MPS_STARTED_HERE=0

mps_up() {
  # lib/launch/mps.py holds the lifecycle (shared with benchmarks); it prints the lines to source.
  (cd "$REPO" && "$PYTHON" -m lib.launch.mps up --mode "$MPS_MODE") >"$WORK/mps.env" \
    || die "MPS could not be brought up (mps=on); see the MPS log tail above"
  source "$WORK/mps.env"
}

mps_down() {
  # The state file is read again because a signal may arrive before mps_up sourced it.
  [[ -s $WORK/mps.env ]] && source "$WORK/mps.env"
  if [[ $MPS_STARTED_HERE == 1 ]]; then
    info "quitting the MPS daemon this launch started ($CUDA_MPS_PIPE_DIRECTORY)"
    (cd "$REPO" && "$PYTHON" -m lib.launch.mps down --pipe-dir "$CUDA_MPS_PIPE_DIRECTORY" --log-dir "$CUDA_MPS_LOG_DIRECTORY")
    MPS_STARTED_HERE=0
  fi
}

stop_tee() {
  [[ -n $TEE_PID ]] || return 0
  # tee ends when the last rank closes stderr; a rank that outlived torchrun must not hold us.
  local i
  for i in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  kill "$TEE_PID" 2>/dev/null
  wait "$TEE_PID" 2>/dev/null
  TEE_PID=""
}

cleanup() {
  stop_tee
  mps_down
  rm -rf "$WORK"
}

GOT_SIGNAL=""
SIGNAL_CODE=0
on_signal() {
  local name=$1 code=$2
  if [[ -z $TORCHRUN_PID ]]; then exit "$code"; fi  # nothing started yet (or it has ended)
  [[ -n $GOT_SIGNAL ]] && return  # Slurm signals every process, and may signal again: one stop is enough
  GOT_SIGNAL=SIG$name
  SIGNAL_CODE=$code
  # The ranks, not torchrun: each finishes its step, the trainers checkpoint, and they exit 0, so
  # torchrun ends cleanly too. (Signalled itself, torchrun forwards the signal and prints a traceback.)
  local ranks
  ranks=$(pgrep -P "$TORCHRUN_PID" 2>/dev/null | tr '\n' ' ')
  info "got SIG$name: asking the ranks ($ranks) to stop at the end of their step and checkpoint"
  [[ -n $ranks ]] && kill -TERM $ranks 2>/dev/null
}

report_stop() {
  "$PYTHON" - "$RUN_DIR/stopped.json" <<'PY' >&2
import json, sys
r = json.load(open(sys.argv[1]))
print(f"launch.sh: stopped on {r['signal']} after step {r['step']}; checkpoint {r['checkpoint']}")
PY
  local resume=(bash "$REPO/launch.sh" "${RESUME_ARGS[@]}" "run.dir=$RUN_DIR" checkpoint.resume=true)
  printf 'launch.sh: resume with: ' >&2; printf '%q ' "${resume[@]}" >&2; echo >&2
}

report_failure() {
  local rc=$1
  "$PYTHON" - "$WORK/torchrun.stderr" "$RUN_DIR/topology.json" "$NPROC_EFFECTIVE" "$PLACEMENT" "$rc" "$WORK/elastic" <<'PY' >&2
import glob, json, os, re, sys
log_path, topo_path, nproc, placement, rc, elastic_dir = sys.argv[1:7]
nproc = int(nproc)
try:
    text = open(log_path, errors="replace").read()
except OSError:
    text = ""
root_at = text.rfind("Root Cause")
failure = re.compile(r"host\s*:\s*(?P<host>\S+)\s*\n\s*rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*(?P<local>\d+)\)"
                     r"\s*\n\s*exitcode\s*:\s*(?P<exit>-?\d+)[^\n]*?(?:\((?P<sig>SIG\w+)\))?\s*$", re.M)
failed = {}
for m in failure.finditer(text):
    failed[int(m["rank"])] = (m, root_at >= 0 and m.start() > root_at)
# Each rank that raised wrote torchrun's error file (TORCHELASTIC_ERROR_FILE, lib/launch/stopping.py):
# the exception and the rank's identity. A rank killed by a signal wrote none; torchrun's summary names it.
errors = {}
for path in glob.glob(os.path.join(elastic_dir, "*", "attempt_*", "*", "error.json")):
    try:
        msg = json.load(open(path))["message"]
        extra = msg["extraInfo"]
        errors[int(extra["rank"])] = {"message": msg["message"], "role": extra.get("role"), "host": extra.get("host"),
                                      "exit": extra.get("exit_code"), "time": float(extra.get("time", 0)),
                                      "ended_pid": extra.get("ended_peer_pid")}
    except (OSError, ValueError, KeyError, TypeError):
        continue
try:
    topo = json.load(open(topo_path))
    records = topo.get("ranks", topo) if isinstance(topo, dict) else topo
    by_rank = {int(r["rank"]): r for r in records}
except (OSError, ValueError, TypeError, KeyError, AttributeError):
    by_rank = {}
# A rank that failed on a silent peer SIGKILLs it (lib/handoff/control.py end_silent_peer): torchrun may see
# that kill first, but the peer's death is the effect; the rank that named it holds the cause.
ended = {e["ended_pid"]: r for r, e in errors.items() if e.get("ended_pid")}
ended_by = {rank: ended[rec.get("pid")] for rank, rec in by_rank.items() if rec.get("pid") in ended}
signalled_root = [r for r, (m, is_root) in failed.items()
                  if is_root and m["sig"] and r not in errors and r not in ended_by]
if signalled_root:
    root = signalled_root[0]
elif errors:
    root = min(errors, key=lambda r: errors[r]["time"])
else:
    root = next((r for r, (m, is_root) in failed.items() if is_root), None)
print(f"launch.sh: torchrun exited with {rc}.")
if root in errors:
    e = errors[root]
    print(f"launch.sh: root cause: rank {root} ({e['role']}) on host {e['host']}, exit code {e['exit']}: {e['message']}")
for rank, e in sorted(errors.items()):
    if rank not in failed:  # exited with its error before torchrun listed it (e.g. a config error)
        failed[rank] = (None, False)
if not failed:
    print("launch.sh: torchrun named no failed rank (it may have stopped before starting the ranks, or was"
          " interrupted); see its output above.")
    sys.exit()
if not by_rank:
    print(f"launch.sh: {topo_path} was not written (the run stopped before building its topology); roles below"
          " follow the design's layout: local ranks [0, P/2) train, [P/2, P) run the engine.")
print("launch.sh: failed ranks:")
for rank, (m, _) in sorted(failed.items(), key=lambda kv: kv[0] != root):
    is_root = rank == root
    e = errors.get(rank)
    local = int(m["local"]) if m else int(by_rank.get(rank, {}).get("local_rank", rank % nproc))
    rec = by_rank.get(rank)
    if rec:
        role = (f"{rec.get('role')}, pair rank {rec.get('pair')}, device {rec.get('device')}, "
                f"pid {rec.get('pid')}")
    elif placement == "sequential":
        role = "sequential worker"
    else:
        half = nproc // 2
        role = "trainer" if local < half else "engine"
        role += f", pair local rank {local + half if local < half else local - half}"
    if m:
        exit_desc, host = m["exit"] + (f" ({m['sig']})" if m["sig"] else ""), m["host"]
    else:
        exit_desc, host = str(e["exit"]), e["host"]
    mark = ("  <- root cause (first to fail)" if is_root else
            f"  (ended by rank {ended_by[rank]}, which found it silent)" if rank in ended_by else "")
    cause = f"\n      {e['message']}" if e else ""
    print(f"  rank {rank} (local {local}, host {host}): {role}; exit code {exit_desc}{mark}{cause}")
PY
}

trap cleanup EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

info "run dir $RUN_DIR; $NPROC_EFFECTIVE processes on $RUN_DEVICE ($GPUS GPUs), placement=$PLACEMENT, mps: $MPS_PLAN"
[[ $MPS_PLAN == start* ]] && mps_up
info "SPECDRAFT_MPS=$SPECDRAFT_MPS"

# torchrun's stderr is copied to a file so its failure summary can be mapped to roles afterwards.
mkfifo "$WORK/stderr.fifo" || die "cannot create a fifo in $WORK; set TMPDIR to a local directory"
tee "$WORK/torchrun.stderr" <"$WORK/stderr.fifo" >&2 &
TEE_PID=$!
# A stop record left by an earlier launch in this directory is not this launch's.
rm -f "$RUN_DIR/stopped.json"
# In the background so a SIGTERM reaches our trap (and is forwarded) while torchrun runs.
"${CMD[@]}" 2>"$WORK/stderr.fifo" &
TORCHRUN_PID=$!
while :; do
  wait "$TORCHRUN_PID"
  RC=$?
  # wait also returns when a trap ran; only a reaped torchrun ends the loop.
  kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
TORCHRUN_PID=""
stop_tee
if [[ -s $RUN_DIR/stopped.json ]]; then
  # The trainers checkpointed after a signal (to this script, to torchrun or to any rank).
  report_stop
  exit "$EXIT_STOPPED"
fi
if (( RC != 0 )); then report_failure "$RC"; fi
if [[ -n $GOT_SIGNAL ]]; then
  info "stopped on $GOT_SIGNAL before the trainers wrote a checkpoint for it"
  (( RC == 0 )) && RC=$SIGNAL_CODE
fi
exit "$RC"
