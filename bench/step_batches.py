"""The trainer-step benchmark's synthetic batches (bench/trainer.py): captured payloads as the handoff
delivers them, built without a target forward, and the loop's payload source over them.

Sample lengths drawn to fill a token budget; random tokens; a loss mask over each sample's response (its
last 70%, `--data chat`) or a random 70% (`--data iid`); aux states of the capture plan's width; final
states whose target argmax lies in the draft vocabulary (chat) or random (iid). The draft vocabulary is the
target's first ids (`write_vocab_map`), as the earlier bench built it.
"""
from __future__ import annotations

import random

import torch

PROMPT_FRACTION = 0.3  # --data chat: each sample's first 30% carries no loss


def sample_lengths(tokens: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(lo, hi), tokens - sum(lengths)))
    return lengths


class BatchSource:
    """lib.trainer.loop.PayloadSource over ready-made payloads, set one by one (no handoff: no wait)."""

    next = None

    def recv(self):
        header, tensors = self.next
        return header, {k: v for k, v in tensors.items() if k != "cu_seqlens"}

    def release(self) -> None:
        pass


def write_vocab_map(run_dir: str, draft_vocab: int, vocab: int) -> None:
    """The first draft_vocab target ids as the draft vocabulary (the EAGLE-3 line reads it from run.dir;
    the others ignore it), as the earlier bench built it: no token counting over a dataset."""
    from lib.drafts.eagle3.vocab import save_vocab_map

    dv = min(draft_vocab, vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[:dv] = True
    save_vocab_map(run_dir, torch.zeros(dv, dtype=torch.long), t2d)


def make_batch(lengths: list[int], plan, vocab: int, dtype, device, gen: torch.Generator, data: str,
               head=None) -> dict[str, torch.Tensor]:
    """A captured payload as the handoff delivers it (plus cu_seqlens): the plan's aux and final states."""
    from lib.drafts.base import AUX_HIDDEN, FINAL_HIDDEN

    t = sum(lengths)
    position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])
    if data == "chat":
        prompt = torch.cat([torch.full((n,), round(PROMPT_FRACTION * n), device=device) for n in lengths])
        loss_mask = position_ids >= prompt
    else:
        loss_mask = torch.rand(t, device=device, generator=gen) < 0.7
    batch = {"input_ids": torch.randint(0, vocab, (t,), device=device, generator=gen), "loss_mask": loss_mask,
             "position_ids": position_ids,
             "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                        device=device)}
    widths = plan.widths
    if AUX_HIDDEN in widths:
        batch[AUX_HIDDEN] = torch.randn(t, widths[AUX_HIDDEN], device=device, generator=gen).to(dtype)
    if FINAL_HIDDEN in widths:
        if data == "chat" and head is not None:
            # A target head's own row (scaled to a logit of 8) has its token as the argmax: a draft-vocab token.
            ids = head.draft_to_target[torch.randint(0, head.draft_to_target.numel(), (t,), device=device,
                                                     generator=gen)]
            rows = head.weight[ids].float()
            batch[FINAL_HIDDEN] = (rows * (8.0 / rows.pow(2).sum(-1, keepdim=True))).to(dtype)
        else:
            batch[FINAL_HIDDEN] = torch.randn(t, widths[FINAL_HIDDEN], device=device, generator=gen).to(dtype)
    return batch
