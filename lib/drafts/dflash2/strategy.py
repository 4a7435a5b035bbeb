"""DFlash2 as a DraftStrategy (draft=dflash2): DFlash's block draft (its capture layers, anchors, masks,
flex attention and layers) with dynamic convolutions and a pairwise top-K selector, trained against
the target's distribution (so the engine also captures the final hidden state), exported in the
speculators format and the research layout, drafted by the selector's greedy path in evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lib.config import Config
from lib.drafts.base import register_strategy
from lib.drafts.dflash.strategy import BlockDraftStrategy, check_draft_tokens, draft_state
from lib.drafts.dflash2.loss import SUMS_PER_POSITION, summarize_sums
from lib.drafts.dflash2.trainer import DFlash2Bundle, DFlash2Options


@register_strategy
class DFlash2Strategy(BlockDraftStrategy):
    """DFlash's layers (one per draft layer over [1, L-3], or target.aux_layers) and blocks; the
    normaliser is the valid rows' count (the default)."""

    name = "dflash2"
    headline_metrics = ("acc_0", "acc_3", "recall_at_k", "sim_accept_len")
    # The loss is against the target's own distribution, and the selector's label is its argmax.
    final_hidden = True

    @staticmethod
    def options(cfg: Config) -> DFlash2Options:
        options = DFlash2Options.from_mapping(dict(cfg.draft.options or {}))
        check_draft_tokens(cfg, options.block_size, options.block_size - 1)
        return options

    def build_bundle(self, ctx, options: DFlash2Options, layers: list[int]) -> DFlash2Bundle:
        from lib.drafts.dflash2.trainer import build_bundle

        return build_bundle(ctx, options, layers)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        if (sums.numel() - 1) % SUMS_PER_POSITION:
            raise ValueError(f"DFlash2 metric sums have {sums.numel()} entries; expected 1 + {SUMS_PER_POSITION} "
                             f"per drafted position")
        return summarize_sums(sums.float().cpu())

    def export(self, bundle: DFlash2Bundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        """out_dir/draft (research layout: eval.py, TokenSpeed, vLLM's DFlash2 model) and
        out_dir/draft_speculators (speculators' DFlash2DraftModel)."""
        from lib.drafts.dflash2.export import export_draft, export_speculators

        weights = draft_state(state)
        c = bundle.draft_config
        return [export_draft(weights, c, os.path.join(out_dir, "draft"), dtype, verifier_path),
                export_speculators(weights, c, os.path.join(out_dir, "draft_speculators"), dtype, verifier_path)]

    def draft_model(self, config: dict[str, Any]) -> nn.Module:
        from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft

        return DFlash2Draft(DFlash2Config.from_dict(config))

    def load_draft(self, directory: str) -> nn.Module:
        from lib.drafts.dflash2.export import load_draft

        return load_draft(directory)

    def drafter(self, model: nn.Module):
        from lib.drafts.dflash2.drafter import DFlash2Drafter

        return DFlash2Drafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Either layout this family writes (export.config_from_export reads both)."""
        from lib.drafts.dflash2.export import is_research, is_speculators

        return is_research(config_json) or is_speculators(config_json)
