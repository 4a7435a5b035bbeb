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


def test_speculators_converts_the_export_and_its_dflash_model_matches(tmp_path):
    """speculators' DFlash converter (the z-lab layout -> speculators layout, which vLLM loads) takes
    our export as it is; its DFlashDraftModel's layers then give our hidden states."""
    pytest.importorskip("speculators.models.dflash")
    from speculators.convert.dflash.converter import DFlashConverter
    from speculators.models.dflash import DFlashDraftModel as SpecDFlash
    from transformers import AutoConfig

    from lib.config import TINY_TARGET_DIR

    hf = AutoConfig.from_pretrained(TINY_TARGET_DIR)
    c = DFlashConfig(hidden_size=hf.hidden_size, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=32, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=1024, vocab_size=hf.vocab_size, target_hidden_size=hf.hidden_size,
                     num_target_layers=hf.num_hidden_layers, target_layer_ids=[1, 3, 5], block_size=4,
                     mask_token_id=4)
    torch.manual_seed(0)
    draft = DFlashDraft(c)
    for p in draft.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    draft.set_target_weights(torch.randn(c.vocab_size, c.hidden_size), torch.randn(c.vocab_size, c.hidden_size))
    draft.eval()
    ours_dir = export_draft(draft.state_dict(), c, str(tmp_path / "draft"), torch.float32)
    spec_dir = str(tmp_path / "draft_speculators")
    DFlashConverter().convert(ours_dir, spec_dir, base_model=TINY_TARGET_DIR, validate=False)
    theirs = SpecDFlash.from_pretrained(spec_dir).float().eval()
    # speculators counts "input of layer k" (= our output of layer k-1).
    assert theirs.target_layer_ids == [2, 4, 6] and theirs.block_size == 4 and theirs.mask_token_id == 4
    theirs.config.transformer_layer_config._attn_implementation = "sdpa"

    tokens = 12
    ids = torch.randint(0, c.vocab_size, (tokens,))
    positions = torch.arange(tokens)
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    blocks = build_blocks(ids, torch.ones(tokens, dtype=torch.bool), positions, cu, torch.tensor([3, 8]), 4, 4)
    aux = torch.randn(1, tokens, 3 * c.hidden_size)
    with torch.no_grad():
        ours = draft(blocks.ids[None], blocks.positions[None], aux, positions[None], dense_attention(blocks))
        x = draft.embed(blocks.ids[None])
        ctx = theirs.hidden_norm(theirs.fc(aux))
        pos = torch.cat([positions, blocks.positions])[None]
        emb = theirs.rotary_emb(x, pos)
        for layer in theirs.layers:
            x = layer(hidden_states=x, target_hidden=ctx, attention_mask=dense_mask(blocks)[None, None],
                      position_ids=pos, use_cache=False, position_embeddings=emb)
        ref = theirs.norm(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
