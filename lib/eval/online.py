"""Online evaluation: the acceptance length of the current draft, measured while it trains.

Pair 0 does it. Its trainer pushes the gathered draft weights to its engine (same GPU, no NCCL:
lib/handoff/weight_push.py) before the first step, every `eval.every` steps and after the last; the engine
applies them between batches, runs greedy speculative decoding on the fixed held-out prompts with
its own target, and reports a row (accept_len, accept_rate_i, step) that lands in metrics.jsonl.
placement=sequential evaluates in-process instead of pushing. What is pushed, the draft it is loaded
into and the drafter that decodes with it come from the run's DraftStrategy.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
import torch.distributed as dist

from lib.drafts.base import DraftStrategy, get_strategy
from lib.launch.sharding import full_model_state
from lib.launch.runtime import RunContext

log = logging.getLogger("specdraft.eval")


def eval_enabled(ctx: RunContext) -> bool:
    """Needs a real target checkpoint (its lm_head and held-out data); validate() refuses engine.tp>1."""
    cfg = ctx.cfg
    return cfg.eval.every > 0 and cfg.target.path is not None


def is_eval_step(step: int, cfg) -> bool:
    return step == 0 or step % cfg.eval.every == 0 or step == cfg.train.max_steps


def weights_address(ctx: RunContext) -> str:
    return ctx.handoff_address().removesuffix(".sock") + "-w.sock"


class EvalHarness:
    """Engine side: target runner, held-out prompts, stop tokens and a draft copy to load pushes into."""

    def __init__(self, ctx: RunContext, backend, strategy: DraftStrategy):
        from transformers import AutoTokenizer

        from lib.data.datasets import load_heldout_prompts
        from lib.target.weights import load_target_lm_head
        from lib.eval.target import TargetRunner, stop_token_ids

        cfg = ctx.cfg
        self.cfg, self.backend, self.strategy = cfg, backend, strategy
        self.runner = TargetRunner.from_backend(backend, load_target_lm_head(cfg.target.path))
        self.prompts = load_heldout_prompts(cfg.data, ctx.tokenizer_path, cfg.eval.num_prompts)
        self.stops = stop_token_ids(AutoTokenizer.from_pretrained(ctx.tokenizer_path), cfg.target.path)
        self.draft = None

    def evaluate(self, weights: dict[str, torch.Tensor], draft_config: dict, step: int) -> dict:
        from lib.eval.spec_decode import evaluate_online

        if self.draft is None:
            self.draft = self.strategy.eval_model(draft_config, self.backend.model, self.runner.device,
                                                  self.runner.dtype)
        self.draft.load_state_dict({k: v.to(self.runner.device) for k, v in weights.items()}, strict=False)
        row = evaluate_online(self.runner, self.strategy.drafter(self.draft), self.prompts, self.cfg.eval.draft_tokens,
                              self.cfg.eval.max_new_tokens, step=step, stop_token_ids=self.stops)
        log.info("eval at step %d: accept_len %.3f (k=%s) in %.1f s", step, row["accept_len"],
                 self.cfg.eval.draft_tokens[0], row["eval_s"])
        return row


def evaluate_safely(harness: EvalHarness, weights: dict[str, torch.Tensor], draft_config: dict, step: int) -> dict:
    """An evaluation that fails is logged and reported as a row: it never takes training down."""
    try:
        return harness.evaluate(weights, draft_config, step)
    except Exception as exc:  # noqa: BLE001 - any failure of the auxiliary evaluation
        log.exception("online evaluation at step %d failed; training goes on", step)
        return {"step": step, "eval_error": f"{type(exc).__name__}: {exc}"[:500]}


class EngineEvalService:
    """The engine's half: between batches, apply a pending push, evaluate, report back."""

    def __init__(self, ctx: RunContext, backend):
        from lib.handoff.weight_push import WeightSubscriber

        self.harness = EvalHarness(ctx, backend, get_strategy(ctx.cfg.draft.name))
        self.sub = WeightSubscriber(weights_address(ctx), ctx.device, timeout_s=ctx.cfg.run.loop_timeout_s,
                                    startup_timeout_s=ctx.cfg.run.startup_timeout_s, peer=ctx.peer_name())

    def service(self) -> None:
        pushed = self.sub.poll()
        if pushed is None:
            return
        version, weights = pushed
        self.sub.report(evaluate_safely(self.harness, weights, self.sub.meta, version))

    def drain(self) -> None:
        """After the last batch: serve the final push until the trainer closes the channel."""
        while not self.sub.closed:
            self.service()
            time.sleep(0.01)
        self.sub.close()


class TrainerEvaluator:
    """The trainer's half. Every trainer joins the weight gather (a collective); pair 0 evaluates."""

    def __init__(self, ctx: RunContext, strategy: DraftStrategy, draft_config: dict, inline_backend=None):
        self.ctx, self.strategy, self.draft_config = ctx, strategy, draft_config
        self.leader = ctx.is_trainer_leader
        self.harness = (EvalHarness(ctx, inline_backend, strategy)
                        if inline_backend is not None and self.leader else None)
        self.pub = None
        if self.leader and inline_backend is None:
            from lib.handoff.weight_push import WeightPublisher
            cast = torch.bfloat16 if ctx.device.type == "cuda" else None
            self.pub = WeightPublisher(weights_address(ctx), ctx.device, cast_dtype=cast,
                                       timeout_s=ctx.cfg.run.loop_timeout_s,
                                       startup_timeout_s=ctx.cfg.run.startup_timeout_s, peer=ctx.peer_name())
        self.last_pushed: Optional[int] = None

    def maybe_evaluate(self, step: int, model) -> list[dict]:
        """Rows to log now: finished evaluations, plus (inline) this step's."""
        rows = self.pub.poll_reports() if self.pub is not None else []
        if not is_eval_step(step, self.ctx.cfg):
            return rows
        state = full_model_state(model)  # collective over the trainer group
        if self.leader:
            weights = self.strategy.eval_weights(state)
            if self.harness is not None:
                rows.append(evaluate_safely(self.harness, weights, self.draft_config, step))
            else:
                ms = self.pub.publish(weights, step, meta=self.draft_config)
                rows.append({"step": step, "weight_push_ms": ms})
                self.last_pushed = step
        dist.barrier(group=self.ctx.groups.trainer_gloo)
        return rows

    def finish(self) -> list[dict]:
        """Wait (bounded) for the last pushed evaluation, then close the channel."""
        if self.pub is None:
            return []
        rows, deadline = [], time.monotonic() + self.ctx.cfg.run.loop_timeout_s
        while self.last_pushed is not None and time.monotonic() < deadline:
            rows += self.pub.poll_reports()
            if any(r.get("step") == self.last_pushed and ("accept_len" in r or "eval_error" in r) for r in rows):
                break
            time.sleep(0.05)
        self.pub.close()
        return rows
