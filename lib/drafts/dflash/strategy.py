"""DFlash as a DraftStrategy (draft=dflash): capture one target layer per draft layer (no final hidden
state: the labels are the data's own next tokens), train on random anchor blocks, export in the layout
DFlash loaders read, and draft a whole block per forward in evaluation.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config, ConfigError
from lib.drafts.base import CapturePlan, DraftBundle, DraftStrategy, register_strategy
from lib.drafts.dflash.mask import build_blocks, sample_anchors
from lib.drafts.dflash.trainer import SUMS_PER_POSITION, DFlashBundle, DFlashOptions, default_target_layers

log = logging.getLogger("specdraft.trainer")


def dflash_target_layers(cfg: Config, options: DFlashOptions, num_layers: int) -> list[int]:
    """target.aux_layers, or the recipe's spread of num_layers layers."""
    if cfg.target.aux_layers is None:
        return default_target_layers(num_layers, options.num_layers)
    layers = [int(i) for i in cfg.target.aux_layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise ValueError(f"target.aux_layers={list(cfg.target.aux_layers)} must be decoder layer indices in "
                         f"[0, {num_layers - 1}]; fix or remove it")
    return layers


def batch_generator(seed: int, input_ids: torch.Tensor) -> torch.Generator:
    """Anchors drawn from the run seed and the batch's own tokens: the same batch gets the same anchors
    after a resume or on another number of trainers, and different batches get different ones."""
    weights = torch.arange(1, input_ids.numel() + 1, device=input_ids.device, dtype=torch.int64)
    digest = int((input_ids.to(torch.int64) * weights).remainder(2_147_483_647).sum()) % 2_147_483_647
    return torch.Generator().manual_seed(seed * 1_000_003 + digest)


def summarize_sums(sums: torch.Tensor) -> dict[str, float]:
    """sums = [CE_j..., correct_j..., count_j..., weighted CE_j..., normaliser_j...] (block_loss);
    acc_j = accuracy of drafted index j (block position j+1). The loss is the one trained, under
    either weighting: its numerator over its denominator."""
    n = sums.numel() // SUMS_PER_POSITION
    correct, count, weighted, normaliser = sums[n:2 * n], sums[2 * n:3 * n], sums[3 * n:4 * n], sums[4 * n:]
    denom = count.clamp_min(1)
    row: dict[str, float] = {"loss": float(weighted.sum() / normaliser.sum().clamp_min(1e-6))}
    for j in range(n):
        row[f"acc_{j}"] = float(correct[j] / denom[j])
    # Expected accepted drafts per block if position j is accepted with probability acc_j given the
    # earlier ones were (sum of running products; EAGLE-3's definition, without the bonus token).
    run, expected = 1.0, 0.0
    for j in range(n):
        run *= row[f"acc_{j}"]
        expected += run
    row["sim_accept_len"] = expected
    return row


def draft_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's state (keys under the loss module's `draft.`) as the draft's own keys."""
    return {k.removeprefix("draft."): v for k, v in state.items()}


def check_draft_tokens(cfg: Config, block_size: int, most: int, block: str = "a block") -> None:
    """eval.draft_tokens fits a block: at most `most` drafted tokens per forward."""
    too_long = [k for k in cfg.eval.draft_tokens if int(k) > most]
    if too_long:
        raise ConfigError(f"eval.draft_tokens={list(cfg.eval.draft_tokens)}: {block} of "
                          f"draft.options.block_size={block_size} proposes at most "
                          f"{most} tokens; use values <= {most}")


