"""The trainer role: receive captured states, train the EAGLE-3 draft, checkpoint, export.

The step loop reads top to bottom: receive micro-batches, agree on the loss normaliser, forward and
backward each, clip, step (or skip together), reduce metrics once, log, checkpoint.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from lib.config import Placement
from lib.trainer.draft_setup import DraftBundle, build_draft
from lib.trainer.checkpoint import full_model_state, latest_checkpoint, load_checkpoint, save_checkpoint
from lib.drafts.eagle3.export import export_draft
from lib.drafts.eagle3.loss import count_valid_positions, sim_accept_len
from lib.trainer.metrics import MetricsWriter, plot_curves, write_summary
from lib.eval.online import TrainerEvaluator, eval_enabled
from lib.launch.runtime import RunContext, peak_memory
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
    bundle = build_draft(ctx)
    optimizer = torch.optim.AdamW(bundle.trainable_params(), lr=cfg.train.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr_ratio))
    start_step, loader_state, counters = resume(ctx, bundle, optimizer, schedule)
    end_step = cfg.train.max_steps
    if cfg.run.stop_after_steps:
        end_step = min(end_step, start_step + cfg.run.stop_after_steps)
    source.start(start_step, loader_state, (end_step - start_step) * cfg.train.grad_accum)
    evaluator = None
    if eval_enabled(ctx):
        evaluator = TrainerEvaluator(ctx, bundle.draft_config.to_dict(), getattr(source, "backend", None))
    enter_loop_timeouts(ctx.groups, cfg.run.loop_timeout_s)
    metrics = MetricsWriter(ctx.run_dir, ctx.is_trainer_leader)
    try:
        for step in range(start_step, end_step):
            for row in evaluator.maybe_evaluate(step, bundle.model) if evaluator else []:
                metrics.write(row)
            try:
                row, loader_state = train_step(ctx, bundle, optimizer, source, counters)
            except torch.OutOfMemoryError as e:
                raise RuntimeError(out_of_memory_hint(ctx, step + 1)) from e
            schedule.step()
            row.update(step=step + 1, lr=schedule.get_last_lr()[0], **counters)
            metrics.write(row)
            if ctx.is_trainer_leader and ((step + 1) % cfg.train.log_every == 0 or step == start_step):
                log.info("step %d loss %.4f acc_0 %.3f sim_accept %.2f grad_norm %.3g %.0f tok/s handoff %.2f ms",
                         step + 1, row["loss"], row["acc_0"], row["sim_accept_len"], row["grad_norm"],
                         row["tokens_per_s"], row["handoff_ms"])
            if step + 1 == end_step or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                checkpoint(ctx, bundle, optimizer, schedule, step + 1, loader_state, counters)
        if evaluator is not None:
            for row in evaluator.maybe_evaluate(end_step, bundle.model) + evaluator.finish():
                metrics.write(row)
    finally:
        metrics.close()
        source.close()
    if ctx.is_trainer_leader:
        plot_curves(ctx.run_dir)
        summary = write_summary(ctx.run_dir, {"skipped_steps": counters["skipped_steps"]})
        log.info("done: draft export in %s/draft, metrics %s/metrics.jsonl, summary %s/summary.json "
                 "(last loss %.4f, acc_0 %.3f)", ctx.run_dir, ctx.run_dir, ctx.run_dir,
                 summary.get("last", {}).get("loss", float("nan")), summary.get("last", {}).get("acc_0", float("nan")))


def resume(ctx: RunContext, bundle: DraftBundle, optimizer, schedule) -> tuple[int, Optional[dict], dict]:
    """(start step, data position, counters): from the newest complete checkpoint, or fresh."""
    fresh = (0, None, {"samples_seen": 0, "skipped_steps": 0})
    if not ctx.cfg.checkpoint.resume:
        return fresh
    path = latest_checkpoint(ctx.run_dir)
    if path is None:
        if ctx.is_trainer_leader:
            log.info("checkpoint.resume=true but no complete checkpoint in %s: starting fresh", ctx.run_dir)
        return fresh
    meta, private = load_checkpoint(path, bundle.model, optimizer, ctx.groups.trainer_gloo)
    schedule.load_state_dict(meta["schedule"])
    torch.set_rng_state(private["rng"])
    if ctx.is_trainer_leader:
        log.info("resumed from %s at step %d", path, meta["step"])
    return meta["step"], private["loader_state"], meta["counters"]


def apply_update(bundle: DraftBundle, optimizer: torch.optim.Optimizer, max_norm: float) -> tuple[float, bool]:
    """Clip by the global norm and step, unless the norm is not finite: every rank sees the same
    global norm, so all skip together (never an early return on some ranks)."""
    grad_norm = bundle.clip_grad_norm(max_norm)
    applied = math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


def out_of_memory_hint(ctx: RunContext, step: int) -> str:
    share = "train_frac" if ctx.topo.placement == Placement.colocate else "train_frac+infer_frac"
    return (f"trainer step {step} ran out of GPU memory under its cap ({share} of the GPU, docs/launching.md): "
            f"raise {share}, or lower engine.token_budget={ctx.cfg.engine.token_budget} or "
            f"train.ttt_length={ctx.cfg.train.ttt_length}")


def train_step(ctx: RunContext, bundle: DraftBundle, optimizer: torch.optim.Optimizer, source: PayloadSource,
               counters: dict[str, int]) -> tuple[dict[str, Any], Optional[dict]]:
    cfg, device, group = ctx.cfg, ctx.device, ctx.groups.trainer
    t0 = time.perf_counter()
    micro, wait_s = receive_micro_batches(source, cfg.train.grad_accum, device)
    # Target distributions once per micro-batch: they feed both the normaliser and the loss.
    targets = [bundle.target_head.target_probs(t["final_hidden"]) for _, t in micro]
    # The normaliser is the global count of valid positions, so 1 trainer and N trainers with the
    # same global batch produce the same gradient.
    counts = sum(count_valid_positions(bundle.target_head, t, cfg.train.ttt_length, target=tgt)
                 for (_, t), tgt in zip(micro, targets))
    counts = counts.to(device=device, dtype=torch.float32)
    dist.all_reduce(counts, group=group)
    stats = None
    for (_, tensors), target in zip(micro, targets):
        loss, m = bundle.model(tensors, target, counts, grad_scale=float(dist.get_world_size(group)))
        loss.backward()
        source.release()
        stats = m["sums"] if stats is None else stats + m["sums"]
    grad_norm, applied = apply_update(bundle, optimizer, cfg.train.grad_clip)
    if not applied:
        counters["skipped_steps"] += 1
        if ctx.is_trainer_leader:
            log.warning("non-finite gradient norm (%s): update skipped on all trainers", grad_norm)
    tokens = torch.tensor([sum(h["num_rows"] for h, _ in micro), sum(len(h["sample_ids"]) for h, _ in micro)],
                          dtype=torch.float32, device=device)
    reduced = torch.cat([stats.to(device=device, dtype=torch.float32), tokens])
    dist.all_reduce(reduced, group=group)
    counters["samples_seen"] += int(reduced[-1].item())
    step_time = time.perf_counter() - t0
    row = summarize_stats(reduced[:-2].cpu(), cfg.train.ttt_length)
    row.update(grad_norm=grad_norm, step_time_s=step_time, tokens_per_s=float(reduced[-2]) / step_time,
               samples_per_s=float(reduced[-1]) / step_time, handoff_ms=wait_s * 1e3,
               peak_alloc_bytes=peak_memory(device),
               engine_peak_alloc_bytes=max(h.get("engine_peak_alloc_bytes", 0) for h, _ in micro))
    return row, micro[-1][0].get("loader_state")


def receive_micro_batches(source: PayloadSource, n: int, device: torch.device) -> tuple[list, float]:
    """n payloads with their sample boundaries attached; returns them and the time spent waiting."""
    t = time.perf_counter()
    micro = []
    for _ in range(n):
        header, tensors = source.recv()
        tensors = dict(tensors, cu_seqlens=torch.tensor(header["cu_seqlens"], dtype=torch.int32, device=device))
        micro.append((header, tensors))
    return micro, time.perf_counter() - t


def summarize_stats(sums: torch.Tensor, ttt_length: int) -> dict[str, float]:
    """sums = [ploss_sum_i..., correct_i..., count_i...] over all trainers; weights 0.8^i."""
    ploss, correct, count = sums[:ttt_length], sums[ttt_length:2 * ttt_length], sums[2 * ttt_length:3 * ttt_length]
    denom = count.clamp_min(1)
    row: dict[str, float] = {}
    for i in range(ttt_length):
        row[f"ploss_{i}"] = float(ploss[i] / denom[i])
        row[f"acc_{i}"] = float(correct[i] / denom[i])
    row["loss"] = sum(0.8 ** i * row[f"ploss_{i}"] for i in range(ttt_length))
    row["sim_accept_len"] = sim_accept_len([row[f"acc_{i}"] for i in range(ttt_length)])
    return row


def export_dtype(device: torch.device) -> torch.dtype:
    """bf16 for serving on GPU; fp32 on CPU, where training ran in fp32 (exact resume checks)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def checkpoint(ctx: RunContext, bundle: DraftBundle, optimizer, schedule, step: int, loader_state, counters) -> None:
    cfg = ctx.cfg
    save_checkpoint(ctx.run_dir, step, bundle.model, optimizer,
                    meta={"schedule": schedule.state_dict(), "counters": counters},
                    private={"loader_state": loader_state, "rng": torch.get_rng_state()},
                    group=ctx.groups.trainer_gloo, keep=cfg.checkpoint.keep)
    state = {k.removeprefix("draft."): v for k, v in full_model_state(bundle.model).items()}
    if ctx.is_trainer_leader:
        for out in (os.path.join(ctx.run_dir, "checkpoints", f"step-{step}", "draft"),
                    os.path.join(ctx.run_dir, "draft")):
            export_draft(state, bundle.draft_config, out, dtype=export_dtype(ctx.device))
    dist.barrier(group=ctx.groups.trainer_gloo)
