"""A draft=dflash export loads into SpecForge's DFlash model class and gives the same hidden states on
the same inputs (skipped where specforge is not importable). Run it from the reference venv:
    PYTHONPATH=/work/main /work/refvenv/bin/python -m pytest -q tests/test_dflash_parity.py
"""
from __future__ import annotations

import pytest
import torch

from lib.drafts.dflash.export import export_draft
from lib.drafts.dflash.mask import build_blocks, dense_attention, dense_mask
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft

pytestmark = pytest.mark.unit


def _draft() -> DFlashDraft:
    c = DFlashConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
                     vocab_size=100, target_hidden_size=64, num_target_layers=8, target_layer_ids=[1, 3, 5],
                     block_size=4, mask_token_id=7)
    torch.manual_seed(0)
    draft = DFlashDraft(c)
    for p in draft.parameters():  # norms off 1 too, so a mixed-up norm shows
        p.data.add_(torch.randn_like(p) * 0.05)
    draft.set_target_weights(torch.randn(c.vocab_size, c.hidden_size), torch.randn(c.vocab_size, c.hidden_size))
    return draft.eval()


def test_specforge_dflash_loads_the_export_and_matches(tmp_path):
    sf = pytest.importorskip("specforge.modeling.draft.dflash")
    draft = _draft()
    out = export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), torch.float32)
    theirs = sf.DFlashDraftModel.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert theirs.target_layer_ids == [1, 3, 5] and theirs.block_size == 4 and theirs.mask_token_id == 7

    tokens = 12
    ids = torch.randint(0, 100, (tokens,))
    positions = torch.arange(tokens)
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    blocks = build_blocks(ids, torch.ones(tokens, dtype=torch.bool), positions, cu, torch.tensor([3, 8]), 4, 7)
    aux = torch.randn(1, tokens, 3 * 64)
    with torch.no_grad():
        ours = draft(blocks.ids[None], blocks.positions[None], aux, positions[None], dense_attention(blocks))
        ref = theirs(position_ids=torch.cat([positions, blocks.positions])[None],
                     attention_mask=dense_mask(blocks)[None, None], noise_embedding=draft.embed(blocks.ids[None]),
                     target_hidden=aux)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(draft.logits(ours), draft.logits(ref), rtol=1e-4, atol=1e-4)
