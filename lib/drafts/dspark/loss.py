"""DSpark's training loss (speculators 0.9.0's DSpark recipe) and its metric sums.

Per valid slot r (block slot k, lib/drafts/dspark/blocks.py), with q_r = softmax(draft logits) (the
Markov-biased ones, teacher-forced) and p_r = softmax(target logits at the slot's row):

    loss = ( sum_r w_k KL(p_r || q_r)  +  alpha * sum_r w_k BCE(c_r, 1 - TV(p_r, q_r)) ) / count

w_k = exp(-k / gamma) (every slot predicts, so slot 0 weighs 1), c_r the confidence logit, and the
BCE target 1 - TV = sum_v min(p_v, q_v), the chance that a sampled draft token survives rejection
sampling, taken without gradient. count is the number of valid slots over all micro-batches and
trainers (speculators divides each batch by its own count; the global count makes 1 and N trainers
give the same update).

Full-vocabulary logits never exist for more than CHUNK_ROWS rows: `_MarkovKL` forms the KL's
gradients (into the backbone hidden state, the Markov features and W2) in forward, chunk by chunk,
because each row's loss weight w_k / count is known there. Backward only scales them.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from lib.drafts.base import AUX_HIDDEN, FINAL_HIDDEN
from lib.drafts.dflash.mask import dense_attention, flex_attention_fn
from lib.drafts.dspark.blocks import DSparkBlocks
from lib.drafts.dspark.model import DSparkDraft
from lib.drafts.op_table import OpTable

CHUNK_ROWS = 1024
PER_POSITION = ("kl", "bce", "overlap", "correct", "count", "conf", "conf_err")
GLOBALS = ("blocks", "tv_len", "greedy_len", "kl_weighted", "conf_weighted")


def kl_rows(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(p||q), sum_v min(p_v, q_v), argmax agreement, q - p) per row, fp32; z draft, t target logits."""
    logq = torch.log_softmax(z.float(), -1)
    logp = torch.log_softmax(t.float(), -1)
    q, p = logq.exp(), logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    return kl, torch.minimum(p, q).sum(-1), (z.argmax(-1) == t.argmax(-1)).float(), q - p


def kl_rows_with_grad(z: torch.Tensor, t: torch.Tensor, weight: torch.Tensor):
    """kl_rows plus weight_r * d KL_r / d z_r = weight_r (q_r - p_r), in z's dtype."""
    kl, overlap, correct, diff = kl_rows(z, t)
    return kl, overlap, correct, (diff * weight[:, None]).to(z.dtype)


def kl_rows_value(z: torch.Tensor, t: torch.Tensor):
    return kl_rows(z, t)[:3]


ops = OpTable(kl_rows_with_grad=kl_rows_with_grad, kl_rows_value=kl_rows_value)
use_compiled, compiled = ops.use_compiled, ops.compiled


def _cat(parts: list, empty_like: torch.Tensor) -> torch.Tensor:
    """torch.cat, or an empty tensor shaped like empty_like when a micro-batch has no valid slot."""
    return torch.cat(parts) if parts else torch.zeros_like(empty_like)


