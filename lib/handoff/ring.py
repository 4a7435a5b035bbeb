"""The handoff ring between an engine (Sender) and its paired trainer (Receiver), in two processes.

Protocol over the control channel:
  start-up   both send `hello` (specs, slots, device); each checks the other's and fails naming both.
             The sender creates the slot store and sends `store` with its handles; the receiver maps
             it and answers `ready` (or `error`).
  per step   sender -> `data` {slot, header}; receiver -> `credit` {slot} when done with the slot.
             The sender owns K slots, so it runs up to K steps ahead and blocks in acquire() when
             the receiver holds all K.
  shutdown   sender -> `close`; receiver drops its mappings, then -> `closed`; the sender frees last.
A silent peer raises PeerError after `timeout_s`; a dead one (socket EOF) at once.
"""
from __future__ import annotations

import json
import pickle
from collections import deque

import torch

from lib.data.batch import TensorSpec
from lib.handoff import control
from lib.handoff.control import ControlChannel, HandoffClosed, PeerError
from lib.handoff.slots import (SlotLayout, create_store, describe_device, describe_spec, format_specs,
                               normalize_device, open_store)


class HandoffMismatch(ValueError):
    """The two sides of a pair were built with different specs, slot counts or devices."""


def _check_settings(slots: int, timeout_s: float, startup_timeout_s: float) -> None:
    if not isinstance(slots, int) or slots < 1:
        raise ValueError(f"handoff slots={slots!r} must be an int >= 1 (handoff.slots; 2-3 lets the engine run ahead)")
    for name, value in (("timeout_s", timeout_s), ("startup_timeout_s", startup_timeout_s)):
        if not value > 0:
            raise ValueError(f"handoff {name}={value!r} must be > 0 seconds")


def _hello(role: str, layout: SlotLayout, slots: int, device: torch.device, cross_device: bool) -> dict:
    return {"kind": "hello", "role": role, "specs": [describe_spec(s) for s in layout.specs], "slots": slots,
            "device": describe_device(device), "cross_device": cross_device}


def _agree(mine: dict, theirs: dict, peer: str) -> None:
    """Raise on both sides with the same facts: each side holds both hellos after the exchange."""
    problems = []
    if mine["specs"] != theirs["specs"]:
        problems.append("tensor specs differ")
    if mine["slots"] != theirs["slots"]:
        problems.append(f"slots differ: {mine['slots']} here vs {theirs['slots']} at the peer")
    if mine["cross_device"] != theirs["cross_device"]:
        problems.append(f"cross_device differs: {mine['cross_device']} here vs {theirs['cross_device']} at the peer")
    here, there = mine["device"], theirs["device"]
    if here["type"] != there["type"]:
        problems.append(f"device types differ: {here['type']} here vs {there['type']} at the peer")
    elif here["type"] == "cuda" and here["uuid"] != there["uuid"] and not mine["cross_device"]:
        problems.append(f"GPUs differ: {here['uuid']} here vs {there['uuid']} at the peer, and cross_device is off "
                        "(pass cross_device=True for a pair on two GPUs)")
    if problems:
        raise HandoffMismatch(
            f"handoff start-up mismatch between this {mine['role']} and {peer} ({theirs['role']}): " + "; ".join(problems)
            + f"\n  {mine['role']} specs: {format_specs(mine['specs'])} slots={mine['slots']} device={here}"
            + f"\n  {theirs['role']} specs: {format_specs(theirs['specs'])} slots={theirs['slots']} device={there}"
            + "\n  fix: build both sides from the same config (handoff.slots, engine.token_budget, target hidden size, aux layers, dtype)")


def _exchange_hello(channel: ControlChannel, hello: dict, startup_timeout_s: float) -> None:
    channel.send(hello, timeout_s=startup_timeout_s)
    theirs, _ = channel.recv(startup_timeout_s, waiting_for="the start-up hello")
    if theirs.get("kind") != "hello":
        raise PeerError(f"handoff: {channel.peer} sent {theirs.get('kind')!r} instead of its start-up hello")
    _agree(hello, theirs, channel.peer)


