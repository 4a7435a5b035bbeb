"""Training-time test (TTT): the EAGLE-3 unroll and its loss over one packed batch.

Alignment at unroll step i (0-based), for packed position t of a sample ending at `end`:
  input token   x[t+1+i]            (ids shifted left by i+1 within the sample)
  input hidden  fc(aux[t]) at i=0, else the draft's own output hidden of step i-1 at t
  target        the target distribution at position t+1+i (it predicts x[t+2+i])
  valid iff     t+2+i < end, loss_mask[t+2+i], and the target's full-vocab argmax at t+1+i is in
                the draft vocab.
Rotary position of step i is position_ids + i (the i-th chained draft step after t, where a server
runs it); keys written at step j keep position + j. tests/test_train_serve_consistency.py holds the
unroll to the inference chain.

loss = sum_i 0.8^i * (sum of the row losses over valid rows of step i) / denominators[i].
With `denominators` = the global count of valid rows per step (all trainers, all micro-batches),
each rank's loss is its share of the global mean: sum gradients (do not average) across trainers
and micro-batches, and 1 or N trainers produce the same update.

The row loss (`train.loss`) compares the draft's softmax q over the draft vocabulary with the target's
distribution p renormalised over the same columns (d2t), as speculators' Eagle3DraftModel does with
its t2d-sliced verifier head: `ce` the soft cross-entropy -sum p log q (speculators' kl_div plus
the target's entropy: the same gradient), `lk` -log(alpha) with alpha = sum_v min(p_v, q_v) (their
nla), `lk_hybrid`, `tv`, `jsd` (lib/drafts/eagle3/fused.py). Their per-step reduction is this one:
masked sum / masked count, times decay^i, summed over steps. Which rows count is the same for every
loss (the rule above, SpecForge's: speculators also keeps rows whose target argmax is outside the
draft vocabulary).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch.utils.checkpoint import checkpoint

from lib.drafts.eagle3.attention import TTTAttention, document_ids
from lib.drafts.eagle3.fused import OVERLAP_LOSSES, ops, overlap_loss, overlap_scales
from lib.drafts.eagle3.model import Eagle3Draft
from lib.drafts.eagle3.target_head import TargetDistribution, TargetHead

STEP_DECAY = 0.8
BATCH_KEYS = ("input_ids", "loss_mask", "position_ids", "cu_seqlens", "aux_hidden", "final_hidden")
CE_CHUNK_ROWS = 2048


def _check_batch(batch: Mapping[str, torch.Tensor]) -> int:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"TTT batch lacks {missing}: pass the handoff payload plus cu_seqlens ({list(BATCH_KEYS)})")
    tokens = batch["input_ids"].shape[0]
    for key in ("loss_mask", "position_ids", "aux_hidden", "final_hidden"):
        if batch[key].shape[0] != tokens:
            raise ValueError(f"TTT batch {key} has {batch[key].shape[0]} rows, input_ids has {tokens}")
    return tokens


def valid_positions(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, in_draft_vocab: torch.Tensor,
                    ttt_length: int) -> torch.Tensor:
    """[ttt_length, T] bool: which packed positions carry a loss at each unroll step."""
    tokens = loss_mask.shape[0]
    device = loss_mask.device
    pos = torch.arange(tokens, device=device)
    end = cu_seqlens.to(device=device, dtype=torch.long)[1:][document_ids(cu_seqlens.to(device), tokens)]
    rows = []
    for i in range(ttt_length):
        predicted, source = pos + 2 + i, pos + 1 + i
        rows.append((predicted < end) & loss_mask.bool()[predicted.clamp(max=tokens - 1)]
                    & in_draft_vocab[source.clamp(max=tokens - 1)])
    return torch.stack(rows)


def count_valid_positions(target_head: TargetHead, batch: Mapping[str, torch.Tensor], ttt_length: int,
                          target: Optional[TargetDistribution] = None) -> torch.Tensor:
    """Valid rows per unroll step [ttt_length] int64, for the global loss normaliser."""
    _check_batch(batch)
    target = target if target is not None else target_head.target_probs(batch["final_hidden"])
    mask = batch["loss_mask"].to(target.draft_argmax.device)
    return valid_positions(mask, batch["cu_seqlens"], target.in_draft_vocab, ttt_length).sum(dim=1)


ROW_LOSSES = ("ce", *OVERLAP_LOSSES, "jsd")  # the values of train.loss (lib/config/choices.py TrainLoss)


def check_row_loss(name) -> str:
    """train.loss as a str (an enum member or its value); ValueError naming the key and the choices otherwise."""
    name = getattr(name, "value", name)
    if name not in ROW_LOSSES:
        raise ValueError(f"train.loss={name!r} is not an EAGLE-3 loss: use one of {', '.join(ROW_LOSSES)}")
    return name


class _RowLoss(torch.autograd.Function):
    """Per-row loss of logits [N, V] against rows of a shared probability table, in row chunks.

    Saves only the logits and per-row scalars (logsumexp; alpha for the overlap losses), not an fp32
    [N, V] softmax per step; backward forms the gradient chunk by chunk from them (for ce:
    softmax(logits) * sum(p) - p). The chunk ops are looked up on each call: train.compile swaps them.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, name: str) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        loss = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        lse, alpha = torch.empty_like(loss), torch.empty_like(loss)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            chunk = slice(start, start + CE_CHUNK_ROWS)
            if name == "ce":
                loss[chunk], lse[chunk] = ops.soft_ce_chunk(logits[chunk], probs, rows[chunk], dtype)
            elif name == "jsd":
                loss[chunk], lse[chunk] = ops.jsd_chunk(logits[chunk], probs, rows[chunk], dtype)
            else:  # loss holds KL until overlap_loss below
                loss[chunk], alpha[chunk], lse[chunk] = ops.overlap_chunk(logits[chunk], probs, rows[chunk], dtype)
        if name in OVERLAP_LOSSES:
            loss = overlap_loss(name, loss, alpha)
        ctx.save_for_backward(logits, probs, rows, lse, alpha)
        ctx.name = name
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, probs, rows, lse, alpha = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
            chunk = slice(start, start + CE_CHUNK_ROWS)
            args = (logits[chunk], probs, rows[chunk], lse[chunk])
            if ctx.name == "ce":
                grad[chunk] = ops.soft_ce_grad_chunk(*args, grad_loss[chunk])
            elif ctx.name == "jsd":
                grad[chunk] = ops.jsd_grad_chunk(*args, grad_loss[chunk])
            else:
                grad[chunk] = ops.overlap_grad_chunk(*args, *overlap_scales(ctx.name, alpha[chunk], grad_loss[chunk]))
        return grad, None, None, None


