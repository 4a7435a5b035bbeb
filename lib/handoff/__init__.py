"""Engine -> trainer handoff: a ring of K payload slots plus a Unix-socket control channel.

make_sender / make_receiver pair one engine with its trainer across processes (shared memory on CPU,
CUDA IPC on GPU). placement=sequential needs no handoff: its trainer calls the engine step directly
(lib/trainer/sources.py InlineSource).
"""
from __future__ import annotations

from lib.handoff.control import HandoffClosed, PeerError, PeerSilent, end_silent_peer, silent_peer_pid
from lib.handoff.ring import HandoffMismatch, Receiver, Sender, make_receiver, make_sender

__all__ = ["HandoffClosed", "HandoffMismatch", "PeerError", "PeerSilent", "Receiver", "Sender", "end_silent_peer",
           "make_receiver", "make_sender", "silent_peer_pid"]
