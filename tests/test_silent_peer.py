"""A peer that is alive but silent: the control channel names it (PeerSilent, with its pid from the
socket) and end_silent_peer ends it, so a failing rank does not leave the job waiting on torchrun's
fixed 30 s grace for a process that cannot act on SIGTERM. Real processes and a real Unix socket."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lib.handoff.control import PeerError, PeerSilent, end_silent_peer, listen

pytestmark = pytest.mark.unit

CHILD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from lib.handoff.control import connect
channel = connect(sys.argv[1], "the test", 30)
print("connected", flush=True)
time.sleep(120)
"""


def test_a_silent_peer_is_named_with_its_pid_and_ended(tmp_path):
    address = str(tmp_path / "s")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, address, repo], stdout=subprocess.PIPE, text=True)
    try:
        channel = listen(address, "engine rank 1 on host h", 60)
        assert child.stdout.readline().strip() == "connected"
        assert channel.peer_pid == child.pid
        with pytest.raises(PeerSilent, match="engine rank 1 on host h sent nothing within 0.2 s") as caught:
            channel.recv(0.2, waiting_for="the next step")
        assert caught.value.peer_pid == child.pid
        # Wrapped by the failing rank's own error, as train.py sees it.
        try:
            raise RuntimeError("the trainer step failed") from caught.value
        except RuntimeError as wrapped:
            assert end_silent_peer(wrapped) == child.pid
        assert child.wait(timeout=10) == -signal.SIGKILL
        channel.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_other_failures_end_no_one():
    assert end_silent_peer(PeerError("handoff: the peer died (control socket closed)")) is None
    assert end_silent_peer(RuntimeError("unrelated")) is None
    assert end_silent_peer(PeerSilent("silent, pid unknown", None)) is None
    assert end_silent_peer(PeerSilent("itself", os.getpid())) is None