def _raise_for(message: dict, peer: str, waiting_for: str) -> None:
    kind = message.get("kind")
    if kind in ("close", "closed"):
        raise HandoffClosed(f"handoff: {peer} closed the handoff while this side waited for {waiting_for}")
    if kind == "error":
        raise PeerError(f"handoff: {peer} failed: {message.get('message')}")
    raise PeerError(f"handoff: {peer} sent an unexpected {kind!r} message while this side waited for {waiting_for}")


class Sender:
    """Engine side: owns the slots; acquire() a slot, write it, send() it."""

    def __init__(self, channel: ControlChannel, store, layout: SlotLayout, slots: int, timeout_s: float):
        self._channel = channel
        self._store = store
        self._layout = layout
        self._timeout_s = timeout_s
        self._free = deque(range(slots))
        self._acquired: int | None = None
        self._closed = False

    @property
    def peer(self) -> str:
        return self._channel.peer

    def acquire(self) -> dict[str, torch.Tensor]:
        """Full max_rows views into a free slot; blocks until the receiver returns a credit."""
        if self._closed:
            raise RuntimeError("handoff Sender.acquire() after close()")
        if self._acquired is None:
            while not self._free:
                message, _ = self._channel.recv(self._timeout_s, waiting_for="a free slot (a credit)")
                if message.get("kind") != "credit":
                    _raise_for(message, self.peer, "a free slot (a credit)")
                self._free.append(message["slot"])
            self._acquired = self._free.popleft()
            self._store.before_write(self._acquired)
        return self._store.views(self._acquired)

    def send(self, payload: dict[str, torch.Tensor], header: dict) -> None:
        """Hand one step over; payload tensors that are views of the acquired slot are not copied."""
        num_rows = self._layout.num_rows(header)
        try:
            json.dumps(header)
        except (TypeError, ValueError) as err:
            raise ValueError(f"handoff header must be JSON-serialisable (ints, floats, strings, lists, dicts): {err}") from err
        views = self.acquire()
        self._layout.write(views, payload, num_rows)
        slot = self._acquired
        self._store.after_write(slot)
        try:
            self._channel.send({"kind": "data", "slot": slot, "header": header}, timeout_s=self._timeout_s)
        except PeerError:
            # A receiver that closed on purpose (a stop after its checkpoint) said so before its socket
            # went away; report that, not a death.
            while self._channel.readable():
                message, _ = self._channel.recv(self._timeout_s, waiting_for="the trainer's last message")
                if message.get("kind") != "credit":
                    _raise_for(message, self.peer, "a free slot (a credit)")
            raise
        self._acquired = None

    def close(self, wait: bool = True) -> None:
        """Tell the receiver to finish, wait (up to timeout_s) until it dropped its mappings, then free.
        wait=False (this side or the peer failed): free at once; a silent peer must not delay the exit."""
        if self._closed:
            return
        self._closed = True
        try:
            if wait and not self._channel.closed:
                self._channel.send({"kind": "close"}, timeout_s=self._timeout_s)
                while True:
                    message, _ = self._channel.recv(self._timeout_s, waiting_for="the trainer to close")
                    if message.get("kind") != "credit":
                        break
        except PeerError:
            pass  # the receiver is gone already: nothing maps the slots any more
        finally:
            self._channel.close()
            self._store.close()


