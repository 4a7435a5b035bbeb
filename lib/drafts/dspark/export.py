"""DSpark export in speculators' layout (speculators 0.9.0 `DSparkDraftModel`, which vLLM's speculators
config conversion `update_dspark` reads): config.json + model.safetensors in `draft/`.

config.json: `speculators_model_type: "dspark"`, `architectures: ["DSparkDraftModel"]`, the draft's
Qwen3 layer config under `transformer_layer_config` (num_hidden_layers = draft layers, vocab = the
target's), `draft_vocab_size` (= vocab: full vocabulary), `block_size`, `mask_token_id`,
`aux_hidden_state_layer_ids` (speculators counts "input of layer i", so ours + 1),
`sample_from_anchor: true`, the heads' keys (`markov_rank`, `markov_head_type`,
`enable_confidence_head`, `confidence_head_with_markov`), and `speculators_config` (algorithm
dspark, a greedy proposal of block_size tokens, the verifier). Beside them, keys speculators ignores
(its config allows extra keys): `num_target_layers`, and the verification schedule
`confidence_threshold` / `verify_budget` that our drafter applies.

model.safetensors: fc, hidden_norm, layers.i.*, norm, markov_head.markov_w1/w2 (+ gate_proj or
joint_proj), confidence_head.proj.{weight,bias}. The embedding and lm_head are the target's and are
not written (speculators reloads them from the verifier).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from lib.drafts.dflash.export import checked_tensors, load_export, verifier_entry, write_export
from lib.drafts.dspark.model import DSparkConfig, DSparkDraft

ARCHITECTURE = "DSparkDraftModel"
MODEL_TYPE = "dspark"
SPECULATORS_VERSION = "0.9.0"


def export_config(c: DSparkConfig, dtype: torch.dtype, verifier_path: Optional[str] = None) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    layer = {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "num_hidden_layers": c.num_hidden_layers, "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * c.num_hidden_layers, "use_sliding_window": False,
        "sliding_window": None, "dtype": dtype_name,
    }
    return {
        "speculators_model_type": MODEL_TYPE,
        "speculators_version": SPECULATORS_VERSION,
        "architectures": [ARCHITECTURE],
        "transformer_layer_config": layer,
        "draft_vocab_size": c.vocab_size,
        "block_size": c.block_size,
        "target_hidden_size": c.target_hidden_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],
        "mask_token_id": c.mask_token_id,
        "sliding_window_non_causal": False,
        "sample_from_anchor": True,
        "markov_rank": c.markov_rank,
        "markov_head_type": c.markov_head_type,
        "enable_confidence_head": c.enable_confidence_head,
        "confidence_head_with_markov": c.confidence_head_with_markov,
        "tie_word_embeddings": False,
        "dtype": dtype_name,
        "speculators_config": {
            "algorithm": MODEL_TYPE,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.block_size,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": verifier_entry(verifier_path),
        },
        # Ours, beside speculators' keys:
        "num_target_layers": c.num_target_layers,
        "confidence_threshold": c.confidence_threshold,
        "verify_budget": c.verify_budget,
    }


def _refuse(what: str, fix: str) -> None:
    raise ValueError(f"config.json: {what}; {fix}")


def config_from_export(data: Mapping[str, Any]) -> DSparkConfig:
    """Ours, or a speculators DSpark export of the variants this draft has (full vocabulary, anchor-first blocks,
    full attention)."""
    if data.get("speculators_model_type") != MODEL_TYPE:
        _refuse(f"speculators_model_type={data.get('speculators_model_type')!r} is not a DSpark draft",
                "point at a directory written by draft=dspark")
    layer = data.get("transformer_layer_config") or {}
    vocab = int(layer["vocab_size"])
    if int(data.get("draft_vocab_size", vocab)) != vocab:
        _refuse(f"draft_vocab_size={data['draft_vocab_size']} != vocab_size={vocab}",
                "reduced draft vocabularies (t2d/d2t) are not supported by draft=dspark")
    if not data.get("sample_from_anchor", True):
        _refuse("sample_from_anchor=false is DFlash's block layout (the anchor proposes nothing)",
                "this draft drafts from the anchor, as DSpark does; train such a draft with draft=dflash")
    if any(t != "full_attention" for t in layer.get("layer_types") or []):
        _refuse(f"layer_types={layer['layer_types']} has sliding-window layers", "draft=dspark has full attention only")
    rope = layer.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or layer.get("rope_scaling"):
        _refuse(f"rope_parameters={rope} is scaled rope", "draft=dspark rotates with plain rope (as DFlash)")
    ids = [int(i) - 1 for i in data["aux_hidden_state_layer_ids"]]
    hidden = int(layer["hidden_size"])
    return DSparkConfig(
        hidden_size=hidden, intermediate_size=int(layer["intermediate_size"]),
        num_attention_heads=int(layer["num_attention_heads"]), num_key_value_heads=int(layer["num_key_value_heads"]),
        head_dim=int(layer.get("head_dim") or hidden // int(layer["num_attention_heads"])),
        num_hidden_layers=int(layer["num_hidden_layers"]), rms_norm_eps=float(layer["rms_norm_eps"]),
        rope_theta=float(rope.get("rope_theta", layer.get("rope_theta", 10000.0))),
        max_position_embeddings=int(layer["max_position_embeddings"]), vocab_size=vocab,
        target_hidden_size=int(data.get("target_hidden_size") or hidden),
        num_target_layers=int(data.get("num_target_layers") or max(ids) + 1), target_layer_ids=ids,
        block_size=int(data["block_size"]), mask_token_id=int(data["mask_token_id"]),
        markov_rank=int(data.get("markov_rank", 256)), markov_head_type=str(data.get("markov_head_type", "vanilla")),
        enable_confidence_head=bool(data.get("enable_confidence_head", True)),
        confidence_head_with_markov=bool(data.get("confidence_head_with_markov", True)),
        confidence_threshold=float(data.get("confidence_threshold") or 0.0),
        verify_budget=None if data.get("verify_budget") is None else float(data["verify_budget"]))


def export_draft(state: Mapping[str, torch.Tensor], config: DSparkConfig, out_dir: str, dtype: torch.dtype,
                 verifier_path: Optional[str] = None) -> str:
    return write_export(out_dir, checked_tensors(state, DSparkDraft(config), "DSpark", dtype),
                        export_config(config, dtype, verifier_path))


def load_draft(directory: str) -> DSparkDraft:
    """The draft from an export directory, without the target's embedding and lm_head (set_target_weights)."""
    return load_export(directory, config_from_export, DSparkDraft)
