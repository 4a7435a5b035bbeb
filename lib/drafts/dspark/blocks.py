"""DSpark training blocks over one packed batch, on DFlash's block layout and attention mask.

Block n = [x[a_n], mask, ..., mask] at positions pos[a_n] .. pos[a_n]+B-1, and it attends exactly as
a DFlash block does (lib/drafts/dflash/mask.py: its own sequence's context strictly before a_n, its
whole own block), so the DFlash `Blocks`, dense mask and flex BlockMask serve unchanged. What differs
is what a slot learns: every slot predicts ("sample from anchor"), slot k the token x[a_n+k+1], from
the target's distribution at packed row a_n+k, with the data token x[a_n+k] as the Markov head's
previous token. Slot k carries a loss iff a_n+k+1 is in a_n's sequence and its loss_mask is set (the
token it predicts is trained, as everywhere in this project).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.drafts.dflash.mask import IGNORE, Blocks, document_ids


@dataclass
class DSparkBlocks:
    blocks: Blocks  # ids, positions, doc, anchors for the mask; labels[k] = x[a+k+1], IGNORE without loss
    target_rows: torch.Tensor  # [N*B] packed row whose target distribution slot k learns: a+k (clamped)
    prev_ids: torch.Tensor  # [N*B] the token before slot k's prediction: x[a+k] (clamped)

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    def valid(self) -> torch.Tensor:
        return self.blocks.valid()


def build_dspark_blocks(input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor,
                        cu_seqlens: torch.Tensor, anchors: torch.Tensor, block_size: int,
                        mask_token_id: int) -> DSparkBlocks:
    tokens, device = input_ids.shape[0], input_ids.device
    doc = document_ids(cu_seqlens.to(device), tokens)
    anchors = anchors.to(device=device, dtype=torch.long)
    offsets = torch.arange(block_size, device=device)
    here = anchors[:, None] + offsets[None]  # [N, B] packed row of slot k: a+k
    nxt = here + 1  # the token slot k predicts
    nxt_c = nxt.clamp(max=tokens - 1)
    has_loss = (nxt < tokens) & (doc[nxt_c] == doc[anchors][:, None]) & loss_mask.bool()[nxt_c]
    labels = torch.where(has_loss, input_ids[nxt_c], torch.full_like(nxt_c, IGNORE))
    ids = torch.full_like(here, mask_token_id)
    ids[:, 0] = input_ids[anchors]
    positions = position_ids[anchors][:, None] + offsets[None]
    here_c = here.clamp(max=tokens - 1)
    blocks = Blocks(anchors, ids.flatten(), positions.flatten(), labels.flatten(), doc, block_size)
    return DSparkBlocks(blocks, here_c.flatten(), input_ids[here_c].flatten())
