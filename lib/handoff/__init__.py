"""Engine -> trainer handoff: a ring of K payload slots plus a Unix-socket control channel.

make_sender / make_receiver pair one engine with its trainer across processes (shared memory on CPU,
CUDA IPC on GPU); LocalTransport offers the same interface inside one process.
"""
from __future__ import annotations

from lib.handoff.control import HandoffClosed, PeerError
from lib.handoff.local import LocalTransport
from lib.handoff.ring import HandoffMismatch, Receiver, Sender, make_receiver, make_sender

__all__ = ["HandoffClosed", "HandoffMismatch", "LocalTransport", "PeerError", "Receiver", "Sender",
           "make_receiver", "make_sender"]
