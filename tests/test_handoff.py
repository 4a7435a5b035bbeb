"""Handoff ring on CPU: real processes, real /dev/shm, real Unix sockets."""
from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
import time
import traceback

import pytest
import torch

from lib.data.batch import TensorSpec
from lib.handoff import HandoffClosed, HandoffMismatch, PeerError, make_receiver, make_sender
from lib.handoff.control import connect
from lib.handoff.slots import ALIGN_BYTES, SlotLayout, describe_spec, format_specs, trim

pytestmark = pytest.mark.integration

SLOTS = 3
STEPS = 1000
ENGINE, TRAINER = "engine rank 0", "trainer rank 0"
CPU = torch.device("cpu")
CTX = mp.get_context("spawn")


def make_specs(hidden: int = 8, max_rows: int = 64) -> list[TensorSpec]:
    return [
        TensorSpec("input_ids", torch.int64, (), max_rows),
        TensorSpec("loss_mask", torch.bool, (), max_rows),
        TensorSpec("hidden", torch.bfloat16, (hidden,), max_rows),
        TensorSpec("grid", torch.int32, (2, 3), max_rows),
    ]


def payload_for(step: int, specs: list[TensorSpec]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Deterministic random bytes keyed by step; lengths vary and include 0 and max_rows."""
    g = torch.Generator().manual_seed(step)
    max_rows = min(s.max_rows for s in specs)
    n = int(torch.randint(1, max_rows + 1, (1,), generator=g))
    n = max_rows if step % 10 == 3 else 0 if step % 50 == 7 else n
    tensors = {}
    for spec in specs:
        raw = torch.randint(0, 256, (n * spec.row_bytes,), dtype=torch.uint8, generator=g)
        if spec.dtype == torch.bool:
            raw = raw % 2
        tensors[spec.name] = raw.view(spec.dtype).view(n, *spec.row_shape)
    header = {"step": step, "sample_ids": [step * 7 + i for i in range(step % 4)], "num_rows": n}
    return header, tensors


def assert_bytes_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], step: int) -> None:
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert got[name].shape == exp.shape, f"step {step} {name}: shape {tuple(got[name].shape)} != {tuple(exp.shape)}"
        a = got[name].contiguous().reshape(-1).view(torch.uint8)
        b = exp.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), f"step {step} {name}: bytes differ"


def send_step(sender, step: int, specs: list[TensorSpec]) -> None:
    """Even steps write into the acquired slot (zero copy), odd steps hand over tensors to copy."""
    header, tensors = payload_for(step, specs)
    if step % 2:
        sender.send(tensors, header)
        return
    views = sender.acquire()
    n = header["num_rows"]
    for name, t in tensors.items():
        views[name][:n].copy_(t)
    sender.send({name: v[:n] for name, v in views.items()}, header)


# ---- child processes (spawned; module-level so they can be pickled by name) ----

def _child(results, fn, *args):
    try:
        results.put(("ok", fn(*args)))
    except BaseException as err:  # report everything, including assertion failures, to the test
        results.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _sender_with_credit_checks(address, acquired, released):
    specs = make_specs()
    sender = make_sender(specs, SLOTS, address, TRAINER, 30.0, CPU, 60.0)
    for step in range(STEPS):
        sender.acquire()
        acquired.value = step + 1
        # A slot for step s exists only after the trainer released s-K+1 of them.
        assert released.value >= step - SLOTS + 1, f"step {step} acquired with only {released.value} releases"
        send_step(sender, step, specs)
    sender.close()
    return os.getpid()


def _sender_mismatched(address):
    make_sender(make_specs(hidden=8), SLOTS, address, TRAINER, 30.0, CPU, 60.0)


def _sender_then_silent(address, steps, ready):
    specs = make_specs()
    sender = make_sender(specs, SLOTS, address, TRAINER, 30.0, CPU, 60.0)
    for step in range(steps):
        send_step(sender, step, specs)
    ready.set()
    time.sleep(120)


def _receiver_then_silent(address, steps, ready):
    receiver = make_receiver(make_specs(), SLOTS, address, ENGINE, 30.0, CPU, 60.0)
    for _ in range(steps):
        receiver.recv()
    ready.set()
    time.sleep(120)


def start(fn, *args):
    results = CTX.Queue()
    proc = CTX.Process(target=_child, args=(results, fn, *args), daemon=True)
    proc.start()
    return proc, results


def child_result(proc, results, timeout_s: float = 60.0):
    status, value = results.get(timeout=timeout_s)
    proc.join(timeout_s)
    return status, value


def test_ring_delivers_bytes_in_order_and_engine_waits_for_credits(address):
    specs = make_specs()
    acquired, released = CTX.Value("i", 0), CTX.Value("i", 0)
    proc, results = start(_sender_with_credit_checks, address, acquired, released)
    fds_before = len(os.listdir("/proc/self/fd"))
    receiver = make_receiver(specs, SLOTS, address, ENGINE, 30.0, CPU, 60.0)
    held = 0
    for step in range(STEPS):
        header, views = receiver.recv()
        expected_header, expected = payload_for(step, specs)
        assert header == expected_header
        assert_bytes_equal(views, expected, step)
        held += 1
        if held == SLOTS and step == SLOTS - 1:
            time.sleep(0.3)  # a grace period for a sender that wrongly runs ahead, not a timing assertion
            assert acquired.value == SLOTS, "the engine acquired a slot while the trainer held all of them"
        keep = SLOTS - 1 - (step // 5) % SLOTS  # hold between 0 and K-1 steps, so all K are held at times
        while held > keep:
            released.value += 1
            receiver.release()
            held -= 1
    del views
    while held:
        released.value += 1
        receiver.release()
        held -= 1
    with pytest.raises(HandoffClosed):
        receiver.recv()
    receiver.close()
    status, sender_pid = child_result(proc, results)
    assert status == "ok", sender_pid
    assert proc.exitcode == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"
    assert not glob.glob(f"/dev/shm/specdraft-handoff-{sender_pid}-*"), "shared memory file left behind"
    with open("/proc/self/maps") as maps:
        assert "specdraft-handoff" not in maps.read(), "the receiver kept the shared memory mapped after close()"


def test_spec_mismatch_fails_on_both_sides_naming_both_specs(address):
    proc, results = start(_sender_mismatched, address)
    with pytest.raises(HandoffMismatch) as here:
        make_receiver(make_specs(hidden=16), SLOTS, address, ENGINE, 30.0, CPU, 60.0)
    status, there = child_result(proc, results)
    assert status == "error" and "HandoffMismatch" in there
    for specs in (make_specs(hidden=8), make_specs(hidden=16)):
        described = format_specs([describe_spec(s) for s in specs])
        assert described in str(here.value)
        assert described in there
    assert ENGINE in str(here.value) and TRAINER in there


def test_silent_then_killed_engine_is_named_by_the_trainer(address):
    ready = CTX.Event()
    proc, results = start(_sender_then_silent, address, 2, ready)
    receiver = make_receiver(make_specs(), SLOTS, address, ENGINE, 1.0, CPU, 60.0)
    for _ in range(2):
        receiver.recv()
    assert ready.wait(30)
    with pytest.raises(PeerError, match=f"{ENGINE} sent nothing within 1 s"):
        receiver.recv()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with pytest.raises(PeerError, match=f"{ENGINE} died"):
        receiver.recv()
    receiver.close()


def test_silent_then_killed_trainer_is_named_by_the_engine(address):
    ready = CTX.Event()
    proc, results = start(_receiver_then_silent, address, SLOTS, ready)
    specs = make_specs()
    sender = make_sender(specs, SLOTS, address, TRAINER, 1.0, CPU, 60.0)
    for step in range(SLOTS):
        send_step(sender, step, specs)
    assert ready.wait(30)
    with pytest.raises(PeerError, match=f"{TRAINER} sent nothing within 1 s"):
        sender.acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with pytest.raises(PeerError, match=f"{TRAINER} died"):
        sender.acquire()
    sender.close()


@pytest.mark.unit
def test_connect_gives_up_naming_the_peer_when_nobody_listens(address):
    with pytest.raises(PeerError, match=f"{ENGINE} was not listening"):
        connect(address, ENGINE, startup_timeout_s=0.2)


@pytest.mark.unit
def test_address_longer_than_a_socket_path_is_refused():
    with pytest.raises(ValueError, match="choose a shorter path"):
        make_receiver(make_specs(), SLOTS, "/tmp/" + "x" * 120, ENGINE, 1.0, CPU, 1.0)


# ---- slot layout (in process): what every ring slot holds, however the bytes are shared ----


@pytest.mark.unit
def test_zero_copy_views_are_the_slot_and_copies_land_in_it():
    specs = make_specs()
    layout = SlotLayout(tuple(specs))
    assert all(offset % ALIGN_BYTES == 0 for offset in layout.offsets)
    flat = torch.zeros(2 * layout.slot_bytes, dtype=torch.uint8)
    slot = layout.views(flat, 1)
    header, tensors = payload_for(3, specs)
    n = layout.num_rows(header)
    slot["input_ids"][:n].copy_(tensors["input_ids"])
    layout.write(slot, {**tensors, "input_ids": slot["input_ids"]}, n)
    views = trim(layout.views(flat, 1), n)
    assert views["input_ids"].data_ptr() == slot["input_ids"].data_ptr()
    assert_bytes_equal(views, tensors, 3)
    assert not flat[:layout.slot_bytes].any(), "writing slot 1 touched slot 0"


@pytest.mark.unit
@pytest.mark.parametrize("header, payload_change, message", [
    ({"step": 0}, {}, "num_rows"),
    ({"num_rows": 65}, {}, "num_rows=65"),
    ({"num_rows": 4}, {"extra": torch.zeros(4)}, "differ from the specs"),
    ({"num_rows": 4}, {"hidden": torch.zeros(4, 9, dtype=torch.bfloat16)}, "payload\\['hidden'\\]"),
    ({"num_rows": 4}, {"input_ids": torch.zeros(4, dtype=torch.int32)}, "payload\\['input_ids'\\]"),
    ({"num_rows": 4}, {"grid": torch.zeros(5, 2, 3, dtype=torch.int32)}, "5 rows but header num_rows=4"),
])
def test_bad_payload_or_header_is_named(header, payload_change, message):
    specs = make_specs()
    layout = SlotLayout(tuple(specs))
    views = layout.views(torch.empty(layout.slot_bytes, dtype=torch.uint8), 0)
    payload = {s.name: torch.zeros(4, *s.row_shape, dtype=s.dtype) for s in specs}
    payload.update(payload_change)
    with pytest.raises(ValueError, match=message):
        layout.write(views, payload, layout.num_rows(header))  # the order Sender.send checks them in


@pytest.mark.unit
def test_duplicate_spec_names_are_refused():
    specs = make_specs() + [TensorSpec("hidden", torch.float32, (2,), 4)]
    with pytest.raises(ValueError, match="'hidden' is empty or repeated"):
        SlotLayout(tuple(specs))