def row_loss(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, name: str = "ce") -> torch.Tensor:
    """Per-row `train.loss` of logits [N, V] against probs[rows] ([N] indices into probs [T, V])."""
    return _RowLoss.apply(logits, probs, rows, check_row_loss(name))


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row soft cross-entropy of logits [N, V] against probs[rows] ([N] indices into probs [T, V])."""
    return row_loss(logits, probs, rows, "ce")


def ttt_forward(draft: Eagle3Draft, target_head: TargetHead, batch: Mapping[str, torch.Tensor], ttt_length: int,
                denominators: Optional[torch.Tensor] = None, target: Optional[TargetDistribution] = None,
                attention_backend: str = "auto", recompute: bool = False, loss: str = "ce",
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unroll the draft ttt_length steps over one packed batch.

    batch: input_ids [T], loss_mask [T], position_ids [T], cu_seqlens [B+1], aux_hidden [T, n_aux*H],
    final_hidden [T, H]. denominators [ttt_length]: global valid-row counts (None: this batch's own).
    target: the batch's TargetDistribution if already computed (else computed here).
    recompute (`train.recompute`): each step keeps only its decoder-layer inputs and its rows' hidden
    states; the MLP, the logits and the row loss run again in backward (long contexts).
    loss (`train.loss`): the row loss, ce (default), lk, lk_hybrid, tv or jsd (module docstring).
    Returns (loss, metrics): metrics["sums"] = [ploss_sum_i.., correct_i.., count_i..] (float32,
    detached, ready to all-reduce) and metrics["loss"] (detached copy of the loss).
    """
    tokens = _check_batch(batch)
    loss_name = check_row_loss(loss)
    if ttt_length < 1:
        raise ValueError(f"ttt_length={ttt_length} must be >= 1")
    device = draft.fc.weight.device
    if target is None:
        target = target_head.target_probs(batch["final_hidden"])
    ids = batch["input_ids"].to(device)
    valid = valid_positions(batch["loss_mask"].to(device), batch["cu_seqlens"], target.in_draft_vocab.to(device),
                            ttt_length)
    counts = valid.sum(dim=1)
    if denominators is None:
        denominators = counts.clamp(min=1)
    if denominators.shape != (ttt_length,):
        raise ValueError(f"denominators shape {tuple(denominators.shape)} != ({ttt_length},): one count per step")
    loss_dtype = torch.promote_types(draft.fc.weight.dtype, torch.float32)
    denominators = denominators.to(device=device, dtype=loss_dtype)
    # One host sync for all steps: which rows need logits.
    flat_rows = torch.nonzero(valid.flatten()).squeeze(1)
    step_rows = torch.split(flat_rows - torch.repeat_interleave(
        torch.arange(ttt_length, device=device) * tokens, counts), counts.tolist())

    attention = TTTAttention(batch["cu_seqlens"], tokens, draft.midlayer.self_attn.scale, attention_backend,
                             device=device, head_dim=draft.config.head_dim)
    probs, target_ids = target.probs.to(device), target.draft_argmax.to(device)

    def step_loss(i: int, rows_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row loss, correct top-1 count) of step i; under recompute its logits are not kept."""
        labels = step_rows[i] + 1 + i

        def loss_and_hits(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = draft.compute_logits(h)
            return (row_loss(logits, probs, labels, loss_name),
                    (logits.detach().argmax(-1) == target_ids[labels]).sum())
        return checkpoint(loss_and_hits, rows_hidden, use_reentrant=False) if recompute else loss_and_hits(rows_hidden)

    per_step = draft(ids, batch["aux_hidden"].to(device), batch["position_ids"].to(device), attention, step_rows,
                     head=step_loss, recompute=recompute)
    total = torch.zeros((), dtype=loss_dtype, device=device)
    ploss_sums, corrects = [], []
    for i, (rows_loss, hits) in enumerate(per_step):
        total = total + (STEP_DECAY ** i) * rows_loss.sum().to(loss_dtype) / denominators[i]
        ploss_sums.append(rows_loss.detach().sum().float())
        corrects.append(hits.float())
    sums = torch.cat([torch.stack(ploss_sums), torch.stack(corrects), counts.float()])
    return total, {"loss": total.detach(), "sums": sums}


def sim_accept_len(acc: list[float]) -> float:
    """Expected accepted draft tokens per chain if step i is accepted with probability acc[i] given
    all earlier ones were: sum_i prod_{j<=i} acc[j]."""
    total, run = 0.0, 1.0
    for a in acc:
        run *= a
        total += run
    return total