class BlockDraftStrategy(DraftStrategy):
    """What the block-draft families (DFlash and those built on its backbone: dspark, dflash2) do alike:
    capture DFlash's target layers, sample anchor blocks per batch from the run seed, train the loss
    module's forward, and bind the frozen target embedding and lm_head to a loaded draft. A family
    gives its options, blocks, normaliser weight, bundle, model and export; it is not registered itself.
    """

    final_hidden: bool  # whether the engine also captures the target's final hidden state (KL losses)

    @staticmethod
    def build_blocks(input_ids, loss_mask, position_ids, cu_seqlens, anchors, block_size, mask_token_id):
        """This family's blocks for one batch (DFlash's layout)."""
        return build_blocks(input_ids, loss_mask, position_ids, cu_seqlens, anchors, block_size, mask_token_id)

    def max_anchors(self, options: Any, tokens: int) -> Optional[int]:
        """Anchors to sample in a batch of `tokens` tokens (None: every candidate)."""
        return options.max_anchors

    def normaliser_weight(self, options: Any, blocks: Any) -> torch.Tensor:
        """What one batch's blocks add to the loss's global denominator: by default its valid rows' count."""
        return blocks.valid().float().sum()

    def build_bundle(self, ctx, options: Any, layers: list[int]) -> DraftBundle:
        raise NotImplementedError(f"{type(self).__name__} does not build a bundle")

    def draft_model(self, config: dict[str, Any]) -> nn.Module:
        """The family's draft module from its config dict (the target weights are bound by the caller)."""
        raise NotImplementedError(f"{type(self).__name__} does not build a draft model")

    def load_draft(self, directory: str) -> nn.Module:
        """The family's draft from an export directory, without the target's embedding and lm_head."""
        raise NotImplementedError(f"{type(self).__name__} does not load an export")

    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        layers = dflash_target_layers(cfg, self.options(cfg), int(hf_config.num_hidden_layers))
        return CapturePlan(tuple(layers), int(hf_config.hidden_size), final_hidden=self.final_hidden)

    def build(self, ctx) -> DraftBundle:
        from lib.target.shape import load_hf_config

        options = self.options(ctx.cfg)
        plan = self.capture_plan(load_hf_config(ctx.cfg.target), ctx.cfg)
        return self.build_bundle(ctx, options, list(plan.layers))

    def prepare(self, bundle, micro: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list, torch.Tensor]:
        """Anchors from the run seed and each batch's tokens (so a resume or another number of trainers
        draws the same ones), the family's blocks, and the summed normaliser weights."""
        c, opts = bundle.draft_config, bundle.options
        blocks, norm = [], None
        for batch in micro:
            anchors = sample_anchors(batch["loss_mask"], batch["cu_seqlens"], c.block_size,
                                     self.max_anchors(opts, batch["input_ids"].shape[0]),
                                     batch_generator(bundle.seed, batch["input_ids"]))
            b = self.build_blocks(batch["input_ids"], batch["loss_mask"], batch["position_ids"], batch["cu_seqlens"],
                                  anchors, c.block_size, c.mask_token_id)
            weight = self.normaliser_weight(opts, b)
            norm = weight if norm is None else norm + weight
            blocks.append(b)
        return blocks, norm

    def micro_loss(self, bundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return bundle.model(batch, context, normaliser, grad_scale=grad_scale)

    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The frozen embedding and lm_head are buffers outside the state: the evaluating side has its own.
        return draft_state(state)

    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        from lib.target.weights import load_target_embedding

        draft = self.draft_model(config).to(device=device, dtype=dtype).eval()
        # The lm_head is bound by the drafter's check_target from the evaluating runner.
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype), None)
        return draft

    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        from lib.target.weights import load_target_embedding, load_target_lm_head

        draft = self.load_draft(directory).to(device=device, dtype=dtype).eval()
        draft.set_target_weights(load_target_embedding(target).to(device=device, dtype=dtype),
                                 load_target_lm_head(target).to(device=device, dtype=dtype))
        return draft


@register_strategy
class DFlashStrategy(BlockDraftStrategy):
    name = "dflash"
    headline_metrics = ("acc_0", "acc_3", "sim_accept_len")
    final_hidden = False  # the labels are the data's own next tokens

    @staticmethod
    def options(cfg: Config) -> DFlashOptions:
        options = DFlashOptions.from_mapping(dict(cfg.draft.options or {}))
        check_draft_tokens(cfg, options.block_size, options.block_size - 1)
        return options

    def normaliser_weight(self, options: DFlashOptions, blocks) -> torch.Tensor:
        # Each valid row adds its drafted index's position weight (the decay weighting's denominator).
        valid = blocks.valid().view(-1, blocks.block_size)[:, 1:].float().sum(0)
        return (valid * options.position_weights(valid.device)).sum()

    def build_bundle(self, ctx, options: DFlashOptions, layers: list[int]) -> DFlashBundle:
        from lib.drafts.dflash.trainer import build_bundle

        return build_bundle(ctx, options, layers)

    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        if sums.numel() % SUMS_PER_POSITION:
            raise ValueError(f"DFlash metric sums have {sums.numel()} entries; expected {SUMS_PER_POSITION} per "
                             f"drafted position")
        return summarize_sums(sums.float().cpu())

    def export(self, bundle: DFlashBundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        import os

        from lib.drafts.dflash.export import export_draft

        return [export_draft(draft_state(state), bundle.draft_config, os.path.join(out_dir, "draft"), dtype,
                             verifier_path)]

    def draft_model(self, config: dict[str, Any]) -> nn.Module:
        from lib.drafts.dflash.model import DFlashConfig, DFlashDraft

        return DFlashDraft(DFlashConfig.from_dict(config))

    def load_draft(self, directory: str) -> nn.Module:
        from lib.drafts.dflash.export import load_draft

        return load_draft(directory)

    def drafter(self, model: nn.Module):
        from lib.drafts.dflash.drafter import DFlashDrafter

        return DFlashDrafter(model.eval())

    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Ours and the DFlash authors' layout: the check export.config_from_export makes."""
        from lib.drafts.dflash.export import ARCHITECTURE

        architectures = config_json.get("architectures")
        return isinstance(architectures, list) and ARCHITECTURE in architectures and "dflash_config" in config_json
