"""EAGLE-3 as a DraftStrategy (draft=eagle3): capture three aux layers plus the final hidden state,
train one decoder layer with the training-time-test unroll, export in the research layout (and the
speculators layout where lib/drafts/eagle3/speculators_format.py exists), draft chains for evaluation.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config
from lib.drafts.base import CapturePlan, DraftStrategy, register_strategy
from lib.drafts.eagle3.loss import count_valid_positions, sim_accept_len
from lib.drafts.eagle3.trainer import Eagle3Bundle, Eagle3Options

log = logging.getLogger("specdraft.trainer")

SUMS_PER_STEP = 3  # metric sums per unroll step: soft-CE sum, correct argmax count, valid rows
SPECULATORS_MODULE = "lib.drafts.eagle3.speculators_format"


def eagle3_aux_layers(explicit: Optional[Sequence[int]], num_layers: int) -> list[int]:
    """The decoder layers whose outputs EAGLE-3 reads: target.aux_layers, or the paper's [1, L/2-1, L-4]."""
    if explicit is None:
        if num_layers < 4:
            raise ValueError(
                f"target has {num_layers} decoder layers; the default aux layers [1, L/2-1, L-4] need at least 4: "
                f"set target.aux_layers explicitly (each in [0, {num_layers - 1}])"
            )
        return [1, num_layers // 2 - 1, num_layers - 4]
    layers = [int(i) for i in explicit]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise ValueError(
            f"target.aux_layers={list(explicit)} must be a non-empty list of decoder layer indices in "
            f"[0, {num_layers - 1}] (the target has {num_layers} layers); fix or remove target.aux_layers"
        )
    return layers


def summarize_sums(sums: torch.Tensor, ttt_length: int) -> dict[str, float]:
    """sums = [ploss_sum_i..., correct_i..., count_i...] over all trainers; loss weights 0.8^i."""
    ploss, correct, count = sums[:ttt_length], sums[ttt_length:2 * ttt_length], sums[2 * ttt_length:3 * ttt_length]
    denom = count.clamp_min(1)
    row: dict[str, float] = {}
    for i in range(ttt_length):
        row[f"ploss_{i}"] = float(ploss[i] / denom[i])
        row[f"acc_{i}"] = float(correct[i] / denom[i])
    row["loss"] = sum(0.8 ** i * row[f"ploss_{i}"] for i in range(ttt_length))
    row["sim_accept_len"] = sim_accept_len([row[f"acc_{i}"] for i in range(ttt_length)])
    return row


def _speculators_exporter():
    """export_speculators(state, config, out_dir, dtype, verifier_path), or None while that module is absent."""
    try:
        module = importlib.import_module(SPECULATORS_MODULE)
    except ModuleNotFoundError as err:
        if err.name != SPECULATORS_MODULE:
            raise
        return None
    return getattr(module, "export_speculators", None)


@register_strategy
class Eagle3Strategy(DraftStrategy):
    name = "eagle3"
    headline_metrics = ("acc_0", "sim_accept_len")

    @staticmethod
    def options(cfg: Config) -> Eagle3Options:
        """draft.options checked (fc_norm: EAGLE-3.1, conf/draft/eagle3_1.yaml); an unknown key is an error."""
        return Eagle3Options.from_mapping(dict(cfg.draft.options or {}))

    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        self.options(cfg)  # both roles build the plan at start-up: a bad option stops the run before any load
        layers = eagle3_aux_layers(cfg.target.aux_layers, int(hf_config.num_hidden_layers))
        return CapturePlan(tuple(layers), int(hf_config.hidden_size), final_hidden=True)

    def build(self, ctx) -> Eagle3Bundle:
        from lib.drafts.eagle3.trainer import build_bundle
        from lib.target.shape import load_hf_config

        plan = self.capture_plan(load_hf_config(ctx.cfg.target), ctx.cfg)
        return build_bundle(ctx, list(plan.layers), self.options(ctx.cfg))

    def prepare(self, bundle: Eagle3Bundle, micro: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        # Target distributions once per micro-batch: they feed both the normaliser and the loss.
        targets = [bundle.target_head.target_probs(t["final_hidden"]) for t in micro]
        # The normaliser is the global count of valid positions per unroll step, so 1 trainer and N
        # trainers with the same global batch produce the same gradient.
        counts = sum(count_valid_positions(bundle.target_head, t, bundle.ttt_length, target=tgt)
                     for t, tgt in zip(micro, targets))
        return targets, counts

    def micro_loss(self, bundle: Eagle3Bundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss, metrics = bundle.model(batch, context, normaliser, grad_scale=grad_scale)
        return loss, metrics["sums"]

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        if sums.numel() % SUMS_PER_STEP:
            raise ValueError(f"EAGLE-3 metric sums have {sums.numel()} entries; expected {SUMS_PER_STEP} per unroll step")
        return summarize_sums(sums, sums.numel() // SUMS_PER_STEP)

    def export(self, bundle: Eagle3Bundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        """out_dir/draft (research layout, docs/draft_format.md) and, once the speculators format
        exists, out_dir/draft_speculators beside it."""
        from lib.drafts.eagle3.export import export_draft

        draft_state = {k.removeprefix("draft."): v for k, v in state.items()}
        written = [export_draft(draft_state, bundle.draft_config, os.path.join(out_dir, "draft"), dtype=dtype)]
        export_speculators = _speculators_exporter()
        if export_speculators is not None:
            out = os.path.join(out_dir, "draft_speculators")
            export_speculators(draft_state, bundle.draft_config, out, dtype, verifier_path)
            written.append(out)
        return written

    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Everything but the frozen embedding, which the evaluating side copies from its own target.
        return {k.removeprefix("draft."): v for k, v in state.items() if k != "draft.embed_tokens.weight"}

    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
        from lib.drafts.eagle3.target_head import load_target_embedding

        draft = Eagle3Draft(Eagle3DraftConfig.from_dict(config))
        draft.load_embedding(load_target_embedding(target))
        return draft.to(device=device, dtype=dtype).eval()

    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        from lib.drafts.eagle3.export import load_draft

        return load_draft(directory, device=device, dtype=dtype, embedding=target.get_input_embeddings().weight)

    def drafter(self, model: nn.Module):
        from lib.drafts.eagle3.drafter import EagleDrafter

        return EagleDrafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Ours and SpecForge/sglang-style research exports: what export.config_from_export reads. The
        speculators layout (draft_speculators/, vLLM's) is not: load_export reads the research one."""
        from lib.drafts.eagle3.export import ARCHITECTURE

        if "speculators_config" in config_json:
            return False
        architectures = config_json.get("architectures")
        return ((isinstance(architectures, list) and ARCHITECTURE in architectures)
                or "eagle_config" in config_json or "eagle_aux_hidden_state_layer_ids" in config_json)
