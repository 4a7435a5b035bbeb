"""DFlash export: the layout DFlash loaders read (the authors' HF checkpoints, SGLang's/vLLM's DFlash
drafts, SpecForge's DFlash config): a Qwen3-style config.json with `block_size`, `num_target_layers`
and `dflash_config` {mask_token_id, target_layer_ids}, and model.safetensors with fc, hidden_norm,
layers.i.* and norm. The embedding and lm_head are the target's and are not written.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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
    return DFlashConfig(**config_fields(data, data["block_size"]))


def config_fields(data: Mapping[str, Any], block_size: int) -> dict[str, Any]:
    """DFlashConfig's fields from a config.json in DFlash's layout (a family built on it reads its own
    keys beside them; where the block size is kept differs, so the caller gives it)."""
    d = data["dflash_config"]
    return dict(
        hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_attention_heads=data["num_attention_heads"], num_key_value_heads=data["num_key_value_heads"],
        head_dim=data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
        num_hidden_layers=data["num_hidden_layers"], rms_norm_eps=data["rms_norm_eps"],
        rope_theta=data.get("rope_theta", 10000.0), max_position_embeddings=data["max_position_embeddings"],
        vocab_size=data["vocab_size"], target_hidden_size=data.get("target_hidden_size", data["hidden_size"]),
        num_target_layers=data["num_target_layers"], target_layer_ids=list(d["target_layer_ids"]),
        block_size=block_size, mask_token_id=d["mask_token_id"])


def verifier_entry(verifier_path: Optional[str]) -> dict[str, Any]:
    """speculators_config.verifier: the target's path and, when it is a local model directory, its
    architectures ([] otherwise: export must not need the network)."""
    architectures = []
    if verifier_path and os.path.isfile(os.path.join(verifier_path, "config.json")):
        with open(os.path.join(verifier_path, "config.json")) as f:
            architectures = list(json.load(f).get("architectures") or [])
    return {"name_or_path": verifier_path, "architectures": architectures}


def checked_tensors(state: Mapping[str, torch.Tensor], reference: nn.Module, family: str,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The draft's tensors cast to dtype on the CPU, once their names are exactly reference's (a draft
    built from the config being exported)."""
    expected = set(reference.state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"{family} state does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}


def write_export(out_dir: str, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> str:
    """config.json + model.safetensors, each written under a temporary name and renamed (a reader
    never sees half an export)."""
    os.makedirs(out_dir, exist_ok=True)
    weights, meta = os.path.join(out_dir, "model.safetensors"), os.path.join(out_dir, "config.json")
    save_file(dict(tensors), weights + ".tmp")
    with open(meta + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(meta + ".tmp", meta)
    return out_dir


def load_export(directory: str, config_from_json: Callable[[Mapping[str, Any]], Any],
                draft_cls: Callable[[Any], nn.Module]) -> nn.Module:
    """draft_cls(config) with the export's weights, in their dtype; config from config.json through
    config_from_json. The target's embedding and lm_head are not in it (set_target_weights)."""
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_json(json.load(f))
    draft = draft_cls(config)
    state = load_file(os.path.join(directory, "model.safetensors"))
    dtype = next(iter(state.values())).dtype
    draft.load_state_dict(state)
    return draft.to(dtype)


def export_draft(state: Mapping[str, torch.Tensor], config: DFlashConfig, out_dir: str, dtype: torch.dtype,
                 verifier_path: Optional[str] = None) -> str:
    return write_export(out_dir, checked_tensors(state, DFlashDraft(config), "DFlash", dtype),
                        export_config(config, dtype, verifier_path))


def load_draft(directory: str) -> DFlashDraft:
    """The draft from an export directory, without the target's embedding and lm_head (set_target_weights)."""
    return load_export(directory, config_from_export, DFlashDraft)
