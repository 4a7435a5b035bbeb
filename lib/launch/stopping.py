"""Graceful stop on SIGTERM/SIGINT, the bound on a checkpoint save, and the test-only fault hooks.

A scheduler (Slurm at the time limit or on preemption) sends SIGTERM to every process of the job;
launch.sh sends it to every rank when it gets one itself. A rank does not die on it: the handler only
notes the request. Trainers agree on it inside the step's metric all-reduce (lib/trainer/loop.py), so
all of them finish the step in flight, checkpoint at that step and return; an engine passes its own
request on in the next payload header and stops when its trainer closes the handoff. The launch then
exits with EXIT_STOPPED and prints the command that resumes (docs/reliability.md).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

log = logging.getLogger("specdraft.stop")

# launch.sh exits with this after a signal stopped the run at a checkpoint (sysexits' EX_TEMPFAIL:
# "try again later", which is what a resume does). Documented in docs/reliability.md.
EXIT_STOPPED = 75
STOP_RECORD = "stopped.json"  # written by the trainer leader into run.dir; read by launch.sh

_request: dict[str, float | str] = {}


_owner_pid: list[int] = []  # the rank that installed the handlers


def _note(signum: int, _frame) -> None:
    if _owner_pid and os.getpid() != _owner_pid[0]:
        # A forked child (a tokenizer worker) inherits this handler, but its parent may terminate it
        # with SIGTERM and wait for it to exit: it must die of the signal, not note it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    # Only record: the loop acts at the next step boundary. A second signal (Slurm signals every process,
    # and launch.sh forwards its own) changes nothing; the save's own deadline bounds the stop.
    if not _request:
        _request.update(signal=signal.Signals(signum).name, at=time.time())


def install_stop_handlers() -> None:
    """SIGTERM and SIGINT request a stop at the next step boundary instead of killing the process."""
    _owner_pid[:] = [os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note)


def stop_requested() -> Optional[str]:
    """The name of the signal that asked this process to stop (e.g. "SIGTERM"), or None."""
    return _request.get("signal")  # type: ignore[return-value]


def write_stop_record(run_dir: str, step: int, checkpoint: str, signal_name: str) -> None:
    """What launch.sh reports after the stop: the step the trainers stopped at and its checkpoint."""
    record = {"signal": signal_name, "step": step, "checkpoint": checkpoint, "time": time.time(),
              "signal_time": _request.get("at")}
    tmp = os.path.join(run_dir, STOP_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(run_dir, STOP_RECORD))


# ---- structured errors: torch.distributed.elastic's error file, with the rank's identity added ----

def record_error(exc: BaseException, rank: int, role: str, exit_code: int, ended_peer_pid: Optional[int] = None) -> None:
    """Write `exc` to TORCHELASTIC_ERROR_FILE (torchrun sets it per rank) the way elastic's ErrorHandler
    does, plus rank, role, host and exit code, which launch.sh's failure summary shows; ended_peer_pid: a
    silent peer this rank killed (its SIGKILL is this failure's effect, not a cause). No-op outside torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    handler = ErrorHandler()
    path = handler._get_error_file_path()
    if not path:
        return
    try:
        handler.record_exception(exc)  # elastic's own format (torchrun reads it for its summary)
        with open(path) as f:
            data = json.load(f)
        data["message"]["extraInfo"].update(rank=rank, role=role, host=socket.gethostname(), pid=os.getpid(),
                                            exit_code=exit_code, time=time.time(), ended_peer_pid=ended_peer_pid)
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)
    except (OSError, ValueError, KeyError) as err:  # never hide the original failure behind this one
        log.warning("could not record the error in %s: %s", path, err)


# ---- a bound on a save ----

@contextmanager
def deadline(seconds: float, what: str, rank: int, role: str) -> Iterator[None]:
    """Run the body; if it takes longer than `seconds`, record the error and end the process (exit 1).

    A save that hangs (a stuck filesystem, a peer gone mid-collective) must not outlive the scheduler's
    grace period after SIGTERM, and torchrun kills the ranks --shutdown-timeout after its own signal.
    """
    done = threading.Event()

    def expire() -> None:
        if done.wait(seconds):
            return
        err = TimeoutError(f"{what} did not finish within run.save_timeout_s={seconds:g}; the previous complete "
                           "checkpoint is kept (a half-written one is never resumed)")
        log.error("%s", err)
        record_error(err, rank, role, 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    watcher = threading.Thread(target=expire, name="save-deadline", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


# ---- test-only fault hooks (environment variables; unset in every real run) ----

def fault_nan_steps(trainer_rank: int) -> frozenset[int]:
    """SPECDRAFT_TEST_NAN_GRAD="R@s1,s2,...": trainer R's gradients turn NaN at those (1-based) steps."""
    spec = os.environ.get("SPECDRAFT_TEST_NAN_GRAD", "")
    if not spec:
        return frozenset()
    rank, _, steps = spec.partition("@")
    return frozenset(int(s) for s in steps.split(",") if s) if int(rank) == trainer_rank else frozenset()


def fault_pause_in_save(step: int) -> None:
    """SPECDRAFT_TEST_SAVE_PAUSE="N:S": the save of step N holds S seconds between its shards and meta.json
    (so the process ends inside the write when run.save_timeout_s is shorter)."""
    spec = os.environ.get("SPECDRAFT_TEST_SAVE_PAUSE", "")
    if not spec or int(spec.split(":")[0]) != step:
        return
    time.sleep(float(spec.split(":")[1]))
