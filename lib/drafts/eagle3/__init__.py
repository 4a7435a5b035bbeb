"""EAGLE-3 draft model: model, training-time-test loss, vocab map, target head and export."""
from __future__ import annotations

from lib.drafts.eagle3.attention import DraftKVCache, TTTAttention
from lib.drafts.eagle3.export import config_from_export, draft_config_json, export_draft, load_draft
from lib.drafts.eagle3.loss import (count_valid_positions, row_loss, sim_accept_len, soft_cross_entropy, ttt_forward,
                                   valid_positions)
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import (TargetDistribution, TargetHead, load_target_embedding, load_target_lm_head)
from lib.drafts.eagle3.vocab import (VOCAB_MAP_FILENAME, build_vocab_map, ensure_vocab_map, load_vocab_map,
                              save_vocab_map)

# Importing the package registers the family (lib/drafts/base.py get_strategy imports it by name).
from lib.drafts.eagle3 import strategy as _strategy  # noqa: F401

__all__ = [
    "DraftKVCache", "TTTAttention", "config_from_export", "draft_config_json", "export_draft", "load_draft",
    "count_valid_positions", "row_loss", "sim_accept_len", "soft_cross_entropy", "ttt_forward", "valid_positions",
    "Eagle3Draft", "Eagle3DraftConfig", "TargetDistribution", "TargetHead", "load_target_embedding",
    "load_target_lm_head", "VOCAB_MAP_FILENAME", "build_vocab_map", "ensure_vocab_map", "load_vocab_map",
    "save_vocab_map",
]
