"""Training computes what the server runs: the TTT unroll against the speculative-decoding chain.

At unroll depth i the training row of packed position t stands for one draft chain a server runs
after verifying a prefix that ends at t: a prefill over the sample's positions 0..t (target states),
then i chained steps, each on the draft's own output hidden, each one position further on, each
attending the prefill's keys and the chain's earlier keys. Here the chain is driven by the same code
evaluation uses (lib/drafts/eagle3/drafter.py `draft_step` over a `HoleKVCache`, and `forward_infer` over a
`DraftKVCache`), teacher-forced with the tokens training feeds, and must give training's logits at
every depth. Every parameter is drawn (norm gains too), so a term the two paths treat differently
cannot hide behind a weight of one or zero. EAGLE-3.1 (fc_norm: one RMSNorm per aux layer before fc)
runs the same check, on aux states whose magnitudes differ by layer.
"""
from __future__ import annotations

import pytest
import torch

from lib.drafts.eagle3.attention import DraftKVCache, TTTAttention
from lib.drafts.eagle3.model import Eagle3Draft
from lib.drafts.eagle3.drafter import HoleKVCache, draft_step
from tests.eagle3_draws import AUX_SCALES, LLAMA3_ROPE, YARN_UNTRUNCATED_ROPE, drawn_draft, packed_inputs

pytestmark = pytest.mark.unit

TTT_LENGTH = 4


def training_logits(draft: Eagle3Draft, ids, aux, positions, cu) -> list[torch.Tensor]:
    """Logits of every packed row at every depth from the training unroll (Eagle3Draft.forward)."""
    rows = [torch.arange(ids.shape[0])] * TTT_LENGTH
    attention = TTTAttention(cu, ids.shape[0], draft.midlayer.self_attn.scale, "reference",
                             head_dim=draft.config.head_dim)
    with torch.no_grad():
        return draft(ids, aux, positions, attention, rows)


def chain_logits_draft_step(draft: Eagle3Draft, ids, aux, start: int, t: int, depth: int) -> list[torch.Tensor]:
    """Depths 0..depth of the chain for row t (sample starting at `start`), the way EagleDrafter runs it."""
    cache = HoleKVCache()
    prefix = slice(start, t + 1)
    n = t + 1 - start
    ones = torch.ones(1, n, dtype=torch.bool)
    logits, hidden = draft_step(draft, cache, ids[start + 1:t + 2][None], aux[prefix][None], False,
                                torch.arange(n)[None], ones)
    out, hidden, position = [logits[0, -1]], hidden[:, -1:], n - 1
    for i in range(1, depth + 1):
        position += 1
        logits, hidden = draft_step(draft, cache, ids[t + 1 + i].view(1, 1), hidden, True,
                                    torch.tensor([[position]]), torch.ones(1, 1, dtype=torch.bool))
        out.append(logits[0, -1])
    return out


def chain_logits_forward_infer(draft: Eagle3Draft, ids, aux, start: int, t: int, depth: int) -> list[torch.Tensor]:
    """The same chain through Eagle3Draft.forward_infer and its contiguous DraftKVCache."""
    n = t + 1 - start
    cache = DraftKVCache()
    logits, hidden, cache = draft.forward_infer(ids[start + 1:t + 2][None], aux[start:t + 1][None], False,
                                                torch.arange(n)[None], cache)
    out, hidden = [logits[0, -1]], hidden[:, -1:]
    for i in range(1, depth + 1):
        logits, hidden, cache = draft.forward_infer(ids[t + 1 + i].view(1, 1), hidden, True,
                                                    torch.tensor([[n - 1 + i]]), cache)
        out.append(logits[0, -1])
    return out


@pytest.mark.parametrize("fc_norm", [False, True], ids=["eagle3", "eagle3_1"])
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE, YARN_UNTRUNCATED_ROPE],
                         ids=["default_rope", "llama3_rope", "yarn_rope"])
@pytest.mark.parametrize("chain", [chain_logits_draft_step, chain_logits_forward_infer],
                         ids=["eval_drafter", "forward_infer"])
def test_training_unroll_equals_the_served_chain_at_every_depth(rope_scaling, chain, fc_norm):
    torch.set_default_dtype(torch.float32)
    draft = drawn_draft(rope_scaling, fc_norm=fc_norm)
    ids, aux, positions, cu = packed_inputs(draft.config, aux_scales=AUX_SCALES if fc_norm else None)
    train = training_logits(draft, ids, aux, positions, cu)
    compared = [0] * TTT_LENGTH
    worst = [0.0] * TTT_LENGTH
    bounds = cu.tolist()
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            for t in range(start, end):
                # Depth i reads the token at t+1+i: only chains whose tokens stay in the sample exist.
                depth = min(TTT_LENGTH - 1, end - 2 - t)
                if depth < 0:
                    continue
                for i, served in enumerate(chain(draft, ids, aux, start, t, depth)):
                    diff = (train[i][t] - served).abs().max().item()
                    worst[i] = max(worst[i], diff)
                    compared[i] += 1
    assert all(c > 0 for c in compared), compared
    scale = max(float(x.abs().max()) for x in train)
    assert scale > 1.0  # logits far from zero: a tolerance of 1e-5 is a real bound
    assert max(worst) < 1e-5, f"max |d logit| per depth {worst} (logit scale {scale:.1f})"
