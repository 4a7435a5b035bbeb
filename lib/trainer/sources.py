"""Payload sources for the trainer loop: the handoff receiver (paired engine) or an inline engine."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lib.launch.runtime import RunContext


class ReceiverSource:
    """The trainer side of a pair: tells the engine where to start, then receives over the handoff."""

    def __init__(self, ctx: RunContext):
        from lib.drafts.base import get_strategy
        from lib.target.shape import load_hf_config, target_shape
        from lib.handoff import make_receiver

        cfg = ctx.cfg
        self.ctx = ctx
        # The engine sizes its slots from the same plan; the handoff's start-up check catches drift.
        strategy = get_strategy(cfg.draft.name)
        hf = load_hf_config(cfg.target)
        plan = strategy.capture_plan(hf, cfg)
        specs = strategy.payload_specs(plan, cfg.engine.token_budget, target_shape(cfg.target, ctx.device, hf).dtype)
        self.receiver = make_receiver(specs, cfg.handoff.slots, ctx.handoff_address(), ctx.peer_name(),
                                      cfg.run.loop_timeout_s, ctx.device, cfg.run.startup_timeout_s,
                                      cross_device=ctx.cross_device_handoff)

    def start(self, start_step: int, loader_state: Optional[dict], num_micro_batches: int) -> None:
        dist.send_object_list([(start_step, loader_state, num_micro_batches)], dst=self.ctx.info.pair,
                              group=self.ctx.groups.meta)

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return self.receiver.recv()

    def release(self) -> None:
        self.receiver.release()

    def close(self) -> None:
        self.receiver.close()


class InlineSource:
    """placement=sequential: the same process runs the engine step right before the draft step."""

    def __init__(self, stepper):
        self.stepper = stepper

    @property
    def backend(self):
        """The in-process target, which online evaluation uses directly (no weight push)."""
        return self.stepper.backend

    def start(self, start_step: int, loader_state: Optional[dict], num_micro_batches: int) -> None:
        self.stepper.load_state(loader_state)

    def recv(self) -> tuple[dict, dict[str, torch.Tensor]]:
        header, tensors = self.stepper.produce(None)
        # Captured under inference mode: autograd refuses to save such tensors, so hand over clones.
        return header, {k: v.clone() for k, v in tensors.items()}

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass
