"""DSpark as a DraftStrategy (draft=dspark): capture DFlash's spread of target layers plus the target's
final hidden state (the loss is a KL against the target's distribution), train on random anchor
blocks in DFlash's layout, export in speculators' layout, and draft a block per forward with the
Markov chain and the confidence schedule in evaluation.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from lib.config import Config, ConfigError
from lib.drafts.base import register_strategy
from lib.drafts.dflash.strategy import BlockDraftStrategy, check_draft_tokens, draft_state
from lib.drafts.dspark.blocks import build_dspark_blocks
from lib.drafts.dspark.trainer import DSparkBundle, DSparkOptions


@register_strategy
class DSparkStrategy(BlockDraftStrategy):
    name = "dspark"
    headline_metrics = ("acc_0", "sim_accept_len", "conf_abs_err")
    final_hidden = True  # the loss is a KL against the target's distribution

    @staticmethod
    def options(cfg: Config) -> DSparkOptions:
        try:
            options = DSparkOptions.from_mapping(dict(cfg.draft.options or {}))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_draft_tokens(cfg, options.block_size, options.block_size, block="a DSpark block")
        return options

    # DFlash's candidates (the token after the anchor is in its sequence and trained) are exactly the
    # anchors whose slot 0 carries a loss; the normaliser is the valid rows' count (the default).
    build_blocks = staticmethod(build_dspark_blocks)

    def max_anchors(self, options: DSparkOptions, tokens: int) -> int:
        return options.anchors_for(tokens)

    def build_bundle(self, ctx, options: DSparkOptions, layers: list[int]) -> DSparkBundle:
        from lib.drafts.dspark.trainer import build_bundle

        return build_bundle(ctx, options, layers)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        from lib.drafts.dspark.loss import summarize_sums

        return summarize_sums(sums.float().cpu())

    def export(self, bundle: DSparkBundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        import os

        from lib.drafts.dspark.export import export_draft

        return [export_draft(draft_state(state), bundle.draft_config, os.path.join(out_dir, "draft"), dtype,
                             verifier_path)]

    def draft_model(self, config: dict[str, Any]) -> nn.Module:
        from lib.drafts.dspark.model import DSparkConfig, DSparkDraft

        return DSparkDraft(DSparkConfig.from_dict(config))

    def load_draft(self, directory: str) -> nn.Module:
        from lib.drafts.dspark.export import load_draft

        return load_draft(directory)

    def drafter(self, model: nn.Module):
        from lib.drafts.dspark.drafter import DSparkDrafter

        return DSparkDrafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Ours and speculators' DSpark exports (load_export refuses the variants this draft lacks, by key)."""
        from lib.drafts.dspark.export import MODEL_TYPE

        return config_json.get("speculators_model_type") == MODEL_TYPE
