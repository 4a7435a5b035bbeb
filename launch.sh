#!/usr/bin/env bash
# Launch one node of a training run: detect GPUs, pick the process count, check the config once,
# bring MPS up for colocation, run torchrun with every argument forwarded as a Hydra override, then
# quit MPS (only if this script started it) and report which rank failed and its role.
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
for arg in "$@"; do
  case "$arg" in
    --print-plan) PRINT_PLAN=1; continue ;;
    -h|--help) usage; exit 0 ;;
  esac
  OVERRIDES+=("$arg")
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

# The process count comes from lib/config.py ProcessLayout, the rule train.py and the topology use;
# it prints its own one-line error (odd GPU count for disaggregate, odd NPROC) and exits 2.
config_cli() { (cd "$REPO" && "$PYTHON" -m lib.config "$@"); }
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
# A bad value prints its one line (from lib/config_check.py) and the launch exits 2. Another entry
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
fi
CMD=("$PYTHON" -m torch.distributed.run "${RENDEZVOUS[@]}" --nproc_per_node="$NPROC_EFFECTIVE"
     "$ENTRY" "${EXTRA[@]}" "${OVERRIDES[@]}")

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
mkdir -p "$RUN_DIR" || die "cannot create run directory $RUN_DIR; pass run.dir=<writable path>"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/specdraft-launch.XXXXXX") || die "cannot create a temporary directory; set TMPDIR"
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

on_signal() {
  local name=$1 code=$2
  trap '' INT TERM
  if [[ -n $TORCHRUN_PID ]] && kill -0 "$TORCHRUN_PID" 2>/dev/null; then
    info "got SIG$name: stopping torchrun (pid $TORCHRUN_PID) and its ranks"
    kill -TERM "$TORCHRUN_PID" 2>/dev/null
    wait "$TORCHRUN_PID"
    local rc=$?
    (( rc != 0 )) && code=$rc
  fi
  exit "$code"
}

report_failure() {
  local rc=$1
  "$PYTHON" - "$WORK/torchrun.stderr" "$RUN_DIR/topology.json" "$NPROC_EFFECTIVE" "$PLACEMENT" "$rc" <<'PY' >&2
import json, re, sys
log_path, topo_path, nproc, placement, rc = sys.argv[1:6]
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
try:
    topo = json.load(open(topo_path))
    records = topo.get("ranks", topo) if isinstance(topo, dict) else topo
    by_rank = {int(r["rank"]): r for r in records}
except (OSError, ValueError, TypeError, KeyError, AttributeError):
    by_rank = {}
print(f"launch.sh: torchrun exited with {rc}.")
if not failed:
    print("launch.sh: torchrun named no failed rank (it may have stopped before starting the ranks, or was"
          " interrupted); see its output above.")
    sys.exit()
if not by_rank:
    print(f"launch.sh: {topo_path} was not written (the run stopped before building its topology); roles below"
          " follow the design's layout: local ranks [0, P/2) train, [P/2, P) run the engine.")
print("launch.sh: failed ranks:")
for rank, (m, is_root) in sorted(failed.items(), key=lambda kv: not kv[1][1]):
    local = int(m["local"])
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
    exit_desc = m["exit"] + (f" ({m['sig']})" if m["sig"] else "")
    mark = "  <- root cause (first to fail)" if is_root else ""
    print(f"  rank {rank} (local {local}, host {m['host']}): {role}; exit code {exit_desc}{mark}")
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
# In the background so a SIGTERM reaches our trap (and is forwarded) while torchrun runs.
"${CMD[@]}" 2>"$WORK/stderr.fifo" &
TORCHRUN_PID=$!
wait "$TORCHRUN_PID"
RC=$?
TORCHRUN_PID=""
stop_tee
if (( RC != 0 )); then report_failure "$RC"; fi
exit "$RC"
