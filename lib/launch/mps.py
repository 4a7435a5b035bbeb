"""NVIDIA MPS: per-role client settings, a status check, and the daemon lifecycle.

MPS lets the kernels of a colocated engine and trainer run concurrently on one GPU instead of
time-slicing. launch.sh and slurm/train.sbatch drive the daemon through this module's command
line (`python -m lib.launch.mps up|down|status`) and benchmarks use `MpsDaemon` directly, so the rules
live in one place:
- a daemon that already answers on our pipe directory is reused and never quit by us;
- otherwise `nvidia-cuda-mps-control -d` is started, waited for (bounded), then one client is probed;
- a failed start or probe under mode=auto falls back to time slicing with a warning; under mode=on
  it is an error carrying the tail of the MPS logs;
- only a daemon we started is quit.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from lib.config import MpsMode

CONTROL_TOOL = "nvidia-cuda-mps-control"
# Where CUDA clients look for a daemon when CUDA_MPS_PIPE_DIRECTORY is unset.
SYSTEM_PIPE_DIR = "/tmp/nvidia-mps"
PROBE_CODE = "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
STATUS_ENV = "SPECDRAFT_MPS"  # "on"/"off", set by the launcher for train.py to log
_SIZE = re.compile(r"^[1-9][0-9]*[MG]$")
_ANSWER_TIMEOUT_S = 5.0
_QUIT_TIMEOUT_S = 30.0


class MpsError(RuntimeError):
    """MPS was required (mps=on) but could not be brought up; the message carries the log tail."""


def default_base_dir() -> str:
    # Per user and outside any run directory, so concurrent or successive runs share one daemon.
    return os.path.join(tempfile.gettempdir(), f"specdraft-mps-{os.getuid()}")


def apply_role_mps_env(
    role: str,
    sm_percentage: Optional[int],
    pinned_mem_limit: Optional[str],
    device_ordinal: int = 0,
) -> dict[str, str]:
    """Set this process's MPS client limits; returns the variables it set.

    CUDA reads both variables when it creates the context, so this must run before the first
    CUDA call of the process. `pinned_mem_limit` is a size such as "40G" or "512M" applied to
    `device_ordinal` (the process's CUDA device index), or a full MPS list such as "0=40G,1=20G".
    Without an MPS daemon the variables are ignored by CUDA, so setting them is always safe.
    """
    if not isinstance(role, str) or not role:
        raise ValueError(f"apply_role_mps_env: role={role!r} must be a non-empty name such as 'trainer'")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            f"apply_role_mps_env(role={role!r}) called after CUDA was initialised in this process; "
            "MPS limits are read at CUDA context creation, so call it before the first CUDA call"
        )
    updates: dict[str, str] = {}
    if sm_percentage is not None:
        if isinstance(sm_percentage, bool) or not isinstance(sm_percentage, int) or not 1 <= sm_percentage <= 100:
            raise ValueError(
                f"{role}: MPS SM percentage={sm_percentage!r} must be an integer in 1..100 "
                "(the share of the GPU's SMs this role may use), or null for no limit"
            )
        updates["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_percentage)
    if pinned_mem_limit is not None:
        updates["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = _pinned_limit_value(role, pinned_mem_limit, device_ordinal)
    os.environ.update(updates)
    return updates


def _pinned_limit_value(role: str, limit: str, device_ordinal: int) -> str:
    fix = 'use a size such as "40G" or "512M", or a list such as "0=40G,1=20G"'
    if not isinstance(limit, str):
        raise ValueError(f"{role}: MPS pinned memory limit={limit!r} is not a string; {fix}")
    if "=" not in limit:
        if not _SIZE.match(limit):
            raise ValueError(f"{role}: MPS pinned memory limit={limit!r} is not a size; {fix}")
        if isinstance(device_ordinal, bool) or not isinstance(device_ordinal, int) or device_ordinal < 0:
            raise ValueError(f"{role}: device_ordinal={device_ordinal!r} must be a CUDA device index >= 0")
        return f"{device_ordinal}={limit}"
    for pair in limit.split(","):
        ordinal, _, size = pair.partition("=")
        if not ordinal.isdigit() or not _SIZE.match(size):
            raise ValueError(f"{role}: MPS pinned memory limit={limit!r}: entry {pair!r} is not ORDINAL=SIZE; {fix}")
    return limit


def daemon_alive(pipe_dir: str) -> bool:
    """True when a control daemon owns `pipe_dir`.

    The daemon leaves its `control` socket behind when it quits but removes its pid file, so both
    are checked, and the pid must name a live process.
    """
    control = os.path.join(pipe_dir, "control")
    pid_file = os.path.join(pipe_dir, "nvidia-cuda-mps-control.pid")
    try:
        if not stat.S_ISSOCK(os.stat(control).st_mode):
            return False
        with open(pid_file) as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def mps_status(env: Optional[Mapping[str, str]] = None) -> str:
    """Whether CUDA clients of this process will use MPS: "on", "off" or "unknown".

    "on" when they will connect to a live MPS daemon, "off" when no daemon answers there.

    "unknown" when the pipe directory cannot be read, or the launcher declared MPS on
    (SPECDRAFT_MPS=on) but no daemon answers there (it died, or the directory is not visible).
    A system-wide daemon in /tmp/nvidia-mps counts: clients without a pipe variable use it.
    """
    env = os.environ if env is None else env
    pipe_dir = env.get(PIPE_ENV) or SYSTEM_PIPE_DIR
    try:
        alive = daemon_alive(pipe_dir)
    except PermissionError:
        return "unknown"
    if alive:
        return "on"
    return "unknown" if env.get(STATUS_ENV) == "on" else "off"


def _tail(path: str, lines: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


@dataclass
class MpsDaemon:
    """Brings an MPS control daemon up for a scope and quits it afterwards if it started it.

        with MpsDaemon("auto") as mps:
            subprocess.run(cmd, env=mps.client_env())   # MPS clients when mps.active

    `client_env()` of a daemon that is not active (mode="off", or an auto fallback) gives an
    environment without our pipe variables, so benchmarks can run both arms in one invocation.
    """

    mode: str = "auto"
    pipe_dir: Optional[str] = None  # default: $CUDA_MPS_PIPE_DIRECTORY, else <tmp>/specdraft-mps-<uid>/pipe
    log_dir: Optional[str] = None  # default: $CUDA_MPS_LOG_DIRECTORY, else <tmp>/specdraft-mps-<uid>/log
    start_timeout_s: float = 20.0
    probe_timeout_s: float = 120.0  # importing torch and creating the first context can be slow
    probe_command: Optional[Sequence[str]] = None  # default: a one-line torch CUDA call
    active: bool = field(init=False, default=False)
    started_here: bool = field(init=False, default=False)
    fallback_reason: str = field(init=False, default="")

    def __post_init__(self) -> None:
        try:
            self.mode = MpsMode(self.mode).value
        except ValueError:
            raise ValueError(f"mps={self.mode!r} is not a mode; use one of auto, on, off") from None
        for name in ("start_timeout_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MpsDaemon {name}={getattr(self, name)!r} must be > 0 seconds")
        base = default_base_dir()
        self.pipe_dir = self.pipe_dir or os.environ.get(PIPE_ENV) or os.path.join(base, "pipe")
        self.log_dir = self.log_dir or os.environ.get(LOG_ENV) or os.path.join(base, "log")
        if self.probe_command is None:
            self.probe_command = [sys.executable, "-c", PROBE_CODE]
        elif isinstance(self.probe_command, str) or not self.probe_command:
            raise ValueError(f"MpsDaemon probe_command={self.probe_command!r} must be a non-empty argv list")

    def _tool_env(self) -> dict[str, str]:
        return {**os.environ, PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir}

    def _control(self, command: str, timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CONTROL_TOOL], input=command + "\n", capture_output=True, text=True,
            env=self._tool_env(), timeout=timeout_s,
        )

    def answers(self) -> bool:
        """True when a control daemon responds on our pipe directory."""
        if shutil.which(CONTROL_TOOL) is None:
            return False
        try:
            return self._control("get_server_list", _ANSWER_TIMEOUT_S).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def start(self) -> bool:
        """Bring MPS up (or find it up); returns `active`. Raises MpsError only under mode=on."""
        if self.mode == "off" or self.active:
            return self.active
        if shutil.which(CONTROL_TOOL) is None:
            return self._unavailable(f"{CONTROL_TOOL} is not on PATH (it ships with the NVIDIA driver)")
        if not self.answers():
            problem = self._launch()
            if problem:
                return self._unavailable(problem)
        ok, output = self.probe()
        if not ok:
            return self._unavailable(f"a probe client failed under MPS: {output}")
        self.active = True
        return True

    def _launch(self) -> str:
        """Start the daemon and wait until it answers; returns the problem, or "" on success."""
        for d in (self.pipe_dir, self.log_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # Output goes to a file: the daemon forks and may keep a pipe open, which would block a reader.
        with tempfile.TemporaryFile(mode="w+") as out:
            try:
                rc = subprocess.run(
                    [CONTROL_TOOL, "-d"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    env=self._tool_env(), timeout=self.start_timeout_s,
                ).returncode
            except subprocess.TimeoutExpired:
                return f"`{CONTROL_TOOL} -d` did not return within {self.start_timeout_s:g} s"
            out.seek(0)
            said = out.read().strip()
        if rc != 0:
            return f"`{CONTROL_TOOL} -d` exited with {rc}: {said or 'no output'}"
        self.started_here = True
        deadline = time.monotonic() + self.start_timeout_s
        while not self.answers():
            if time.monotonic() > deadline:
                return f"the daemon did not answer on {self.pipe_dir}/control within {self.start_timeout_s:g} s"
            time.sleep(0.2)
        return ""

    def probe(self) -> tuple[bool, str]:
        """Run one tiny CUDA client against our daemon; returns (ok, the tail of its output)."""
        try:
            done = subprocess.run(
                list(self.probe_command), capture_output=True, text=True,
                env=self._tool_env(), timeout=self.probe_timeout_s,
            )
        except subprocess.TimeoutExpired:
            return False, f"no answer within {self.probe_timeout_s:g} s"
        except OSError as e:
            return False, str(e)
        said = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return done.returncode == 0, " | ".join(said) or f"exit code {done.returncode}"

    def _unavailable(self, reason: str) -> bool:
        self.quit()
        if self.mode == "on":
            raise MpsError(f"mps=on but MPS is unavailable: {reason}\n{self.log_tail()}\n"
                           "Fix: run where the MPS server can start (host IPC, no conflicting compute "
                           "mode), or use mps=auto to fall back to time slicing.")
        self.fallback_reason = reason
        print(f"warning: MPS unavailable ({reason}); colocated processes will time-slice the GPU "
              "(slower, see docs/launching.md)", file=sys.stderr)
        return False

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for name in ("control.log", "server.log"):
            path = os.path.join(self.log_dir, name)
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts) or f"(no MPS logs in {self.log_dir})"

    def quit(self) -> None:
        """Quit the daemon if this object started it; a reused daemon is left running."""
        self.active = False
        if not self.started_here:
            return
        self.started_here = False
        try:
            self._control("quit", _QUIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"warning: MPS daemon on {self.pipe_dir} did not acknowledge quit within "
                  f"{_QUIT_TIMEOUT_S:g} s (clients still running?)", file=sys.stderr)
            return
        deadline = time.monotonic() + _QUIT_TIMEOUT_S
        while daemon_alive(self.pipe_dir) and time.monotonic() < deadline:
            time.sleep(0.1)

    def client_env(self, base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """An environment for child processes: MPS clients of this daemon when active, else not."""
        env = dict(os.environ if base is None else base)
        if self.active:
            env.update({PIPE_ENV: self.pipe_dir, LOG_ENV: self.log_dir, STATUS_ENV: "on"})
        else:
            for key, ours in ((PIPE_ENV, self.pipe_dir), (LOG_ENV, self.log_dir)):
                if env.get(key) == ours:
                    env.pop(key)
            env[STATUS_ENV] = "off"
        return env

    def __enter__(self) -> "MpsDaemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.quit()


def _shell_state(daemon: MpsDaemon) -> str:
    """Lines the launcher sources: what to export and whether it must quit the daemon at exit."""
    q = shlex.quote
    if daemon.active:
        lines = [f"export {PIPE_ENV}={q(daemon.pipe_dir)}", f"export {LOG_ENV}={q(daemon.log_dir)}",
                 f"export {STATUS_ENV}=on"]
    else:
        lines = [f"unset {PIPE_ENV} {LOG_ENV}", f"export {STATUS_ENV}=off"]
    lines.append(f"MPS_STARTED_HERE={int(daemon.started_here)}")
    return "\n".join(lines) + "\n"


def _raise_on_sigterm(signum, frame):  # lets `finally` quit a half-started daemon
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.launch.mps", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up", help="start or reuse the daemon; prints shell lines to source")
    up.add_argument("--mode", default="auto", choices=[m.value for m in MpsMode])
    up.add_argument("--start-timeout", type=float, default=20.0)
    down = sub.add_parser("down", help="quit the daemon on the pipe directory (only call if you started it)")
    sub.add_parser("status", help="print on/off/unknown for this environment")
    for p in (up, down):
        p.add_argument("--pipe-dir")
        p.add_argument("--log-dir")
    args = parser.parse_args(argv)

    if args.verb == "status":
        print(mps_status())
        return 0
    if args.verb == "down":
        daemon = MpsDaemon("on", pipe_dir=args.pipe_dir, log_dir=args.log_dir)
        daemon.started_here = daemon.answers()  # the caller vouches it started this daemon
        daemon.quit()
        return 0
    probe = os.environ.get("SPECDRAFT_MPS_PROBE")  # a stand-in client where torch is not the CUDA user
    daemon = MpsDaemon(args.mode, pipe_dir=args.pipe_dir, log_dir=args.log_dir,
                       start_timeout_s=args.start_timeout,
                       probe_command=shlex.split(probe) if probe else None)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        daemon.start()
    except MpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        daemon.quit()
        raise
    sys.stdout.write(_shell_state(daemon))
    return 0


if __name__ == "__main__":
    sys.exit(main())
