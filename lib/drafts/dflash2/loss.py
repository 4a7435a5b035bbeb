"""DFlash2's training objective over one micro-batch's blocks (speculators 0.9.0 dflash2 `forward` +
`compute_metrics`, with its defaults: fixed exponential position decay, KL, selector weight 1):

    loss = sum_rows w_j * (KL(p_target || q_draft) + alpha * CE_K(selector scores, target's slot)) / N

over the valid drafted rows (block position j+1 = drafted index j, w_j = exp(-j / gamma)), N the
global count of valid rows over all micro-batches and trainers (speculators divides each batch by its
own count; summed over trainers this is the same update for 1 or N trainers). p_target is the target's
distribution for that token (its final hidden state at the previous position through its lm_head),
so the engine captures the final hidden state too. The selector's K candidates are the draft's unary
top-K with the target's argmax put in the last slot when missing (a K-way label at every row); its
predecessor is the block's previous true token (teacher forcing; the anchor at j = 0).
"""
from __future__ import annotations

from typing import Mapping

import torch

from lib.drafts.dflash.mask import Blocks
from lib.drafts.dflash.trainer import block_forward
from lib.drafts.dflash2.fused import ops
from lib.drafts.dflash2.model import DFlash2Draft

CHUNK_ROWS = 2048
SUMS_PER_POSITION = 6  # KL, selector CE, selector correct (served path), unary correct, recall@K, valid rows


def _unary_chunks(hidden, head, target_hidden, top_k: int, keep_grad: bool):
    """The unary terms chunk by chunk; with keep_grad also each chunk's d KL/d hidden."""
    outs, grads = [], []
    for h, t in zip(hidden.split(CHUNK_ROWS), target_hidden.split(CHUNK_ROWS)):
        logits = h @ head.t()
        kl, d_logits, candidates, slot, contains, unary_ok = ops.unary_rows(logits, t.to(head.dtype) @ head.t(), top_k)
        outs.append((kl, logits.float().gather(-1, candidates), candidates, slot, contains, unary_ok))
        if keep_grad:
            grads.append(d_logits @ head)
    return tuple(torch.cat(parts) for parts in zip(*outs)), (torch.cat(grads) if keep_grad else None)


class _HeadUnary(torch.autograd.Function):
    """The head's unary terms for rows of final hidden states, with a frozen head (the target's).

    As DFlash's chunked cross-entropy (lib/drafts/dflash/trainer.py): each row's KL depends on its own
    hidden state, so d KL/d hidden = (q - p) @ head is formed in forward one chunk at a time and kept
    ([rows, hidden]); a chunk's full-vocabulary logits (draft's and target's) never outlive it. The
    K candidates' unary logits also flow back into the hidden state (the selector's CE reaches them):
    backward adds sum_k g_k * head[c_k] from the kept candidate ids.
    """

    @staticmethod
    def forward(ctx, hidden, head, target_hidden, top_k: int):
        (kl, unary, candidates, slot, contains, unary_ok), d_kl = _unary_chunks(hidden, head, target_hidden,
                                                                                top_k, keep_grad=True)
        ctx.save_for_backward(d_kl, head, candidates)
        ctx.mark_non_differentiable(candidates, slot, contains, unary_ok)
        return kl, unary, candidates, slot, contains, unary_ok

    @staticmethod
    def backward(ctx, grad_kl, grad_unary, *_):
        d_kl, head, candidates = ctx.saved_tensors
        d_hidden = grad_kl[:, None] * d_kl.float()
        for rows in torch.arange(d_kl.shape[0], device=d_kl.device).split(CHUNK_ROWS):
            picked = head[candidates[rows]].float()  # [rows, K, H]
            d_hidden[rows] += torch.bmm(grad_unary[rows, None, :].float(), picked)[:, 0]
        return d_hidden.to(d_kl.dtype), None, None, None


def head_unary(draft: DFlash2Draft, hidden: torch.Tensor, target_hidden: torch.Tensor):
    """(KL, candidates' unary logits [R, K] fp32, candidates [R, K], target's slot, recall, unary
    argmax hit) for rows of draft hidden states and the target's final hidden states they predict."""
    head = draft.head_weight(hidden.dtype)
    if head.requires_grad:
        raise RuntimeError("DFlash2's lm_head is the frozen target head; it must not require a gradient")
    k = draft.config.selector_top_k
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _HeadUnary.apply(hidden, head, target_hidden, k)
    return _unary_chunks(hidden, head, target_hidden, k, keep_grad=False)[0]


def block_loss(draft: DFlash2Draft, batch: Mapping[str, torch.Tensor], blocks: Blocks, decay: torch.Tensor,
               selector_alpha: float, normaliser: torch.Tensor, use_flex: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sums [1 + 6*(B-1)]): sums[0] the loss numerator, then per drafted index KL, selector CE,
    selector hits (the served path, so only where the unary top-K held the target), unary argmax hits,
    recall@K and valid rows."""
    hidden, rows, j = block_forward(draft, batch, blocks, use_flex)
    b = blocks.block_size
    # Block position j+1 of anchor a predicts x[a+j+1]: from the target's state at a+j, after token x[a+j].
    source = blocks.anchors.repeat_interleave(b)[rows] + j
    h = hidden[rows]
    kl, unary, candidates, slot, contains, unary_ok = head_unary(draft, h, batch["final_hidden"][source])
    scores = draft.candidate_selector.scores(unary, h, batch["input_ids"][source], candidates)
    ce, picked = ops.candidate_ce(scores, slot)
    weighted = decay[j] * (kl + selector_alpha * ce)
    loss = weighted.sum() / normaliser.clamp_min(1e-6)
    with torch.no_grad():
        sums = torch.zeros(SUMS_PER_POSITION, b - 1, device=hidden.device)
        for i, value in enumerate((kl, ce, picked & contains, unary_ok, contains, torch.ones_like(contains))):
            sums[i].index_add_(0, j, value.detach().float())
    return loss, torch.cat([weighted.detach().sum()[None].float(), sums.flatten()])


def summarize_sums(sums: torch.Tensor) -> dict[str, float]:
    """The metrics row: loss, mean KL and selector CE, per drafted index the served path's accuracy
    (acc_j, given the earlier tokens right) and the head's own (unary_acc_j), recall of the target in
    the unary top-K, and the expected accepted length from the acc_j (sum of running products)."""
    n = (sums.numel() - 1) // SUMS_PER_POSITION
    kl, ce, picked, unary_ok, recall, count = sums[1:].view(SUMS_PER_POSITION, n)
    total = count.sum().clamp_min(1)
    row: dict[str, float] = {"loss": float(sums[0] / total), "kl": float(kl.sum() / total),
                             "selector_ce": float(ce.sum() / total), "recall_at_k": float(recall.sum() / total)}
    denom = count.clamp_min(1)
    run, expected = 1.0, 0.0
    for j in range(n):
        row[f"acc_{j}"] = float(picked[j] / denom[j])
        row[f"unary_acc_{j}"] = float(unary_ok[j] / denom[j])
        run *= row[f"acc_{j}"]
        expected += run
    row["sim_accept_len"] = expected
    return row
