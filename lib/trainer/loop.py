"""The trainer role: receive captured states, train the run's draft, checkpoint, export.

The step loop reads top to bottom: receive micro-batches, agree on the loss normaliser, forward and
backward each, clip, step (or skip together), reduce metrics once, log, checkpoint. What the draft
is, its loss, metrics and export formats come from the run's DraftStrategy (lib/drafts/base.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from lib.config import Placement
from lib.drafts.base import DraftBundle, DraftStrategy, get_strategy
from lib.data.packing import position_key
from lib.launch.sharding import full_model_state
from lib.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lib.trainer.metric_sinks import config_dict
from lib.trainer.metrics import MIN_PLOTTED_ROWS, MetricsWriter, plot_curves, write_summary
from lib.trainer.optim import build_optimizer, clipped_step
from lib.eval.online import TrainerEvaluator, eval_enabled
from lib.launch.runtime import RunContext, peak_memory
from lib.launch.stopping import deadline, fault_nan_steps, fault_pause_in_save, stop_requested, write_stop_record
from lib.launch.topology import enter_loop_timeouts

log = logging.getLogger("specdraft.trainer")


class PayloadSource(Protocol):
    """Where captured states come from: the handoff receiver, or an in-process engine (sequential)."""

    def start(self, start_step: int, loader_state: Optional[dict], num_micro_batches: int) -> None: ...
    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to min_ratio of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_trainer(ctx: RunContext, source: Optional[PayloadSource] = None) -> None:
    if source is None:
        from lib.trainer.sources import ReceiverSource
        source = ReceiverSource(ctx)
    cfg = ctx.cfg
    strategy = get_strategy(cfg.draft.name)
    bundle = strategy.build(ctx)
    optimizer = build_optimizer(bundle.trainable_params(), cfg.train.lr, cfg.train.weight_decay, ctx.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio))
    start_step, loader_state, counters = resume(ctx, bundle, optimizer, schedule)
    end_step = cfg.train.max_steps
    if cfg.run.stop_after_steps:
        end_step = min(end_step, start_step + cfg.run.stop_after_steps)
    source.start(start_step, loader_state, (end_step - start_step) * cfg.train.grad_accum)
    evaluator = None
    if eval_enabled(ctx):
        evaluator = TrainerEvaluator(ctx, strategy, bundle.config_dict(), getattr(source, "backend", None))
    enter_loop_timeouts(ctx.groups, cfg.run.loop_timeout_s)
    metrics = MetricsWriter(ctx.run_dir, ctx.is_trainer_leader, cfg.metrics, start_step,
                            config_dict(cfg) if ctx.is_trainer_leader else None)
    stopped_by, timed_out, consecutive_skips = None, False, 0
    time_up_at = time.monotonic() + cfg.train.max_time_s if cfg.train.max_time_s > 0 else math.inf
    try:
        for step in range(start_step, end_step):
            for row in evaluator.maybe_evaluate(step, bundle.model) if evaluator else []:
                metrics.write(row)
            try:
                row, loader_state = train_step(ctx, strategy, bundle, optimizer, source, counters, step + 1,
                                               time_up=time.monotonic() >= time_up_at)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(out_of_memory_hint(ctx, step + 1)) from e
            # Every trainer holds the same flag (it was summed in the step's all-reduce), so all stop here.
            stopped_by = row.pop("stop_signal")
            if row.pop("time_up") and not stopped_by and step + 1 < end_step:
                if ctx.is_trainer_leader:
                    log.info("train.max_time_s=%g reached after step %d: final checkpoint and export there "
                             "(online evaluation ends with it; score the export with eval.py)",
                             cfg.train.max_time_s, step + 1)
                end_step, timed_out = step + 1, True
            schedule.step()
            row.update(step=step + 1, lr=schedule.get_last_lr()[0], **counters)
            metrics.write(row)
            if ctx.is_trainer_leader and ((step + 1) % cfg.train.log_every == 0 or step == start_step):
                headline = "".join(f" {k} {row[k]:.3f}" for k in strategy.headline_metrics if k in row)
                log.info("step %d loss %.4f%s grad_norm %.3g %.0f tok/s handoff %.2f ms", step + 1, row["loss"],
                         headline, row["grad_norm"], row["tokens_per_s"], row["handoff_ms"])
            consecutive_skips = 0 if math.isfinite(row["grad_norm"]) else consecutive_skips + 1
            check_skips(cfg.train.max_consecutive_skips, consecutive_skips, step + 1, start_step)
            periodic = cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0
            if step + 1 == end_step or periodic or stopped_by:
                bounded_checkpoint(ctx, strategy, bundle, optimizer, schedule, step + 1, loader_state, counters)
            if stopped_by:
                stop_here(ctx, stopped_by, step + 1)
                break
            if timed_out:
                break
        if evaluator is not None and not stopped_by and not timed_out:
            for row in evaluator.maybe_evaluate(end_step, bundle.model) + evaluator.finish():
                metrics.write(row)
    finally:
        metrics.close()
        source.close()
    if ctx.is_trainer_leader and stopped_by:
        write_summary(ctx.run_dir, {"skipped_steps": counters["skipped_steps"],
                                    "skipped_samples": counters["skipped_samples"]})
    elif ctx.is_trainer_leader:
        if not plot_curves(ctx.run_dir):
            log.info("curves: fewer than %d training rows in metrics.jsonl, no PNGs drawn (lower train.log_every "
                     "for more rows)", MIN_PLOTTED_ROWS)
        summary = write_summary(ctx.run_dir, {"skipped_steps": counters["skipped_steps"],
                                              "skipped_samples": counters["skipped_samples"]})
        last = summary.get("last", {})
        headline = "".join(f", {k} {last[k]:.3f}" for k in strategy.headline_metrics if k in last)
        log.info("done: draft export in %s, metrics %s/metrics.jsonl, summary %s/summary.json (last loss %.4f%s)",
                 ", ".join(exported_dirs(ctx.run_dir)), ctx.run_dir, ctx.run_dir, last.get("loss", float("nan")),
                 headline)


def resume(ctx: RunContext, bundle: DraftBundle, optimizer, schedule) -> tuple[int, Optional[dict], dict]:
    """(start step, data position, counters): from the newest complete checkpoint, or fresh."""
    fresh = (0, None, fresh_counters())
    if not ctx.cfg.checkpoint.resume:
        return fresh
    path = latest_checkpoint(ctx.run_dir)
    if path is None:
        if ctx.is_trainer_leader:
            log.info("checkpoint.resume=true but no complete checkpoint in %s: starting fresh", ctx.run_dir)
        return fresh
    meta, private = load_checkpoint(path, bundle.model, optimizer, ctx.groups.trainer_gloo)
    schedule.load_state_dict(meta["schedule"])  # the learning-rate schedule continues at meta["step"]
    if private is not None:
        # Same number of pairs: each pair continues exactly as it was (bit-identical to no restart).
        torch.set_rng_state(private["rng"])
        loader_state = private["loader_state"]
        if ctx.is_trainer_leader:
            log.info("resumed from %s at step %d", path, meta["step"])
    else:
        loader_state = resharded_data_position(ctx, path, meta)
    # Checkpoints from before a counter existed resume it at 0.
    return meta["step"], loader_state, {**fresh_counters(), **meta["counters"]}


def resharded_data_position(ctx: RunContext, path: str, meta: dict) -> dict:
    """The global data position for a resume on another number of pairs (DCP resharded the model)."""
    pairs = dist.get_world_size(ctx.groups.trainer_gloo)
    position = meta.get("data_position")
    if position is None:
        raise RuntimeError(f"checkpoint {path} was written by {meta['world']} pairs before checkpoints held a "
                           f"global data position; resume it with {meta['world']} pairs")
    if ctx.is_trainer_leader:
        log.info("resumed from %s at step %d with %d pair(s) instead of %d: model and optimizer resharded, data "
                 "continues at sample %d of epoch %d's order", path, meta["step"], pairs, meta["world"],
                 position["index"], position["epoch"])
        if not meta.get("data_positions_agree", True):
            log.warning("the %d pairs of %s stood at different data positions (an engine replaced a batch it refused "
                        "whole); continuing from the earliest, so up to one batch per such pair repeats",
                        meta["world"], path)
    return position


def check_skips(limit: int, consecutive: int, step: int, start_step: int) -> None:
    """train.max_consecutive_skips: a run whose gradients stay non-finite is broken, not unlucky."""
    if limit and consecutive >= limit:
        raise RuntimeError(f"step {step}: {consecutive} consecutive steps (from step {step - consecutive + 1}) had a "
                           f"non-finite gradient norm and were skipped on all trainers (train.max_consecutive_skips="
                           f"{limit}); the last checkpoint before step {step - consecutive + 1} is the one to resume "
                           "from, after lowering train.lr or checking the data")


def stop_here(ctx: RunContext, signal_name: str, step: int) -> None:
    """After a signal: the checkpoint at `step` is written; tell the launch where the run stopped."""
    if ctx.is_trainer_leader:
        path = os.path.join(ctx.run_dir, "checkpoints", f"step-{step}")
        write_stop_record(ctx.run_dir, step, path, signal_name)
        log.warning("%s: stopped after step %d with a checkpoint in %s; resume with checkpoint.resume=true",
                    signal_name, step, path)


def fresh_counters() -> dict[str, int]:
    """samples_seen: trained on; skipped_steps: non-finite gradient; skipped_samples: refused by the engine."""
    return {"samples_seen": 0, "skipped_steps": 0, "skipped_samples": 0}


def apply_update(bundle: DraftBundle, optimizer: torch.optim.Optimizer, max_norm: float) -> tuple[float, bool]:
    """Clip by the global norm and step, unless the norm is not finite: every rank sees the same
    global norm, so all skip together (never an early return on some ranks)."""
    return clipped_step(optimizer, bundle.trainable_params(), max_norm)


def out_of_memory_hint(ctx: RunContext, step: int) -> str:
    share = "train_frac" if ctx.topo.placement == Placement.colocate else "train_frac+infer_frac"
    return (f"trainer step {step} ran out of GPU memory under its cap ({share} of the GPU, docs/launching.md): "
            f"raise {share}, or lower engine.token_budget={ctx.cfg.engine.token_budget} or "
            f"train.ttt_length={ctx.cfg.train.ttt_length}")


def train_step(ctx: RunContext, strategy: DraftStrategy, bundle: DraftBundle, optimizer: torch.optim.Optimizer,
               source: PayloadSource, counters: dict[str, int], step: int = 0,
               time_up: bool = False) -> tuple[dict[str, Any], Optional[dict]]:
    """One optimizer step (`step`, 1-based). row["stop_signal"]: a signal name when any trainer, or any
    trainer's engine (payload header "stop"), was asked to stop; row["time_up"]: any trainer's clock passed
    train.max_time_s. Both are the same on every trainer."""
    cfg, device, group = ctx.cfg, ctx.device, ctx.groups.trainer
    t0 = time.perf_counter()
    micro, wait_s = receive_micro_batches(source, cfg.train.grad_accum, device)
    if cfg.run.record_samples:
        record_samples(ctx, [h for h, _ in micro])
    # The loss normaliser is global (summed over trainers), so 1 trainer and N trainers with the same
    # global batch produce the same gradient.
    contexts, counts = strategy.prepare(bundle, [t for _, t in micro])
    counts = counts.to(device=device, dtype=torch.float32)
    dist.all_reduce(counts, group=group)
    stats = None
    for (_, tensors), context in zip(micro, contexts):
        loss, sums = strategy.micro_loss(bundle, tensors, context, counts, float(dist.get_world_size(group)))
        loss.backward()
        source.release()
        stats = sums if stats is None else stats + sums
    if step in fault_nan_steps(dist.get_rank(group)):
        # Test-only: one element of this trainer's own gradient shard (FSDP grads are DTensors).
        local = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in bundle.trainable_params())
                 if g is not None]
        next(g for g in local if g.numel()).view(-1)[0] = float("nan")
    grad_norm, applied = apply_update(bundle, optimizer, cfg.train.grad_clip)
    if not applied:
        counters["skipped_steps"] += 1
        if ctx.is_trainer_leader:
            log.warning("non-finite gradient norm (%s): update skipped on all trainers", grad_norm)
    tokens = torch.tensor([sum(h["num_rows"] for h, _ in micro), sum(len(h["sample_ids"]) for h, _ in micro),
                           sum(len(h.get("skipped_sample_ids", ())) for h, _ in micro)],
                          dtype=torch.float32, device=device)
    signal_name = stop_requested() or next((h["stop"] for h, _ in micro if h.get("stop")), None)
    flags = torch.tensor([1.0 if time_up else 0.0, 1.0 if signal_name else 0.0], device=device)
    reduced = torch.cat([stats.to(device=device, dtype=torch.float32), tokens, flags])
    dist.all_reduce(reduced, group=group)
    stop, time_up = bool(reduced[-1].item() > 0), bool(reduced[-2].item() > 0)
    reduced = reduced[:-2]
    counters["samples_seen"] += int(reduced[-2].item())
    counters["skipped_samples"] += int(reduced[-1].item())
    step_time = time.perf_counter() - t0
    row = strategy.summarize(reduced[:-3].cpu())
    row.update(grad_norm=grad_norm, step_time_s=step_time, tokens_per_s=float(reduced[-3]) / step_time,
               samples_per_s=float(reduced[-2]) / step_time, handoff_ms=wait_s * 1e3,
               peak_alloc_bytes=peak_memory(device),
               engine_peak_alloc_bytes=max(h.get("engine_peak_alloc_bytes", 0) for h, _ in micro))
    row["stop_signal"] = (signal_name or "SIGTERM (another rank's)") if stop else None
    row["time_up"] = time_up
    return row, micro[-1][0].get("loader_state")


def record_samples(ctx: RunContext, headers: list[dict]) -> None:
    """run.record_samples: append the dataset indices this pair consumed (trained on, or refused by the
    engine) to <run.dir>/samples/rank-R.jsonl, to audit that resumes train every sample once."""
    out = os.path.join(ctx.run_dir, "samples")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank-{dist.get_rank(ctx.groups.trainer_gloo)}.jsonl"), "a") as f:
        for h in headers:
            f.write(json.dumps({"ids": h["sample_ids"], "refused": h.get("skipped_sample_ids", [])}) + "\n")


def receive_micro_batches(source: PayloadSource, n: int, device: torch.device) -> tuple[list, float]:
    """n payloads with their sample boundaries attached; returns them and the time spent waiting."""
    t = time.perf_counter()
    micro = []
    for _ in range(n):
        header, tensors = source.recv()
        tensors = dict(tensors, cu_seqlens=torch.tensor(header["cu_seqlens"], dtype=torch.int32, device=device))
        micro.append((header, tensors))
    return micro, time.perf_counter() - t


def export_dtype(device: torch.device) -> torch.dtype:
    """bf16 for serving on GPU; fp32 on CPU, where training ran in fp32 (exact resume checks)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def exported_dirs(run_dir: str) -> list[str]:
    """The run's final exports (draft/, and any other format directories beside it)."""
    return [os.path.join(run_dir, d) for d in sorted(os.listdir(run_dir)) if d.startswith("draft")
            and os.path.isdir(os.path.join(run_dir, d))] if os.path.isdir(run_dir) else []


