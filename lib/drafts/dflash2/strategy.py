"""DFlash2 as a DraftStrategy (draft=dflash2): DFlash's block draft (its capture layers, anchors, masks,
flex attention and layers) with dynamic convolutions and a pairwise top-K selector, trained against
the target's distribution (so the engine also captures the final hidden state), exported in the
speculators format and the research layout, drafted by the selector's greedy path in evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config, ConfigError
from lib.drafts.base import CapturePlan, DraftStrategy, register_strategy
from lib.drafts.dflash.mask import build_blocks, sample_anchors
from lib.drafts.dflash.strategy import batch_generator, dflash_target_layers
from lib.drafts.dflash2.loss import SUMS_PER_POSITION, summarize_sums
from lib.drafts.dflash2.trainer import DFlash2Bundle, DFlash2Options


@register_strategy
class DFlash2Strategy(DraftStrategy):
    name = "dflash2"
    headline_metrics = ("acc_0", "acc_3", "recall_at_k", "sim_accept_len")

    @staticmethod
    def options(cfg: Config) -> DFlash2Options:
        options = DFlash2Options.from_mapping(dict(cfg.draft.options or {}))
        too_long = [k for k in cfg.eval.draft_tokens if int(k) > options.block_size - 1]
        if too_long:
            raise ConfigError(f"eval.draft_tokens={list(cfg.eval.draft_tokens)}: a block of "
                              f"draft.options.block_size={options.block_size} proposes at most "
                              f"{options.block_size - 1} tokens; use values <= {options.block_size - 1}")
        return options

    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        # DFlash's layers (one per draft layer over [1, L-3], or target.aux_layers), and the final
        # hidden state: the loss is against the target's own distribution, and the selector's label
        # is its argmax.
        layers = dflash_target_layers(cfg, self.options(cfg), int(hf_config.num_hidden_layers))
        return CapturePlan(tuple(layers), int(hf_config.hidden_size), final_hidden=True)

    def build(self, ctx) -> DFlash2Bundle:
        from lib.drafts.dflash2.trainer import build_bundle
        from lib.target.shape import load_hf_config

        options = self.options(ctx.cfg)
        plan = self.capture_plan(load_hf_config(ctx.cfg.target), ctx.cfg)
        return build_bundle(ctx, options, list(plan.layers))

    def prepare(self, bundle: DFlash2Bundle, micro: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        """DFlash's blocks (anchors from the run seed and each batch's tokens, so a resume or another
        number of trainers draws the same ones); the normaliser is the valid rows' count."""
        c, opts = bundle.draft_config, bundle.options
        blocks, norm = [], None
        for batch in micro:
            anchors = sample_anchors(batch["loss_mask"], batch["cu_seqlens"], c.block_size, opts.max_anchors,
                                     batch_generator(bundle.seed, batch["input_ids"]))
            b = build_blocks(batch["input_ids"], batch["loss_mask"], batch["position_ids"], batch["cu_seqlens"],
                             anchors, c.block_size, c.mask_token_id)
            count = b.valid().float().sum()
            norm = count if norm is None else norm + count
            blocks.append(b)
        return blocks, norm

    def micro_loss(self, bundle: DFlash2Bundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return bundle.model(batch, context, normaliser, grad_scale=grad_scale)

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

        draft_state = {k.removeprefix("draft."): v for k, v in state.items()}
        c = bundle.draft_config
        return [export_draft(draft_state, c, os.path.join(out_dir, "draft"), dtype, verifier_path),
                export_speculators(draft_state, c, os.path.join(out_dir, "draft_speculators"), dtype, verifier_path)]

    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The frozen embedding and lm_head are buffers outside the state: the evaluating side has its own.
        return {k.removeprefix("draft."): v for k, v in state.items()}

    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft
        from lib.target.weights import load_target_embedding

        draft = DFlash2Draft(DFlash2Config.from_dict(config)).to(device=device, dtype=dtype).eval()
        # The lm_head is bound by the drafter's check_target from the evaluating runner.
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype), None)
        return draft

    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        from lib.drafts.dflash2.export import load_draft
        from lib.target.weights import load_target_embedding, load_target_lm_head

        draft = load_draft(directory).to(device=device, dtype=dtype).eval()
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype),
                                 load_target_lm_head(target).to(device=device, dtype=dtype))
        return draft

    def drafter(self, model: nn.Module):
        from lib.drafts.dflash2.drafter import DFlash2Drafter

        return DFlash2Drafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Either layout this family writes (export.config_from_export reads both)."""
        from lib.drafts.dflash2.export import is_research, is_speculators

        return is_research(config_json) or is_speculators(config_json)
