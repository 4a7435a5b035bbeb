"""The engine role's loop: run the frozen target over this pair's data shard and hand captured states over.

Each micro-batch: pack the next samples, acquire a free handoff slot (blocks while the trainer is
`handoff.slots` batches behind), forward the target writing what the draft strategy's capture plan
asks for straight into the slot, send a small header. The trainer tells the engine where to start
(resume) and how many micro-batches to produce. Samples the target cannot run (EngineInputError)
are dropped from their batch with a warning and counted (header "skipped_sample_ids").
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from lib.data.batch import PackedBatch
from lib.drafts.base import get_strategy
from lib.engine.base import EngineBackend, EngineInputError
from lib.target.shape import load_hf_config
from lib.launch.runtime import RunContext, peak_memory

log = logging.getLogger("specdraft.engine")


def capture_skipping_bad(backend: EngineBackend, batch: PackedBatch, out: Optional[dict[str, torch.Tensor]],
                         next_batch: Callable[[], PackedBatch]) -> tuple[PackedBatch, dict[str, torch.Tensor], list]:
    """backend.capture(batch), dropping the samples it refuses (docs/engine.md) with a warning each.

    Returns (the batch actually captured, its states, the dropped SampleProblems). A batch left with
    no sample is replaced by `next_batch()`. Under engine TP every member raises together and
    retries, so the group stays in step (a member whose own batch was fine retries it unchanged).
    """
    dropped = []
    while True:
        try:
            return batch, backend.capture(batch, out=out), dropped
        except EngineInputError as err:
            for problem in err.problems:
                log.warning("engine skips %s", problem.describe())
            dropped += err.problems
            batch = err.remaining(batch)
            if batch.num_tokens == 0:
                batch = next_batch()


class EngineStepper:
    """Target model + this pair's data stream; produces one captured micro-batch per call."""

    def __init__(self, ctx: RunContext):
        from lib.data.datasets import load_dataset
        from lib.engine import make_backend
        from lib.data.packing import ShardedPackedLoader

        cfg = ctx.cfg
        self.ctx = ctx
        self.backend = make_backend(cfg.engine.backend)
        self.strategy = get_strategy(cfg.draft.name)
        self.plan = self.strategy.capture_plan(load_hf_config(cfg.target), cfg)
        self.backend.load(cfg.target, cfg.engine, ctx.device, ctx.groups.engine_tp, plan=self.plan)
        dataset = load_dataset(cfg.data, ctx.tokenizer_path, "train")
        self.loader = ShardedPackedLoader(dataset, shard=ctx.info.pair_index, num_shards=ctx.topo.num_pairs,
                                          token_budget=cfg.engine.token_budget, seed=cfg.train.seed,
                                          overlong=cfg.data.overlong)
        self.specs = self.strategy.payload_specs(self.plan, cfg.engine.token_budget, self.backend.dtype)
        self._iter = iter(self.loader)
        self.step = 0
        self.skipped_samples = 0

    def load_state(self, loader_state: Optional[dict]) -> None:
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
            self._iter = iter(self.loader)

    def produce(self, slot: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Capture the next micro-batch, into `slot` views when given (zero copy), else fresh tensors."""
        out = None if slot is None else {k: slot[k] for k in self.plan.widths}
        batch, states, dropped = capture_skipping_bad(self.backend, next(self._iter), out, lambda: next(self._iter))
        if dropped:
            self.skipped_samples += len(dropped)
            log.warning("engine has skipped %d samples so far (docs/engine.md, bad samples)", self.skipped_samples)
        n = batch.num_tokens
        device = self.ctx.device
        tensors = {"input_ids": batch.input_ids, "loss_mask": batch.loss_mask, "position_ids": batch.position_ids}
        if slot is None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
            tensors.update(states)
        else:
            for k, v in tensors.items():
                slot[k][:n].copy_(v, non_blocking=True)
            tensors = slot
        header = {"step": self.step, "num_rows": n, "sample_ids": list(batch.sample_ids),
                  "skipped_sample_ids": [p.sample_id for p in dropped],
                  "cu_seqlens": batch.cu_seqlens.tolist(), "loader_state": self.loader.state_dict(),
                  "engine_peak_alloc_bytes": peak_memory(device)}
        self.step += 1
        return header, tensors


def run_engine(ctx: RunContext) -> None:
    from lib.handoff import HandoffClosed, make_sender
    from lib.launch.stopping import stop_requested
    from lib.eval.online import EngineEvalService, eval_enabled
    from lib.launch.topology import enter_loop_timeouts

    cfg = ctx.cfg
    stepper = EngineStepper(ctx)
    sender = make_sender(stepper.specs, cfg.handoff.slots, ctx.handoff_address(), ctx.peer_name(),
                         cfg.run.loop_timeout_s, ctx.device, cfg.run.startup_timeout_s,
                         cross_device=ctx.cross_device_handoff)
    try:
        start = [None]
        dist.recv_object_list(start, src=ctx.info.pair, group=ctx.groups.meta)
        start_step, loader_state, num_micro = start[0]
        stepper.load_state(loader_state)
        evals = EngineEvalService(ctx, stepper.backend) if eval_enabled(ctx) and ctx.info.pair_index == 0 else None
        enter_loop_timeouts(ctx.groups, cfg.run.loop_timeout_s)
        busy = 0.0
        for i in range(num_micro):
            if evals is not None:
                evals.service()
            slot = sender.acquire()
            t = time.perf_counter()
            header, tensors = stepper.produce(slot)
            # A stop asked of this engine reaches its trainer with the next payload; the trainers agree
            # on it and close the handoff after their checkpoint, which ends this loop below.
            header["stop"] = stop_requested()
            sender.send(tensors, header)
            busy += time.perf_counter() - t
            if ctx.is_engine_leader and (i + 1) % (cfg.train.log_every * cfg.train.grad_accum) == 0:
                log.info("engine produced %d/%d micro-batches (host time %.1f ms each)", i + 1, num_micro,
                         1e3 * busy / (i + 1))
        if evals is not None:
            evals.drain()
    except HandoffClosed:
        # The trainer closed before taking every micro-batch: it stopped on a signal after its checkpoint
        # (or failed, and torchrun names it). Either way nothing is left for this engine to produce.
        log.info("the trainer closed the handoff early (stop on %s, or train.max_time_s): engine stops",
                 stop_requested() or "a trainer's signal")
    except BaseException:
        sender.close(wait=False)  # failing: a stalled trainer must not hold this exit for another timeout
        raise
    finally:
        sender.close()
