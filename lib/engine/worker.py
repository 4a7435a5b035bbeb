"""The engine role's loop: run the frozen target over this pair's data shard and hand captured states over.

Each micro-batch: pack the next samples, acquire a free handoff slot (blocks while the trainer is
`handoff.slots` batches behind), forward the target writing aux and final hidden states straight
into the slot, send a small header. The trainer tells the engine where to start (resume) and how
many micro-batches to produce.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist

from lib.data.batch import PackedBatch, eagle3_payload_specs
from lib.launch.runtime import RunContext, peak_memory

log = logging.getLogger("specdraft.engine")


class EngineStepper:
    """Target model + this pair's data stream; produces one captured micro-batch per call."""

    def __init__(self, ctx: RunContext):
        from lib.data.datasets import load_dataset
        from lib.engine import make_backend
        from lib.data.packing import ShardedPackedLoader

        cfg = ctx.cfg
        self.ctx = ctx
        self.backend = make_backend(cfg.engine.backend)
        self.backend.load(cfg.target, cfg.engine, ctx.device, ctx.groups.engine_tp)
        dataset = load_dataset(cfg.data, ctx.tokenizer_path, "train")
        self.loader = ShardedPackedLoader(dataset, shard=ctx.info.pair_index, num_shards=ctx.topo.num_pairs,
                                          token_budget=cfg.engine.token_budget, seed=cfg.train.seed,
                                          overlong=cfg.data.overlong)
        self.specs = eagle3_payload_specs(cfg.engine.token_budget, self.backend.hidden_size,
                                          len(self.backend.aux_layers), self.backend.dtype)
        self._iter = iter(self.loader)
        self.step = 0

    def load_state(self, loader_state: Optional[dict]) -> None:
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
            self._iter = iter(self.loader)

    def produce(self, slot: Optional[dict[str, torch.Tensor]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """Capture the next micro-batch, into `slot` views when given (zero copy), else fresh tensors."""
        batch: PackedBatch = next(self._iter)
        n = batch.num_tokens
        out = None if slot is None else {k: slot[k] for k in ("aux_hidden", "final_hidden")}
        states = self.backend.capture(batch, out=out)
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
                  "cu_seqlens": batch.cu_seqlens.tolist(), "loader_state": self.loader.state_dict(),
                  "engine_peak_alloc_bytes": peak_memory(device)}
        self.step += 1
        return header, tensors


def run_engine(ctx: RunContext) -> None:
    from lib.handoff import make_sender
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
            sender.send(tensors, header)
            busy += time.perf_counter() - t
            if ctx.is_engine_leader and (i + 1) % (cfg.train.log_every * cfg.train.grad_accum) == 0:
                log.info("engine produced %d/%d micro-batches (host time %.1f ms each)", i + 1, num_micro,
                         1e3 * busy / (i + 1))
        if evals is not None:
            evals.drain()
    finally:
        sender.close()
