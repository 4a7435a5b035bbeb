"""Handoff ring over CUDA IPC: byte-equal delivery with host-free ordering by interprocess events.

Both sides add GPU sleeps before touching a slot, so a missing wait on the "written" or "consumed"
event shows up as wrong bytes rather than passing by luck.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest
import torch

from lib.data.batch import TensorSpec
from lib.handoff import HandoffClosed, HandoffMismatch, make_receiver, make_sender

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

SLOTS = 3
STEPS = 1000
SLEEP_CYCLES = 200_000  # ~0.1 ms of GPU time: long enough to expose a missing event wait
ENGINE, TRAINER = "engine rank 0", "trainer rank 0"
CTX = mp.get_context("spawn")


def make_specs(max_rows: int = 512) -> list[TensorSpec]:
    return [
        TensorSpec("input_ids", torch.int64, (), max_rows),
        TensorSpec("loss_mask", torch.bool, (), max_rows),
        TensorSpec("aux_hidden", torch.bfloat16, (3 * 64,), max_rows),
        TensorSpec("final_hidden", torch.bfloat16, (64,), max_rows),
    ]


def payload_for(step: int, specs: list[TensorSpec], device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Random bytes generated on the GPU from a seed keyed by step (same on both sides)."""
    max_rows = min(s.max_rows for s in specs)
    n = max_rows if step % 10 == 3 else (step * 37) % max_rows + 1
    g = torch.Generator(device=device).manual_seed(step)
    tensors = {}
    for spec in specs:
        raw = torch.randint(0, 256, (n * spec.row_bytes,), dtype=torch.uint8, device=device, generator=g)
        if spec.dtype == torch.bool:
            raw = raw % 2
        tensors[spec.name] = raw.view(spec.dtype).view(n, *spec.row_shape)
    return {"step": step, "num_rows": n}, tensors


def _child(results, fn, *args):
    try:
        results.put(("ok", fn(*args)))
    except BaseException as err:
        results.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _sender(address, gpu, cross_device):
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    specs = make_specs()
    sender = make_sender(specs, SLOTS, address, TRAINER, 60.0, device, 120.0, cross_device=cross_device)
    for step in range(STEPS):
        views = sender.acquire()
        torch.cuda._sleep(SLEEP_CYCLES)  # the slot is written late, after the send() call returns
        header, tensors = payload_for(step, specs, device)
        if step % 2:
            sender.send(tensors, header)
        else:
            n = header["num_rows"]
            for name, t in tensors.items():
                views[name][:n].copy_(t)
            sender.send({name: v[:n] for name, v in views.items()}, header)
    sender.close()


def _run_pair(address, engine_gpu, trainer_gpu, cross_device):
    results = CTX.Queue()
    proc = CTX.Process(target=_child, args=(results, _sender, address, engine_gpu, cross_device), daemon=True)
    proc.start()
    device = torch.device("cuda", trainer_gpu)
    torch.cuda.set_device(device)
    specs = make_specs()
    receiver = make_receiver(specs, SLOTS, address, ENGINE, 60.0, device, 120.0, cross_device=cross_device)
    bad = torch.zeros(STEPS, dtype=torch.int64, device=device)
    for step in range(STEPS):
        header, views = receiver.recv()
        torch.cuda._sleep(SLEEP_CYCLES)  # the slot is read late, after release() has returned its credit
        expected_header, expected = payload_for(step, specs, device)
        assert header == expected_header
        for name, exp in expected.items():
            got = views[name]
            assert got.shape == exp.shape and got.device == device
            bad[step] += (got.reshape(-1).view(torch.uint8) != exp.reshape(-1).view(torch.uint8)).sum()
        receiver.release()
    del views, got
    with pytest.raises(HandoffClosed):
        receiver.recv()
    receiver.close()
    wrong = torch.nonzero(bad).flatten().tolist()
    assert not wrong, f"bytes differ at steps {wrong[:20]}"
    status, value = results.get(timeout=120)
    proc.join(60)
    assert status == "ok", value


def test_same_gpu_ring_is_byte_equal_and_ordered_by_events(address):
    _run_pair(address, 0, 0, cross_device=False)


def test_copy_on_receive_path_on_one_gpu(address):
    _run_pair(address, 0, 0, cross_device=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_copy_to_the_trainer_device(address):
    _run_pair(address, 1, 0, cross_device=True)


def _sender_on_gpu(address, gpu):
    torch.cuda.set_device(gpu)
    make_sender(make_specs(), SLOTS, address, TRAINER, 10.0, torch.device("cuda", gpu), 60.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_without_cross_device_fail_on_both_sides(address):
    results = CTX.Queue()
    proc = CTX.Process(target=_child, args=(results, _sender_on_gpu, address, 1), daemon=True)
    proc.start()
    with pytest.raises(HandoffMismatch, match="GPUs differ"):
        make_receiver(make_specs(), SLOTS, address, ENGINE, 10.0, torch.device("cuda", 0), 60.0)
    status, value = results.get(timeout=60)
    proc.join(60)
    assert status == "error" and "GPUs differ" in value