class _MarkovKL(torch.autograd.Function):
    """sum_r weight_r KL(p_r || q_r) with q_r = softmax(h_r head^T + f_r W2^T), p_r = softmax(t_r head^T).

    head (the target's lm_head) and t (the target's final hidden states) are frozen; h, f and W2
    get gradients. Outputs: the weighted sum, then per row KL, overlap and argmax agreement (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, features, head, w2, target_hidden, weight):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kls, overlaps, corrects, d_hidden, d_feat = [], [], [], [], []
        d_w2 = None if w2 is None else torch.zeros(w2.shape, dtype=torch.float32, device=w2.device)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            z = hidden[rows] @ head.t()
            if w2 is not None:
                z = z + features[rows] @ w2.t()
            t = target_hidden[rows].to(head.dtype) @ head.t()
            # The weights copied out of their view: the compiled op guards on whether an input is a view.
            kl, overlap, correct, g = ops.kl_rows_with_grad(z, t, weight[rows].clone())
            loss = loss + (kl * weight[rows]).sum()
            kls.append(kl)
            overlaps.append(overlap)
            corrects.append(correct)
            d_hidden.append(g @ head)
            if w2 is not None:
                d_feat.append(g @ w2)
                d_w2 += (g.t() @ features[rows]).float()
        ctx.has_w2 = w2 is not None
        saved = [_cat(d_hidden, hidden)]
        if w2 is not None:
            saved += [_cat(d_feat, features), d_w2.to(w2.dtype)]
        ctx.save_for_backward(*saved)
        kl, overlap, correct = (_cat(part, loss.new_zeros(0)) for part in (kls, overlaps, corrects))
        ctx.mark_non_differentiable(kl, overlap, correct)
        return loss, kl, overlap, correct

    @staticmethod
    def backward(ctx, grad_loss, _kl, _overlap, _correct):
        if ctx.has_w2:
            d_hidden, d_feat, d_w2 = ctx.saved_tensors
            return grad_loss * d_hidden, grad_loss * d_feat, None, grad_loss * d_w2, None, None
        (d_hidden,) = ctx.saved_tensors
        return grad_loss * d_hidden, None, None, None, None, None


def markov_kl(draft: DSparkDraft, hidden: torch.Tensor, features: Optional[torch.Tensor],
              target_hidden: torch.Tensor, weight: torch.Tensor):
    """(sum_r weight_r KL_r, KL, overlap, correct) per row; chunked, with the gradient formed in forward."""
    head = draft.head_weight(hidden.dtype)
    if head.requires_grad:
        raise RuntimeError("DSpark's lm_head is the frozen target head; it must not require a gradient")
    w2 = None if draft.markov_head is None else draft.markov_head.markov_w2.weight
    if torch.is_grad_enabled() and (hidden.requires_grad or (w2 is not None and w2.requires_grad)):
        return _MarkovKL.apply(hidden, features, head, w2, target_hidden, weight)
    parts = []
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        z = hidden[rows] @ head.t()
        if w2 is not None:
            z = z + features[rows] @ w2.t()
        parts.append(ops.kl_rows_value(z, target_hidden[rows].to(head.dtype) @ head.t()))
    kl, overlap, correct = (_cat([p[i] for p in parts], weight) for i in range(3))
    return (kl * weight).sum(), kl, overlap, correct


def block_loss(draft: DSparkDraft, batch: Mapping[str, torch.Tensor], blocks: DSparkBlocks, decay: torch.Tensor,
               alpha: float, normaliser: torch.Tensor, use_flex: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, metric sums) of one micro-batch's blocks; decay [B] = w_k."""
    b, n = blocks.block_size, blocks.num_blocks
    attn = flex_attention_fn(blocks.blocks) if use_flex else dense_attention(blocks.blocks)
    hidden = draft(blocks.blocks.ids[None], blocks.blocks.positions[None], batch[AUX_HIDDEN][None],
                   batch["position_ids"][None], attn)[0]  # [N*B, H]
    emb = draft.prev_embedding(blocks.prev_ids)
    features = None
    if draft.markov_head is not None:
        features = draft.markov_head.features(emb.view(n, b, -1), hidden.view(n, b, -1)).reshape(n * b, -1)
    rows = blocks.valid().nonzero().flatten()
    slot = rows % b
    norm = normaliser.clamp_min(1.0)
    weight = decay[slot] / norm
    kl_loss, kl, overlap, correct = markov_kl(draft, hidden[rows], None if features is None else features[rows],
                                              batch[FINAL_HIDDEN][blocks.target_rows[rows]], weight)
    loss = kl_loss
    conf = draft.confidence(hidden[rows], None if emb is None else emb[rows])
    bce = torch.zeros_like(kl)
    if conf is not None:
        bce = F.binary_cross_entropy_with_logits(conf.float(), overlap.detach(), reduction="none")
        loss = loss + alpha * (bce * weight).sum()
    with torch.no_grad():
        sums = torch.zeros(len(PER_POSITION), b, device=hidden.device)
        prob = torch.zeros_like(kl) if conf is None else torch.sigmoid(conf.float())
        for i, value in enumerate((kl, bce, overlap, correct, torch.ones_like(kl), prob, (prob - overlap).abs())):
            sums[i].index_add_(0, slot, value.float())
        valid = torch.zeros(n * b, device=hidden.device)
        valid[rows] = 1.0
        rate, hit = torch.zeros_like(valid), torch.zeros_like(valid)
        rate[rows], hit[rows] = overlap, correct
        has = valid.view(n, b).sum(1) > 0
        # Per block: 1 (the bonus token) + the expected accepted prefix, from the analytical rates
        # (speculators' accept_len) and from greedy agreement (its eal); slots without loss end the prefix.
        tv_len = ((rate * valid).view(n, b).cumprod(1).sum(1) + 1.0)[has].sum()
        greedy_len = ((hit * valid).view(n, b).cumprod(1).sum(1) + 1.0)[has].sum()
        weighted = torch.stack([(kl * decay[slot]).sum(), alpha * (bce * decay[slot]).sum()])
        extra = torch.cat([torch.stack([has.float().sum(), tv_len, greedy_len]), weighted.float()])
    return loss, torch.cat([sums.flatten(), extra])


def summarize_sums(sums: torch.Tensor) -> dict[str, float]:
    """Metric sums over all micro-batches and trainers -> the metrics row."""
    n = sums.numel() - len(GLOBALS)
    if n <= 0 or n % len(PER_POSITION):
        raise ValueError(f"DSpark metric sums have {sums.numel()} entries; expected {len(PER_POSITION)} per block "
                         f"slot plus {len(GLOBALS)}")
    b = n // len(PER_POSITION)
    per = dict(zip(PER_POSITION, sums[:n].view(len(PER_POSITION), b)))
    glob = dict(zip(GLOBALS, sums[n:]))
    count = per["count"].sum().clamp_min(1)
    row: dict[str, float] = {"loss": float((glob["kl_weighted"] + glob["conf_weighted"]) / count),
                             "kl": float(per["kl"].sum() / count), "conf_bce": float(per["bce"].sum() / count)}
    denom = per["count"].clamp_min(1)
    run, expected = 1.0, 0.0
    for k in range(b):
        row[f"acc_{k}"] = float(per["correct"][k] / denom[k])
        row[f"overlap_{k}"] = float(per["overlap"][k] / denom[k])
        run *= row[f"acc_{k}"]
        expected += run
    # DFlash's sim_accept_len (expected accepted drafts from per-slot greedy accuracy, no bonus token).
    row["sim_accept_len"] = expected
    blocks = glob["blocks"].clamp_min(1)
    row["tv_accept_len"] = float(glob["tv_len"] / blocks)
    row["greedy_accept_len"] = float(glob["greedy_len"] / blocks)
    row["conf_mean"] = float(per["conf"].sum() / count)
    row["overlap_mean"] = float(per["overlap"].sum() / count)
    row["conf_abs_err"] = float(per["conf_err"].sum() / count)
    return row