def bounded_checkpoint(ctx: RunContext, strategy: DraftStrategy, bundle: DraftBundle, optimizer, schedule,
                       step: int, loader_state, counters) -> None:
    """checkpoint(), ended with an error if it outlasts run.save_timeout_s (a hung save after SIGTERM
    would otherwise run into the scheduler's SIGKILL)."""
    with deadline(ctx.cfg.run.save_timeout_s, f"the checkpoint save at step {step}", ctx.info.rank,
                  ctx.info.role.value):
        checkpoint(ctx, strategy, bundle, optimizer, schedule, step, loader_state, counters)


def checkpoint(ctx: RunContext, strategy: DraftStrategy, bundle: DraftBundle, optimizer, schedule, step: int,
               loader_state, counters) -> None:
    cfg = ctx.cfg
    # Every pair's position, to save the global one: they agree at a step boundary (lib/data/packing.py).
    positions = [None] * dist.get_world_size(ctx.groups.trainer_gloo)
    dist.all_gather_object(positions, loader_state, group=ctx.groups.trainer_gloo)
    known = [p for p in positions if p is not None]
    data_position = min(known, key=position_key) if known else None
    agree = all(position_key(p) == position_key(data_position) for p in known)
    save_checkpoint(ctx.run_dir, step, bundle.model, optimizer,
                    meta={"schedule": schedule.state_dict(), "counters": counters, "data_position": data_position,
                          "data_positions_agree": agree},
                    private={"loader_state": loader_state, "rng": torch.get_rng_state()},
                    group=ctx.groups.trainer_gloo, keep=cfg.checkpoint.keep)
    state = full_model_state(bundle.model)
    if ctx.is_trainer_leader:
        for out in (os.path.join(ctx.run_dir, "checkpoints", f"step-{step}"), ctx.run_dir):
            strategy.export(bundle, state, out, export_dtype(ctx.device), verifier_path=cfg.target.path)
    dist.barrier(group=ctx.groups.trainer_gloo)
