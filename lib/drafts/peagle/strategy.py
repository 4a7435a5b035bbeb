"""P-EAGLE as a DraftStrategy (draft=peagle): EAGLE-3's capture (its aux layers plus the final hidden
state), trained on COD-sampled chains of mask slots so that one forward drafts k tokens, exported in the
speculators format vLLM serves, drafted in one forward per round in evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config
from lib.drafts.base import CapturePlan, DraftStrategy, register_strategy
from lib.drafts.eagle3.loss import sim_accept_len, valid_positions
from lib.drafts.eagle3.strategy import eagle3_aux_layers
from lib.drafts.peagle.sampling import batch_generator, cod_sample
from lib.drafts.peagle.trainer import SUMS_PER_DEPTH, BatchContext, PEagleBundle, PEagleOptions


def summarize_sums(sums: torch.Tensor) -> dict[str, float]:
    """sums = [CE_d..., correct_d..., count_d...] over all trainers. loss: the optimised mean over every
    slot with a loss; ploss_d / acc_d: per depth d (the d+1-th proposed token)."""
    if sums.numel() % SUMS_PER_DEPTH:
        raise ValueError(f"P-EAGLE metric sums have {sums.numel()} entries; expected {SUMS_PER_DEPTH} per depth")
    n = sums.numel() // SUMS_PER_DEPTH
    ce, correct, count = sums[:n], sums[n:2 * n], sums[2 * n:]
    row: dict[str, float] = {"loss": float(ce.sum() / count.sum().clamp_min(1))}
    for d in range(n):
        row[f"ploss_{d}"] = float(ce[d] / count[d].clamp_min(1))
        row[f"acc_{d}"] = float(correct[d] / count[d].clamp_min(1))
    row["sim_accept_len"] = sim_accept_len([row[f"acc_{d}"] for d in range(n)])
    return row


@register_strategy
class PEagleStrategy(DraftStrategy):
    name = "peagle"
    headline_metrics = ("acc_0", "sim_accept_len")

    @staticmethod
    def options(cfg: Config) -> PEagleOptions:
        return PEagleOptions.from_mapping(dict(cfg.draft.options or {}))

    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        self.options(cfg)  # both roles build the plan at start-up: a bad option stops the run before any load
        if cfg.train.recompute:
            raise ValueError("train.recompute=true is not implemented for draft=peagle: its one forward keeps "
                             "each layer's activations once; lower engine.token_budget instead")
        layers = eagle3_aux_layers(cfg.target.aux_layers, int(hf_config.num_hidden_layers))
        return CapturePlan(tuple(layers), int(hf_config.hidden_size), final_hidden=True)

    def build(self, ctx) -> PEagleBundle:
        from lib.drafts.peagle.trainer import build_bundle
        from lib.target.shape import load_hf_config

        plan = self.capture_plan(load_hf_config(ctx.cfg.target), ctx.cfg)
        return build_bundle(ctx, list(plan.layers), self.options(ctx.cfg))

    def prepare(self, bundle: PEagleBundle, micro: Sequence[Mapping[str, torch.Tensor]]
                ) -> tuple[list[BatchContext], torch.Tensor]:
        opts, contexts, count = bundle.options, [], None
        for batch in micro:
            target = bundle.target_head.target_probs(batch["final_hidden"])
            valid = valid_positions(batch["loss_mask"], batch["cu_seqlens"],
                                    target.in_draft_vocab.to(batch["loss_mask"].device), opts.num_depths)
            slots = cod_sample(valid, opts.down_sample_ratio, opts.down_sample_ratio_min, opts.max_anchors,
                               batch_generator(bundle.seed, batch["input_ids"]))
            slot_valid = valid[slots.depth, slots.anchor]
            contexts.append(BatchContext(slots, slot_valid, target))
            n = slot_valid.sum()
            count = n if count is None else count + n
        return contexts, count

    def micro_loss(self, bundle: PEagleBundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return bundle.model(batch, context, normaliser, grad_scale=grad_scale)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        return summarize_sums(sums.float().cpu())

    def export(self, bundle: PEagleBundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        """out_dir/draft in the speculators format (the one vLLM serves P-EAGLE from)."""
        from lib.drafts.peagle.export import export_draft

        draft_state = {k.removeprefix("draft."): v for k, v in state.items()}
        return [export_draft(draft_state, bundle.draft_config, os.path.join(out_dir, "draft"), dtype, verifier_path,
                             embed_trained=bundle.options.train_embedding)]

    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Everything: the embedding trains (the mask token's row with it) and lm_head is the draft's own.
        return {k.removeprefix("draft."): v for k, v in state.items()}

    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        from lib.drafts.peagle.model import PEagleDraft, PEagleDraftConfig

        return PEagleDraft(PEagleDraftConfig.from_dict(config)).to(device=device, dtype=dtype).eval()

    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        from lib.drafts.peagle.export import load_draft

        return load_draft(directory, device=device, dtype=dtype).eval()

    def drafter(self, model: nn.Module):
        from lib.drafts.peagle.drafter import PEagleDrafter

        return PEagleDrafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """speculators' P-EAGLE layout (ours, or speculators' own exports): its model type says so."""
        from lib.drafts.peagle.export import MODEL_TYPE

        return config_json.get("speculators_model_type") == MODEL_TYPE
