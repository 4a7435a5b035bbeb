"""Weight push trainer -> engine: bit-exact round trip between two real processes, one buffer reused
across pushes, increasing versions, layout changes, casting, errors and shutdown.

The engine side runs in a spawned process (CPU: /dev/shm buffer; GPU: CUDA IPC buffer, skipped
without CUDA); the API details run with both ends in one process (subscriber started on a thread,
since it listens until the publisher connects).
"""
from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
import time

import pytest
import torch
from torch import nn

from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.handoff.control import HandoffClosed, PeerError
from lib.handoff.weight_push import WeightPublisher, WeightSubscriber

pytestmark = pytest.mark.unit

VERSIONS = (1, 2, 5)
CONFIG = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128, vocab_size=64, draft_vocab_size=40,
              target_hidden_size=32, aux_layer_ids=[0, 1, 2])


def address() -> str:
    return f"/tmp/wp-{os.getpid()}-{secrets.token_hex(4)}.sock"


def draft_state(seed: int) -> dict[str, torch.Tensor]:
    """A trainer-side draft state: every pushed tensor (the frozen embedding stays engine-local)."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(Eagle3DraftConfig(**CONFIG))
    draft.reset_parameters(0.1 + seed)
    with torch.no_grad():
        draft.d2t.copy_(torch.randint(0, 24, (40,)))
        draft.t2d.copy_(torch.rand(64) > 0.5)
    return {k: v for k, v in draft.state_dict().items() if k != "embed_tokens.weight"}


def engine_process(addr: str, device: str, out_dir: str) -> None:
    """Engine: its own Eagle3Draft copy, updated by apply() for the first push and wait() after."""
    torch.set_num_threads(1)
    subscriber = WeightSubscriber(addr, device, startup_timeout_s=60)
    draft = Eagle3Draft(Eagle3DraftConfig(**CONFIG)).to(device)
    embedding = draft.embed_tokens.weight.clone()
    for i, version in enumerate(VERSIONS):
        if i == 0:
            got = None
            while got is None:
                got = subscriber.apply(draft)
        else:
            got, state = subscriber.wait(version, timeout_s=60)
            draft.load_state_dict(state, strict=False)
        state = {k: v.cpu() for k, v in draft.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"v{got}.pt"))
        subscriber.report({"step": got, "buffers_opened": subscriber.buffers_opened,
                           "embedding_kept": bool(torch.equal(draft.embed_tokens.weight, embedding)),
                           "meta": subscriber.meta})
    while not subscriber.closed:  # until the trainer says it is done
        subscriber.poll()
    subscriber.close()


@pytest.mark.integration
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_round_trip_between_processes_is_bit_exact_and_reuses_one_buffer(tmp_path, device):
    addr = address()
    engine = multiprocessing.get_context("spawn").Process(target=engine_process, args=(addr, device, str(tmp_path)))
    engine.start()
    try:
        publisher = WeightPublisher(addr, device, startup_timeout_s=60, timeout_s=60)
        pushed = {}
        for version in VERSIONS:
            pushed[version] = draft_state(version)
            ms = publisher.publish(pushed[version], version, meta={"version": version})
            assert ms > 0 and publisher.last_push["total_ms"] == ms
            assert publisher.last_push["new_buffer"] == (version == VERSIONS[0])
            assert publisher.last_push["bytes"] >= sum(t.numel() * t.element_size() for t in pushed[version].values())
        assert publisher.buffers_allocated == 1
        reports, deadline = [], time.monotonic() + 60
        while len(reports) < len(VERSIONS) and time.monotonic() < deadline:
            reports += publisher.poll_reports()
            engine.join(0.01)
            assert engine.exitcode in (None, 0)
        publisher.close()
        engine.join(60)
        assert engine.exitcode == 0
    finally:
        if engine.is_alive():
            engine.kill()
    assert [r["step"] for r in reports] == list(VERSIONS)
    assert all(r["buffers_opened"] == 1 and r["embedding_kept"] for r in reports)
    assert [r["meta"] for r in reports] == [{"version": v} for v in VERSIONS]
    for version in VERSIONS:
        received = torch.load(tmp_path / f"v{version}.pt")
        for name, tensor in pushed[version].items():
            assert received[name].dtype == tensor.dtype
            assert torch.equal(received[name], tensor), (version, name)
    assert not torch.equal(pushed[1]["fc.weight"], pushed[2]["fc.weight"])


@pytest.fixture
def pair():
    addr = address()
    box = {}
    thread = threading.Thread(target=lambda: box.update(sub=WeightSubscriber(addr, "cpu", startup_timeout_s=30)))
    thread.start()
    publisher = WeightPublisher(addr, "cpu", startup_timeout_s=30, timeout_s=10)
    thread.join(30)
    yield publisher, box["sub"]
    publisher.close()
    box["sub"].close()


def test_versions_must_increase(pair):
    publisher, subscriber = pair
    state = {"w": torch.arange(6.0).view(2, 3)}
    publisher.publish(state, 3)
    for bad in (3, 2, 4.0, True):
        with pytest.raises(ValueError, match="must be an int greater than the last one"):
            publisher.publish(state, bad)
    assert subscriber.poll()[0] == 3
    publisher.publish(state, 4)
    assert subscriber.poll()[0] == 4


def test_poll_is_non_blocking_and_a_new_layout_gets_a_new_buffer(pair):
    publisher, subscriber = pair
    assert subscriber.poll() is None
    first = {"a": torch.randn(3, 4), "ids": torch.arange(5), "mask": torch.tensor([True, False])}
    publisher.publish(first, 1)
    version, got = subscriber.poll()
    assert version == 1 and set(got) == set(first)
    assert all(torch.equal(got[k], first[k]) and got[k].dtype == first[k].dtype for k in first)
    got["a"].zero_()  # tensors returned by poll belong to the caller, not to the buffer
    assert subscriber.poll() is None
    second = {"a": torch.randn(3, 4), "b": torch.randn(7, dtype=torch.float64)}
    publisher.publish(second, 2)
    assert publisher.last_push["new_buffer"] and publisher.buffers_allocated == 2
    version, got = subscriber.poll()
    assert version == 2 and set(got) == {"a", "b"} and subscriber.buffers_opened == 2
    assert all(torch.equal(got[k], second[k]) for k in second)


def test_cast_dtype_sends_floating_tensors_in_the_engine_dtype(tmp_path):
    addr = address()
    box = {}
    thread = threading.Thread(target=lambda: box.update(sub=WeightSubscriber(addr, "cpu", startup_timeout_s=30)))
    thread.start()
    publisher = WeightPublisher(addr, "cpu", cast_dtype=torch.bfloat16, startup_timeout_s=30, timeout_s=10)
    thread.join(30)
    subscriber = box["sub"]
    try:
        state = {"w": torch.randn(4, 4), "d2t": torch.arange(4)}
        publisher.publish(state, 1)
        engine_copy = nn.Module()
        engine_copy.w = nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
        engine_copy.register_buffer("d2t", torch.zeros(4, dtype=torch.long))
        assert subscriber.apply(engine_copy) == 1
        assert torch.equal(engine_copy.w.data, state["w"].to(torch.bfloat16))
        assert torch.equal(engine_copy.d2t, state["d2t"])
        assert publisher.last_push["bytes"] < 4 * 16 + 8 * 4  # bf16, not fp32
    finally:
        publisher.close()
        subscriber.close()


def test_a_push_the_engine_cannot_apply_fails_on_both_sides(pair):
    publisher, subscriber = pair
    publisher.publish({"not_a_parameter": torch.ones(2)}, 1)
    module = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="not_a_parameter"):
        subscriber.apply(module)
    with pytest.raises(PeerError, match="could not apply version 1"):
        publisher.publish({"weight": torch.ones(2, 2)}, 2)


def test_close_ends_the_subscriber(pair):
    publisher, subscriber = pair
    publisher.publish({"w": torch.ones(3)}, 1)
    assert subscriber.poll()[0] == 1
    publisher.publish({"w": torch.full((3,), 2.0)}, 2)
    publisher.close()
    version, got = subscriber.poll()  # the buffer was mapped already: the last push still arrives
    assert version == 2 and torch.equal(got["w"], torch.full((3,), 2.0))
    assert subscriber.poll() is None and subscriber.closed
    with pytest.raises(HandoffClosed):
        subscriber.wait(3, timeout_s=5)


def test_close_before_the_engine_mapped_a_new_buffer_drops_that_push(pair):
    publisher, subscriber = pair
    publisher.publish({"w": torch.ones(3)}, 1)
    publisher.close()
    assert subscriber.poll() is None and subscriber.closed and subscriber.version is None
