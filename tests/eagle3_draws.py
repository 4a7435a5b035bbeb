"""A drawn EAGLE-3 draft and a packed batch for it, shared by the tests that hold training to a served
chain (test_train_serve_consistency) and to the reference implementations (test_reference_parity).

Every parameter is drawn (norm gains around one too, EAGLE-3.1's fc_norm gains included), so a term
two code paths treat differently cannot hide behind a weight of exactly one or zero.
"""
from __future__ import annotations

import torch

from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.vocab import build_vocab_map

LENGTHS = (9, 13, 6)  # samples of one packed batch
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
# YaRN with a ramp inside the 8 rotary pairs of these drafts; explicit mscale keys as SpecForge needs them
# (its YaRN class cannot default them), and gpt-oss's untruncated form (which SpecForge 0.2.0 ignores).
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 4.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
YARN_UNTRUNCATED_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 4.0, "beta_slow": 1.0, "truncate": False}


# Per-aux-layer magnitudes of a target's states growing with depth (what EAGLE-3.1's fc_norm is for).
AUX_SCALES = (1.0, 8.0, 60.0)


def drawn_draft(rope_scaling, target_hidden_size: int = 24, seed: int = 0, fc_norm: bool = False) -> Eagle3Draft:
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, rms_norm_eps=1e-6, rope_theta=50.0, max_position_embeddings=64,
                            vocab_size=50, draft_vocab_size=20, target_hidden_size=target_hidden_size,
                            aux_layer_ids=[0, 2, 3], rope_scaling=rope_scaling, fc_norm=fc_norm)
    draft = Eagle3Draft(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            # Matrices large enough that attention is far from uniform.
            is_gain = name.endswith("norm.weight") or name.startswith("fc_norm.")
            param.copy_(1.0 + 0.3 * noise if is_gain else 0.3 * noise)
        draft.set_vocab_map(*build_vocab_map(torch.rand(cfg.vocab_size, generator=gen), cfg.draft_vocab_size))
    return draft.eval()


def packed_inputs(cfg: Eagle3DraftConfig, seed: int = 1, aux_scales=None):
    """(input_ids, aux_hidden, position_ids, cu_seqlens) of a batch packing LENGTHS; aux_scales
    multiplies each aux layer's block of columns (e.g. AUX_SCALES)."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    ids = torch.randint(0, cfg.vocab_size, (total,), generator=gen)
    aux = torch.randn(total, cfg.fc_in_features, generator=gen)
    if aux_scales is not None:
        aux = (aux.unflatten(-1, (cfg.num_aux, cfg.target_hidden_size))
               * torch.tensor(aux_scales, dtype=aux.dtype)[:, None]).flatten(-2)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, aux, positions, cu