class Receiver:
    """Trainer side: recv() a step, use it, release() it (oldest first)."""

    def __init__(self, channel: ControlChannel, store, layout: SlotLayout, timeout_s: float):
        self._channel = channel
        self._store = store
        self._layout = layout
        self._timeout_s = timeout_s
        self._held: deque[int] = deque()
        self._ended = False
        self._closed = False

    @property
    def peer(self) -> str:
        return self._channel.peer

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The next step's header and its tensors, trimmed to header["num_rows"] rows.

        On CUDA the current stream waits for the engine's writes; the host does not. Same-GPU views
        alias the slot and stay valid until release(); copies (cross-device, CPU) never alias later steps.
        """
        if self._closed:
            raise RuntimeError("handoff Receiver.recv() after close()")
        if self._ended:
            raise HandoffClosed(f"handoff: {self.peer} closed the handoff; no more steps will come")
        message, _ = self._channel.recv(self._timeout_s, waiting_for="the next step")
        if message.get("kind") != "data":
            if message.get("kind") == "close":
                self._ended = True
            _raise_for(message, self.peer, "the next step")
        slot, header = message["slot"], message["header"]
        if slot in self._held:
            raise PeerError(f"handoff: {self.peer} reused slot {slot} before this side released it (protocol violation)")
        views = self._store.receive(slot, self._layout.num_rows(header))
        if self._store.copies_on_receive:
            self._channel.send({"kind": "credit", "slot": slot}, timeout_s=self._timeout_s)
        self._held.append(slot)
        return header, views

    def release(self) -> None:
        """Return the oldest received, unreleased slot to the engine."""
        if not self._held:
            raise RuntimeError("handoff Receiver.release() without a received, unreleased step; call recv() first")
        slot = self._held.popleft()
        if not self._store.copies_on_receive:
            self._store.before_release(slot)
            self._channel.send({"kind": "credit", "slot": slot}, timeout_s=self._timeout_s)

    def close(self) -> None:
        """Drop the mappings first, then tell the engine it may free the slots.

        Drop every view returned by recv() before calling this: a view still alive keeps the mapping.
        """
        if self._closed:
            return
        self._closed = True
        self._held.clear()
        try:
            self._store.close()
            if not self._channel.closed:
                self._channel.send({"kind": "closed"}, timeout_s=self._timeout_s)
        except PeerError:
            pass  # the engine is gone: nobody waits for the answer
        finally:
            self._channel.close()


def make_sender(specs: list[TensorSpec], slots: int, address: str, peer: str, timeout_s: float,
                device: torch.device, startup_timeout_s: float, *, cross_device: bool = False) -> Sender:
    """Engine side: listen at `address`, agree with the trainer, create and export the slots."""
    _check_settings(slots, timeout_s, startup_timeout_s)
    layout = SlotLayout(tuple(specs))
    device = normalize_device(device)
    hello = _hello("sender", layout, slots, device, cross_device)
    channel = control.listen(address, peer, startup_timeout_s)
    store = None
    try:
        _exchange_hello(channel, hello, startup_timeout_s)
        store = create_store(layout, slots, device)
        channel.send({"kind": "store"}, pickle.dumps(store.export()), timeout_s=startup_timeout_s)
        answer, _ = channel.recv(startup_timeout_s, waiting_for="the trainer to map the slots")
        if answer.get("kind") != "ready":
            _raise_for(answer, peer, "the trainer to map the slots")
        store.peer_opened()
        return Sender(channel, store, layout, slots, timeout_s)
    except BaseException:
        channel.close()
        if store is not None:
            store.close()
        raise


def make_receiver(specs: list[TensorSpec], slots: int, address: str, peer: str, timeout_s: float,
                  device: torch.device, startup_timeout_s: float, *, cross_device: bool = False) -> Receiver:
    """Trainer side: connect to the engine at `address`, agree, map the slots once."""
    _check_settings(slots, timeout_s, startup_timeout_s)
    layout = SlotLayout(tuple(specs))
    device = normalize_device(device)
    hello = _hello("receiver", layout, slots, device, cross_device)
    channel = control.connect(address, peer, startup_timeout_s)
    try:
        _exchange_hello(channel, hello, startup_timeout_s)
        message, blob = channel.recv(startup_timeout_s, waiting_for="the engine's slot handles")
        if message.get("kind") != "store":
            _raise_for(message, peer, "the engine's slot handles")
        try:
            store = open_store(pickle.loads(blob), layout, slots, device, cross_device)
        except Exception as err:
            channel.send({"kind": "error", "message": f"the trainer could not map the slots: {err}"}, timeout_s=startup_timeout_s)
            raise
        channel.send({"kind": "ready"}, timeout_s=startup_timeout_s)
        return Receiver(channel, store, layout, timeout_s)
    except BaseException:
        channel.close()
        raise
