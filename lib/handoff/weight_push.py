"""Trainer -> engine weight push for online evaluation, without NCCL (same GPU, or CPU).

The trainer leader, holding the gathered draft state dict, packs its tensors into one flat bucket per
dtype inside one buffer that is allocated once and reused: the handoff's own slot stores
(lib/handoff/slots.py) with a single slot, i.e. a /dev/shm file on CPU and a CUDA IPC buffer with
interprocess events on GPU. A small message over a Unix socket says what is where. The engine applies
a push between batches, straight from the buffer into its own draft copy, then acknowledges.

Protocol (publisher = trainer, subscriber = engine; the subscriber listens, as the handoff's engine):
  -> {"kind": "weights", "version", "tensors": [[name, dtype, shape, offset]], "buckets", "meta"},
     with a pickled buffer export when the buffer is new (first push, or a changed tensor layout)
  <- {"kind": "ack", "version"} once the subscriber no longer reads the buffer
  <- {"kind": "report", "row"}: an evaluation row for the trainer's metrics.jsonl
  <- {"kind": "error", "message"}: the subscriber could not apply a push
  -> {"kind": "close"}
The publisher waits for the previous version's ack before it overwrites the buffer, so one buffer is
enough: pushes are rare (every eval.every steps) and the engine looks for one between batches.
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from lib.data.batch import TensorSpec
from lib.handoff.control import HandoffClosed, PeerError, connect, listen
from lib.handoff.slots import SlotLayout, create_store, normalize_device, open_store


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise PeerError(f"weight push: unknown dtype {name!r} in a push message")
    return value


@dataclass(frozen=True)
class PackedLayout:
    """Where each tensor lives: one bucket per dtype, tensors back to back inside it."""

    tensors: tuple[tuple[str, str, tuple[int, ...], int], ...]  # name, dtype, shape, element offset in its bucket
    buckets: tuple[tuple[str, int], ...]  # dtype, elements

    @classmethod
    def plan(cls, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> "PackedLayout":
        sizes: dict[str, int] = {}
        tensors = []
        for name, (dtype, shape) in shapes.items():
            key = _dtype_name(dtype)
            numel = 1
            for d in shape:
                numel *= d
            tensors.append((name, key, tuple(shape), sizes.get(key, 0)))
            sizes[key] = sizes.get(key, 0) + numel
        empty = [k for k, n in sizes.items() if n == 0]
        if empty:
            raise ValueError(f"weight push: only empty tensors of dtype {empty}; leave empty tensors out")
        return cls(tuple(tensors), tuple(sorted(sizes.items())))

    @classmethod
    def from_message(cls, message: dict) -> "PackedLayout":
        return cls(tuple((n, d, tuple(s), o) for n, d, s, o in message["tensors"]),
                   tuple((d, n) for d, n in message["buckets"]))

    def to_message(self) -> dict:
        return {"tensors": [list(t) for t in self.tensors], "buckets": [list(b) for b in self.buckets]}

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=_dtype(d)).element_size() for d, n in self.buckets)

    def slot_layout(self) -> SlotLayout:
        # A bucket is one row of `elements` values, so the store's row trimming never cuts it.
        return SlotLayout(tuple(TensorSpec(d, _dtype(d), (n,), 1) for d, n in self.buckets))

    def views(self, buckets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, dtype, shape, offset in self.tensors:
            numel = 1
            for d in shape:
                numel *= d
            out[name] = buckets[dtype][0, offset:offset + numel].view(shape)
        return out


class WeightPublisher:
    """Trainer side. publish(state_dict, version) -> milliseconds the push took on this side."""

    def __init__(self, address: str, device: torch.device | str, *, cast_dtype: Optional[torch.dtype] = None,
                 timeout_s: float = 120.0, startup_timeout_s: float = 900.0, peer: str = "engine"):
        self.device = normalize_device(device)
        self.cast_dtype = cast_dtype  # floating tensors are sent in this dtype (e.g. the engine's bf16)
        self._timeout_s = timeout_s
        self._channel = connect(address, peer, startup_timeout_s)
        self._store = None
        self._layout: Optional[PackedLayout] = None
        self._unacked: Optional[int] = None
        self._store_unopened = False
        self.version: Optional[int] = None
        self.buffers_allocated = 0
        self.last_push: dict[str, Any] = {}
        self._reports: list[dict] = []

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int, meta: Optional[dict] = None) -> float:
        """Pack and announce `state_dict` as `version` (strictly increasing); returns the push's cost in
        ms, including the wait for the engine to release the previous version."""
        start = time.perf_counter()
        if isinstance(version, bool) or not isinstance(version, int) or (self.version is not None and version <= self.version):
            raise ValueError(f"weight push version={version!r} must be an int greater than the last one "
                             f"({self.version}); use the trainer step")
        if not state_dict:
            raise ValueError("weight push of an empty state dict: pass the draft's tensors")
        self._await_ack()
        waited = time.perf_counter()
        tensors = {name: t.detach() for name, t in state_dict.items()}
        layout = PackedLayout.plan({name: (self._wire_dtype(t), tuple(t.shape)) for name, t in tensors.items()})
        blob = b""
        if layout != self._layout:
            self._replace_store(layout)
            blob = pickle.dumps(self._store.export())
        self._store.before_write(0)
        views = layout.views(self._store.views(0))
        with torch.no_grad():
            for name, tensor in tensors.items():
                views[name].copy_(tensor)
        self._store.after_write(0)
        self._channel.send({"kind": "weights", "version": version, "meta": meta, **layout.to_message()}, blob,
                           timeout_s=self._timeout_s)
        self.version = self._unacked = version
        total_ms = 1e3 * (time.perf_counter() - start)
        self.last_push = {"version": version, "bytes": layout.nbytes, "new_buffer": bool(blob),
                          "wait_ms": 1e3 * (waited - start), "total_ms": total_ms}
        return total_ms

    def poll_reports(self) -> list[dict]:
        """Evaluation rows the engine sent back since the last call; never blocks."""
        while not self._channel.closed and self._channel.readable():
            message, _ = self._channel.recv(self._timeout_s, waiting_for="a message from the engine")
            self._handle(message)
        rows, self._reports = self._reports, []
        return rows

    def close(self) -> None:
        try:
            if not self._channel.closed:
                self._channel.send({"kind": "close"}, timeout_s=self._timeout_s)
        except PeerError:
            pass  # the engine is gone already
        finally:
            self._channel.close()
            if self._store is not None:
                self._store.close()
                self._store = None

    def _wire_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.cast_dtype if self.cast_dtype is not None and tensor.is_floating_point() else tensor.dtype

    def _replace_store(self, layout: PackedLayout) -> None:
        if self._store is not None:
            self._store.close()  # the engine acknowledged the last push: it reads the old buffer no more
        self._store = create_store(layout.slot_layout(), 1, self.device)
        self._layout, self._store_unopened = layout, True
        self.buffers_allocated += 1

    def _await_ack(self) -> None:
        while self._unacked is not None:
            message, _ = self._channel.recv(self._timeout_s, waiting_for=f"the engine to apply weights version "
                                                                        f"{self._unacked}")
            self._handle(message)

    def _handle(self, message: dict) -> None:
        kind = message.get("kind")
        if kind == "report":
            self._reports.append(message["row"])
        elif kind == "ack" and message.get("version") == self._unacked:
            self._unacked = None
            if self._store_unopened:  # the engine mapped the buffer: drop its name (nothing leaks on a crash)
                self._store.peer_opened()
                self._store_unopened = False
        elif kind == "error":
            raise PeerError(f"weight push: {self._channel.peer} could not apply version {self._unacked}: "
                            f"{message.get('message')}")
        else:
            raise PeerError(f"weight push: {self._channel.peer} sent an unexpected {kind!r} message")


class WeightSubscriber:
    """Engine side. apply(draft) / poll() between batches (non-blocking); wait(version) blocks."""

    def __init__(self, address: str, device: torch.device | str, *, timeout_s: float = 120.0,
                 startup_timeout_s: float = 900.0, peer: str = "trainer"):
        self.device = normalize_device(device)
        self._timeout_s = timeout_s
        self._channel = listen(address, peer, startup_timeout_s)
        self._store = None
        self._layout: Optional[PackedLayout] = None
        self.version: Optional[int] = None
        self.meta: Optional[dict] = None  # the publisher's meta of the last push (e.g. the draft config)
        self.closed = False
        self.buffers_opened = 0
        self.last_apply_ms: Optional[float] = None

    def poll(self) -> Optional[tuple[int, dict[str, torch.Tensor]]]:
        """A pending push as (version, tensors owned by the caller on this side's device), or None."""
        if self.closed or not self._channel.readable():
            return None
        return self._receive(self._copy_out, self._timeout_s)

    def apply(self, module: nn.Module) -> Optional[int]:
        """Copy a pending push straight into `module`'s parameters and buffers (by state-dict name;
        names not pushed keep their values). Returns its version, or None when nothing was pending."""
        if self.closed or not self._channel.readable():
            return None
        update = self._receive(lambda views: self._copy_into(module, views), self._timeout_s)
        return None if update is None else update[0]

    def wait(self, version: int, timeout_s: float) -> tuple[int, dict[str, torch.Tensor]]:
        """Block until a push of at least `version` arrives; returns it as poll() does."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.closed:
                raise HandoffClosed(f"weight push: {self._channel.peer} closed before version {version} arrived")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"weight push: no version >= {version} from {self._channel.peer} within {timeout_s:g} s")
            update = self._receive(self._copy_out, remaining)
            if update is not None and update[0] >= version:
                return update

    def report(self, row: dict) -> None:
        """Send an evaluation row back to the publisher (WeightPublisher.poll_reports)."""
        self._channel.send({"kind": "report", "row": row}, timeout_s=self._timeout_s)

    def close(self) -> None:
        self._channel.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _receive(self, consume: Callable[[dict[str, torch.Tensor]], Any], timeout_s: float):
        message, blob = self._channel.recv(timeout_s, waiting_for="a weight push")
        kind = message.get("kind")
        if kind == "close":
            self.closed = True
            return None
        if kind != "weights":
            raise PeerError(f"weight push: {self._channel.peer} sent an unexpected {kind!r} message")
        version = message["version"]
        if self.version is not None and version <= self.version:
            raise PeerError(f"weight push: version {version} after {self.version}; versions must increase")
        start = time.perf_counter()
        layout = PackedLayout.from_message(message)
        if blob:
            if not self._open(pickle.loads(blob), layout):
                return None
        elif layout != self._layout:
            raise PeerError("weight push: the tensor layout changed without a new buffer (protocol violation)")
        try:
            result = consume(layout.views(self._store.receive(0, 1)))
        except Exception as err:
            self._answer({"kind": "error", "message": str(err)})
            raise
        if not self._store.copies_on_receive:
            self._store.before_release(0)
        self._answer({"kind": "ack", "version": version})
        self.version, self.meta = version, message.get("meta")
        self.last_apply_ms = 1e3 * (time.perf_counter() - start)
        return version, result

    def _answer(self, message: dict) -> None:
        try:
            self._channel.send(message, timeout_s=self._timeout_s)
        except PeerError:
            # The publisher may have closed right after its last push: its "close" is still queued
            # here, and the next receive reports either that or the publisher's death.
            pass

    def _open(self, exported: dict, layout: PackedLayout) -> bool:
        if self._store is not None:
            self._store.close()
            self._store = None
        cross_device = False
        if exported["kind"] == "cuda_ipc":
            if self.device.type != "cuda":
                raise PeerError("weight push: the trainer publishes from a GPU but this side is on the CPU; "
                                "use one device type on both sides")
            cross_device = exported["uuid"] != str(torch.cuda.get_device_properties(self.device).uuid)
        try:
            self._store = open_store(exported, layout.slot_layout(), 1, self.device, cross_device)
        except FileNotFoundError:
            # The publisher closed (and unlinked the buffer) before this side mapped it: the end.
            self.closed = True
            return False
        self._layout = layout
        self.buffers_opened += 1
        return True

    def _copy_out(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: view.to(self.device, copy=True) for name, view in views.items()}

    @staticmethod
    def _copy_into(module: nn.Module, views: dict[str, torch.Tensor]) -> None:
        state = module.state_dict()
        unknown = sorted(set(views) - set(state))
        if unknown:
            raise KeyError(f"pushed tensors {unknown} are not in {type(module).__name__}'s state dict: build the "
                           f"engine's draft copy from the same config as the trainer's")
        wrong = [f"{n}: pushed {tuple(v.shape)}, here {tuple(state[n].shape)}" for n, v in views.items()
                 if v.shape != state[n].shape]
        if wrong:
            raise ValueError(f"pushed tensor shapes differ from the engine's draft copy: {wrong}")
        with torch.no_grad():
            for name, view in views.items():
                state[name].copy_(view)
