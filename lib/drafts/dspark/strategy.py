"""DSpark as a DraftStrategy (draft=dspark): capture DFlash's spread of target layers plus the target's
final hidden state (the loss is a KL against the target's distribution), train on random anchor
blocks in DFlash's layout, export in speculators' layout, and draft a block per forward with the
Markov chain and the confidence schedule in evaluation.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config, ConfigError
from lib.drafts.base import CapturePlan, DraftStrategy, register_strategy
from lib.drafts.dflash.mask import sample_anchors
from lib.drafts.dflash.strategy import batch_generator, dflash_target_layers
from lib.drafts.dspark.blocks import build_dspark_blocks
from lib.drafts.dspark.trainer import DSparkBundle, DSparkOptions


@register_strategy
class DSparkStrategy(DraftStrategy):
    name = "dspark"
    headline_metrics = ("acc_0", "sim_accept_len", "conf_abs_err")

    @staticmethod
    def options(cfg: Config) -> DSparkOptions:
        try:
            options = DSparkOptions.from_mapping(dict(cfg.draft.options or {}))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        too_long = [k for k in cfg.eval.draft_tokens if int(k) > options.block_size]
        if too_long:
            raise ConfigError(f"eval.draft_tokens={list(cfg.eval.draft_tokens)}: a DSpark block of "
                              f"draft.options.block_size={options.block_size} proposes at most {options.block_size} "
                              f"tokens; use values <= {options.block_size}")
        return options

    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        layers = dflash_target_layers(cfg, self.options(cfg), int(hf_config.num_hidden_layers))
        return CapturePlan(tuple(layers), int(hf_config.hidden_size), final_hidden=True)

    def build(self, ctx) -> DSparkBundle:
        from lib.drafts.dspark.trainer import build_bundle
        from lib.target.shape import load_hf_config

        options = self.options(ctx.cfg)
        plan = self.capture_plan(load_hf_config(ctx.cfg.target), ctx.cfg)
        return build_bundle(ctx, options, list(plan.layers))

    def prepare(self, bundle: DSparkBundle, micro: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        c, opts = bundle.draft_config, bundle.options
        blocks, count = [], None
        for batch in micro:
            tokens = batch["input_ids"].shape[0]
            # DFlash's candidates (the token after the anchor is in its sequence and trained) are exactly
            # the anchors whose slot 0 carries a loss.
            anchors = sample_anchors(batch["loss_mask"], batch["cu_seqlens"], c.block_size, opts.anchors_for(tokens),
                                     batch_generator(bundle.seed, batch["input_ids"]))
            b = build_dspark_blocks(batch["input_ids"], batch["loss_mask"], batch["position_ids"],
                                    batch["cu_seqlens"], anchors, c.block_size, c.mask_token_id)
            valid = b.valid().float().sum()
            count = valid if count is None else count + valid
            blocks.append(b)
        return blocks, count

    def micro_loss(self, bundle: DSparkBundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return bundle.model(batch, context, normaliser, grad_scale=grad_scale)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        from lib.drafts.dspark.loss import summarize_sums

        return summarize_sums(sums.float().cpu())

    def export(self, bundle: DSparkBundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        import os

        from lib.drafts.dspark.export import export_draft

        draft_state = {k.removeprefix("draft."): v for k, v in state.items()}
        return [export_draft(draft_state, bundle.draft_config, os.path.join(out_dir, "draft"), dtype, verifier_path)]

    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The frozen embedding and lm_head are buffers outside the state: the evaluating side has its own.
        return {k.removeprefix("draft."): v for k, v in state.items()}

    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        from lib.drafts.dspark.model import DSparkConfig, DSparkDraft
        from lib.target.weights import load_target_embedding

        draft = DSparkDraft(DSparkConfig.from_dict(config)).to(device=device, dtype=dtype).eval()
        # The lm_head is bound by the drafter's check_target from the evaluating runner.
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype), None)
        return draft

    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        from lib.drafts.dspark.export import load_draft
        from lib.target.weights import load_target_embedding, load_target_lm_head

        draft = load_draft(directory).to(device=device, dtype=dtype).eval()
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype),
                                 load_target_lm_head(target).to(device=device, dtype=dtype))
        return draft

    def drafter(self, model: nn.Module):
        from lib.drafts.dspark.drafter import DSparkDrafter

        return DSparkDrafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Ours and speculators' DSpark exports (load_export refuses the variants this draft lacks, by key)."""
        from lib.drafts.dspark.export import MODEL_TYPE

        return config_json.get("speculators_model_type") == MODEL_TYPE
