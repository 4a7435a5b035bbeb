"""The DSpark draft: DFlash's parallel block backbone plus a Markov head and a confidence head.

The backbone is lib/drafts/dflash/model.py's, unchanged (fc + hidden_norm over the captured target
layers, a Qwen3-style stack whose queries are the block and whose keys are [context ; block]). What
DSpark adds sits after the backbone's final norm, at each block slot k:

- Markov head: a low-rank logit bias from the token before the slot's prediction, W2 @ f, where
  f = W1[prev] ("vanilla"), sigmoid(gate([h; W1[prev]])) * W1[prev] ("gated"), or the output of a
  small gated recurrence over the block's slots ("rnn"). Slot k's draft logits are
  lm_head(h_k) + W2 f_k. In training prev is the data token (teacher forcing); in drafting it is the
  token the draft itself chose at slot k-1 (the bonus token at slot 0), so drafting runs the heads
  left to right after one backbone forward.
- Confidence head: one linear map of [h_k ; W1[prev]] to a logit whose sigmoid estimates the chance
  that slot k's token is accepted given the earlier ones were (trained against 1 - TV(draft, target)).

Block layout is DSpark's "sample from anchor": the block is [anchor, mask x (B-1)] and every slot
predicts, slot k the token after position anchor + k, so one forward proposes B tokens (DFlash's
slot 0 proposes nothing). Names follow speculators' DSparkDraftModel (markov_head.markov_w1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lib.drafts.dflash.model import DFlashConfig, DFlashDraft, RMSNorm

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclass
class DSparkConfig(DFlashConfig):
    markov_rank: int = 256  # 0: no Markov head (pure parallel drafting)
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True  # the head reads [h ; W1[prev]] instead of h alone
    # Verification schedule (drafting only; written to the export so evaluation applies it):
    # verify a row's proposal up to the last slot whose running product of confidences is >= the
    # threshold (0: the whole proposal), and, with verify_budget, at most budget * rows draft tokens
    # per round over the batch, given to the slots of highest running confidence.
    confidence_threshold: float = 0.0
    verify_budget: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.markov_rank, int) or isinstance(self.markov_rank, bool) or self.markov_rank < 0:
            raise ValueError(f"DSparkConfig.markov_rank={self.markov_rank!r} must be an int >= 0 (0: no Markov "
                             f"head): set draft.options.markov_rank, e.g. 256")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"DSparkConfig.markov_head_type={self.markov_head_type!r}: use one of "
                             f"{list(MARKOV_HEAD_TYPES)} (draft.options.markov_head_type)")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("DSparkConfig.confidence_head_with_markov=true needs markov_rank > 0: set "
                             "draft.options.confidence_head_with_markov=false or a markov_rank")
        if not 0.0 <= float(self.confidence_threshold) <= 1.0:
            raise ValueError(f"DSparkConfig.confidence_threshold={self.confidence_threshold!r} must be in [0, 1] "
                             f"(a probability; 0 verifies the whole proposal)")
        if self.verify_budget is not None and not float(self.verify_budget) >= 0:
            raise ValueError(f"DSparkConfig.verify_budget={self.verify_budget!r} must be >= 0 draft tokens per row, "
                             f"or null (no budget)")
        if (self.confidence_threshold > 0 or self.verify_budget is not None) and not self.enable_confidence_head:
            raise ValueError("a confidence schedule (confidence_threshold > 0 or verify_budget) needs the "
                             "confidence head: set draft.options.confidence_head=true or drop the schedule")

    @property
    def scheduled(self) -> bool:
        return self.confidence_threshold > 0 or self.verify_budget is not None

    @classmethod
    def from_dflash(cls, base: DFlashConfig, **dspark) -> "DSparkConfig":
        return cls(**base.to_dict(), **dspark)


class MarkovHead(nn.Module):
    """The features f that W2 maps to a logit bias, per slot, from the previous token's W1 embedding."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, head_type: str):
        super().__init__()
        self.head_type, self.rank = head_type, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if head_type == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif head_type == "rnn":
            # [gate ; candidate ; output] from [state ; previous-token embedding ; backbone hidden].
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_ids.long())

    def step(self, emb: torch.Tensor, hidden: torch.Tensor, state: Optional[torch.Tensor]):
        """One slot: (features [.., r], next state) from emb = W1[prev] and the slot's hidden [.., H]."""
        emb = emb.to(self.markov_w2.weight.dtype)
        if self.head_type == "vanilla":
            return emb, state
        hidden = hidden.to(emb.dtype)
        if self.head_type == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], -1))) * emb, state
        if state is None:
            state = emb.new_zeros(emb.shape)
        gate, cand, out = self.joint_proj(torch.cat([state, emb, hidden], -1)).chunk(3, -1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1.0 - gate) * torch.tanh(cand)
        return torch.tanh(out), state

    def features(self, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Teacher-forced features of whole blocks: emb [N, B, r], hidden [N, B, H] -> [N, B, r]."""
        if self.head_type != "rnn":
            return self.step(emb, hidden, None)[0]
        state, out = None, []
        for k in range(emb.shape[1]):  # the recurrence runs left to right within each block
            f, state = self.step(emb[:, k], hidden[:, k], state)
            out.append(f)
        return torch.stack(out, 1)

    def bias(self, features: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(features)


class ConfidenceHead(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


class DSparkDraft(DFlashDraft):
    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        c = config
        self.markov_head = (MarkovHead(c.vocab_size, c.markov_rank, c.hidden_size, c.markov_head_type)
                            if c.markov_rank > 0 else None)
        self.confidence_head = None
        if c.enable_confidence_head:
            width = c.hidden_size + (c.markov_rank if c.confidence_head_with_markov else 0)
            self.confidence_head = ConfidenceHead(width)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.01)  # W1: speculators' initial scale
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def prev_embedding(self, prev_ids: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.markov_head is None else self.markov_head.embed(prev_ids)

    def confidence(self, hidden: torch.Tensor, emb: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Confidence logits [..] of slots with backbone hidden [.., H] and previous-token embedding emb."""
        if self.confidence_head is None:
            return None
        if self.config.confidence_head_with_markov:
            hidden = torch.cat([hidden, emb.to(hidden.dtype)], -1)
        return self.confidence_head(hidden)

    def block_logits(self, hidden: torch.Tensor, prev_ids: torch.Tensor):
        """Teacher-forced heads of whole blocks: hidden [N, B, H], prev_ids [N, B] (the token before each
        slot's prediction) -> (draft logits [N, B, V], confidence logits [N, B] or None). Training
        computes the same pieces row by row (lib/drafts/dspark/loss.py); this is the plain form."""
        logits = self.logits(hidden)
        emb = self.prev_embedding(prev_ids)
        if self.markov_head is not None:
            logits = logits + self.markov_head.bias(self.markov_head.features(emb, hidden)).to(logits.dtype)
        return logits, self.confidence(hidden, emb)

    @torch.no_grad()
    def draft_chain(self, hidden: torch.Tensor, first_prev: torch.Tensor, steps: int):
        """Drafting: hidden [n, B, H] of one backbone forward, first_prev [n] (the bonus token) ->
        (tokens [n, steps], confidence logits [n, steps] or None), slot by slot, each slot's Markov
        bias and confidence from the token chosen at the slot before."""
        base = self.logits(hidden[:, :steps])
        prev, state, tokens, confs = first_prev, None, [], []
        for k in range(steps):
            emb = self.prev_embedding(prev)
            logits = base[:, k]
            if self.markov_head is not None:
                f, state = self.markov_head.step(emb, hidden[:, k], state)
                logits = logits + self.markov_head.bias(f).to(logits.dtype)
            prev = logits.argmax(-1)
            tokens.append(prev)
            confs.append(self.confidence(hidden[:, k], emb))
        conf = None if self.confidence_head is None else torch.stack(confs, 1)
        return torch.stack(tokens, 1), conf

