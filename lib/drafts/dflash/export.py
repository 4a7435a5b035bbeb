"""DFlash export: the layout DFlash loaders read (the authors' HF checkpoints, SGLang's/vLLM's DFlash
drafts, SpecForge's DFlash config): a Qwen3-style config.json with `block_size`, `num_target_layers`
and `dflash_config` {mask_token_id, target_layer_ids}, and model.safetensors with fc, hidden_norm,
layers.i.* and norm. The embedding and lm_head are the target's and are not written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from lib.drafts.dflash.model import DFlashConfig, DFlashDraft

ARCHITECTURE = "DFlashDraftModel"


def export_config(c: DFlashConfig, dtype: torch.dtype, verifier_path: Optional[str] = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": c.num_hidden_layers,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "block_size": c.block_size,
        "num_target_layers": c.num_target_layers,
        "dflash_config": {"mask_token_id": c.mask_token_id, "target_layer_ids": list(c.target_layer_ids)},
        "target_hidden_size": c.target_hidden_size,
    }
    if verifier_path is not None:
        out["verifier_path"] = verifier_path
    return out


def config_from_export(data: Mapping[str, Any]) -> DFlashConfig:
    if ARCHITECTURE not in data.get("architectures", []) or "dflash_config" not in data:
        raise ValueError(f"config.json is not a DFlash draft (architectures={data.get('architectures')}); "
                         f"point at a directory written by draft=dflash export")
    d = data["dflash_config"]
    return DFlashConfig(
        hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_attention_heads=data["num_attention_heads"], num_key_value_heads=data["num_key_value_heads"],
        head_dim=data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
        num_hidden_layers=data["num_hidden_layers"], rms_norm_eps=data["rms_norm_eps"],
        rope_theta=data.get("rope_theta", 10000.0), max_position_embeddings=data["max_position_embeddings"],
        vocab_size=data["vocab_size"], target_hidden_size=data.get("target_hidden_size", data["hidden_size"]),
        num_target_layers=data["num_target_layers"], target_layer_ids=list(d["target_layer_ids"]),
        block_size=data["block_size"], mask_token_id=d["mask_token_id"])


def export_draft(state: Mapping[str, torch.Tensor], config: DFlashConfig, out_dir: str, dtype: torch.dtype,
                 verifier_path: Optional[str] = None) -> str:
    expected = set(DFlashDraft(config).state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"DFlash state does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(export_config(config, dtype, verifier_path), f, indent=2)
    return out_dir


def load_draft(directory: str) -> DFlashDraft:
    """The draft from an export directory, without the target's embedding and lm_head (set_target_weights)."""
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_export(json.load(f))
    draft = DFlashDraft(config)
    state = load_file(os.path.join(directory, "model.safetensors"))
    dtype = next(iter(state.values())).dtype
    draft.load_state_dict(state)
    return draft.to(dtype)
