"""In-process handoff: the Sender and Receiver interface over slots in this process's memory.

Used by placement=sequential (one process runs the engine step, then the trainer step) and by tests.
It holds at most `slots` payloads, like the ring; with one thread, a caller that sends `slots` steps
without releasing any gets PeerError from the next acquire() instead of a silent hang. Both roles must
use the same CUDA stream (true for one thread): no events are recorded between them.
"""
from __future__ import annotations

import threading
from collections import deque

import torch

from lib.data.batch import TensorSpec
from lib.handoff.control import HandoffClosed, PeerError
from lib.handoff.slots import SlotLayout, normalize_device, trim


class LocalTransport:
    def __init__(self, specs: list[TensorSpec], slots: int, device: torch.device | str = "cpu",
                 timeout_s: float = 60.0, peer: str = "in-process trainer"):
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"LocalTransport slots={slots!r} must be an int >= 1")
        if not timeout_s > 0:
            raise ValueError(f"LocalTransport timeout_s={timeout_s!r} must be > 0 seconds")
        self._layout = SlotLayout(tuple(specs))
        device = normalize_device(device)
        self._flat = torch.empty(slots * self._layout.slot_bytes, dtype=torch.uint8, device=device)
        self._views = [self._layout.views(self._flat, k) for k in range(slots)]
        self._timeout_s = timeout_s
        self.peer = peer
        self._free = deque(range(slots))
        self._sent: deque[tuple[int, dict]] = deque()
        self._held: deque[int] = deque()
        self._acquired: int | None = None
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self) -> dict[str, torch.Tensor]:
        with self._cond:
            if self._acquired is None:
                if not self._cond.wait_for(lambda: self._free or self._closed, self._timeout_s):
                    raise PeerError(f"handoff: all {len(self._views)} slots are held and the {self.peer} released none "
                                    f"within {self._timeout_s:g} s; call release() after each recv()")
                if self._closed:
                    raise RuntimeError("handoff LocalTransport.acquire() after close()")
                self._acquired = self._free.popleft()
            return self._views[self._acquired]

    def send(self, payload: dict[str, torch.Tensor], header: dict) -> None:
        num_rows = self._layout.num_rows(header)
        views = self.acquire()
        self._layout.write(views, payload, num_rows)
        with self._cond:
            self._sent.append((self._acquired, dict(header)))
            self._acquired = None
            self._cond.notify_all()

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._sent or self._closed, self._timeout_s):
                raise PeerError(f"handoff: the in-process engine sent nothing within {self._timeout_s:g} s; call send() before recv()")
            if not self._sent:
                raise HandoffClosed("handoff: the in-process transport is closed; no more steps will come")
            slot, header = self._sent.popleft()
            self._held.append(slot)
            return header, trim(self._views[slot], self._layout.num_rows(header))

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("handoff LocalTransport.release() without a received, unreleased step; call recv() first")
            self._free.append(self._held.popleft())
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._views, self._flat = [], None
            self._sent.clear()
            self._cond.notify_all()
