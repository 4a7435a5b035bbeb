"""metrics.tensorboard and metrics.wandb: the rows of metrics.jsonl reach the dashboards, from rank 0 only."""
from __future__ import annotations

import glob
import json
import math
import os
import struct

import pytest

from lib.config import ConfigError, LaunchShape, MetricsConfig, WandbConfig, compose
from lib.config.check import validate
from lib.trainer.metrics import MetricsWriter

pytestmark = pytest.mark.unit

CPU2 = LaunchShape(world_size=2, nproc_per_node=2, nnodes=1, gpus_per_node=0)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under logdir, parsed from the TFRecord framing (length, crc,
    payload, crc) with the Event protobuf shipped by tensorboardX; each record's checksums are verified."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    assert files, f"no event file under {logdir}"
    for path in files:
        with open(path, "rb") as f:
            blob = f.read()
        pos = 0
        while pos < len(blob):
            header = blob[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", blob[pos + 8:pos + 12])[0] == masked(header)
            payload = blob[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
            pos += 16 + length
            event = Event.FromString(payload)
            if event.session_log.status == event.session_log.START:
                out.setdefault("__purge__", []).append((event.step, 0.0))
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def rows(n: int) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s, "acc_0": 0.1 * s, "acc_1": 0.05 * s, "lr": 1e-4, "note": "text",
             "sizes": [1, 2]} for s in range(1, n + 1)]


def test_tensorboard_events_hold_the_rows_of_metrics_jsonl(tmp_path):
    writer = MetricsWriter(str(tmp_path), True, MetricsConfig(tensorboard=True))
    for row in rows(5):
        writer.write(row)
    writer.write({"step": 5, "accept_len": 2.5, "accept_len_k3": 2.5})  # an evaluation row
    writer.close()
    scalars = read_scalars(str(tmp_path / "tensorboard"))
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    assert scalars["loss"][1][1] == pytest.approx(1.0)
    assert scalars["acc_0"][-1] == (5, pytest.approx(0.5))
    assert scalars["accept_len_k3"] == [(5, pytest.approx(2.5))]
    assert "note" not in scalars and "sizes" not in scalars and "step" not in scalars
    with open(tmp_path / "metrics.jsonl") as f:  # metrics.jsonl still gets every row
        assert len([json.loads(x) for x in f]) == 6


def test_only_the_leader_writes_and_no_sink_without_the_key(tmp_path):
    follower = tmp_path / "follower"
    follower.mkdir()
    writer = MetricsWriter(str(follower), False, MetricsConfig(tensorboard=True))
    writer.write(rows(1)[0])
    writer.close()
    assert os.listdir(follower) == []
    plain = MetricsWriter(str(tmp_path), True, MetricsConfig())
    plain.write(rows(1)[0])
    plain.close()
    assert not (tmp_path / "tensorboard").exists()


def test_resume_purges_the_replayed_steps(tmp_path):
    first = MetricsWriter(str(tmp_path), True, MetricsConfig(tensorboard=True))
    for row in rows(6):
        first.write(row)
    first.close()
    # The run died after step 6 with its checkpoint at 4: steps 5 and 6 are trained again.
    resumed = MetricsWriter(str(tmp_path), True, MetricsConfig(tensorboard=True), start_step=4)
    for row in rows(6)[4:]:
        resumed.write(row)
    resumed.close()
    logdir = str(tmp_path / "tensorboard")
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 2
    scalars = read_scalars(logdir)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6, 5, 6]
    # The resumed file opens with a SessionLog START at step 4: TensorBoard drops the older events from there.
    assert scalars["__purge__"] == [(4, 0.0)]


def test_config_keys_compose_and_validate(tmp_path):
    cfg = compose(["device=cpu", f"run.dir={tmp_path}/r", "metrics.tensorboard=true",
                   "metrics.wandb.mode=offline"])
    assert cfg.metrics.tensorboard is True and cfg.metrics.wandb.project is None
    validate(cfg, CPU2)
    with pytest.raises(ConfigError, match=r"metrics.wandb.mode=.*not one of"):
        compose(["metrics.wandb.mode=sometimes"])
    bad = compose(["device=cpu", f"run.dir={tmp_path}/r", "metrics.wandb.project=team/proj"])
    with pytest.raises(ConfigError, match=r"^metrics.wandb.project='team/proj': .*metrics.wandb.entity"):
        validate(bad, CPU2)


def test_wandb_offline_run_gets_the_rows(tmp_path):
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install wandb to run this test)")
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg = MetricsConfig(wandb=WandbConfig(project="specdraft-test", mode="offline"))
    writer = MetricsWriter(str(tmp_path), True, cfg, run_config={"train": {"lr": 1e-4}})
    for row in rows(3) + [{"step": 4, "loss": math.nan}]:
        writer.write(row)
    writer.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert runs, os.listdir(tmp_path / "wandb")
    (path,) = glob.glob(os.path.join(runs[0], "*.wandb"))
    history = wandb_history(path)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history[:3]] == pytest.approx([2.0, 1.0, 2.0 / 3])
    assert history[2]["acc_0"] == pytest.approx(0.3) and "loss" not in history[3]  # NaN left out
    del wandb


def wandb_history(path: str) -> list[dict]:
    """The history rows of an offline W&B run file: a 7-byte file header, then LevelDB-log records (32 KiB
    blocks; each chunk: crc32c, length, type 1 full / 2 first / 3 middle / 4 last) holding Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(blob):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", blob[pos:pos + 7])
        pending += blob[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.integration
def test_a_real_run_writes_loss_and_acc_0_to_tensorboard(time_limited_run):
    from tests.helpers import metric_rows

    # Two colocated pairs of the tiny default ended by train.max_time_s (tests/conftest.py; shared with
    # tests/test_time_limit.py), with metrics.tensorboard=true. Also the CPU suite's one real run of an
    # acceptance-aligned loss (train.loss=lk, -log of the acceptance rate; tests/test_eagle3_train_loss.py
    # holds the rest): it must train and log like the default.
    run_dir, log = time_limited_run
    jsonl = metric_rows(run_dir)
    steps = [r["step"] for r in jsonl]
    assert len(steps) >= 2
    scalars = read_scalars(os.path.join(run_dir, "tensorboard"))
    assert [s for s, _ in scalars["loss"]] == steps
    assert [s for s, _ in scalars["acc_0"]] == steps
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in jsonl], rel=1e-6)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "loss lk" in log and "  loss: lk\n" in f.read()
    losses = [r["loss"] for r in jsonl]
    assert all(math.isfinite(x) and x > 0 for x in losses) and losses[-1] < losses[0], losses
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.*"))) == 1  # the trainer leader only
