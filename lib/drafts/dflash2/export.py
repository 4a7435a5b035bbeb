"""DFlash2 exports: the speculators format (draft_speculators/) and the research layout (draft/).

Both hold the same model.safetensors: the method's names (fc, hidden_norm, layers.i.* with
attention_conv / mlp_conv, norm, candidate_selector.*); the embedding and lm_head are the target's and
are not written.

- speculators 0.9.0 (`DFlash2DraftModel.from_pretrained` loads it; tests/test_dflash2_parity.py):
  a `DFlash2SpeculatorConfig` with `speculators_model_type: "dflash2"`, the Qwen3 layer config,
  `aux_hidden_state_layer_ids` counted as speculators does ("input of layer k" = our output of layer
  k - 1, so ours + 1), the convolution/selector sizes at the top level, and the verifier (the target)
  it loads the embedding and head from.
- research layout (the z-lab DFlash layout with `architectures: ["DFlash2DraftModel"]`, what
  TokenSpeed's DFlash2 runtime and vLLM's qwen3_dflash2 model read): DFlash's Qwen3-style config.json
  (lib/drafts/dflash/export.py) whose `dflash_config` also carries block_size, conv_kernel_size,
  conv_group_size, selector_rank and selector_top_k. eval.py reads this one (draft/).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

from lib.drafts.dflash.export import export_config as dflash_export_config
from lib.drafts.dflash2.model import DFlash2Config, DFlash2Draft

ARCHITECTURE = "DFlash2DraftModel"
SPECULATORS_MODEL_TYPE = "dflash2"
SCHEMA_VERSION = "0.9.0"  # the speculators release whose DFlash2SpeculatorConfig this writes
SIZE_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
_LAYER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_hidden_layers", "rms_norm_eps", "max_position_embeddings", "vocab_size",
               "hidden_act", "attention_bias", "attention_dropout", "tie_word_embeddings")


def research_config(c: DFlash2Config, dtype: torch.dtype, verifier_path: Optional[str] = None) -> dict[str, Any]:
    out = dflash_export_config(c, dtype, verifier_path)
    out["architectures"] = [ARCHITECTURE]
    out["dflash_config"].update(block_size=c.block_size, **{k: getattr(c, k) for k in SIZE_KEYS})
    return out


def speculators_config(c: DFlash2Config, dtype: torch.dtype, verifier_path: Optional[str] = None) -> dict[str, Any]:
    research = research_config(c, dtype)
    layer = {key: research[key] for key in _LAYER_KEYS}
    layer.update(rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, dtype=research["torch_dtype"])
    verifier_architectures = []
    if verifier_path is not None and os.path.isfile(os.path.join(verifier_path, "config.json")):
        with open(os.path.join(verifier_path, "config.json")) as f:
            verifier_architectures = list(json.load(f).get("architectures") or [])
    return {
        "speculators_model_type": SPECULATORS_MODEL_TYPE,
        "speculators_version": SCHEMA_VERSION,
        "architectures": [ARCHITECTURE],
        "transformer_layer_config": layer,
        "draft_vocab_size": c.vocab_size,  # DFlash2 drafts over the whole target vocabulary
        "block_size": c.block_size,
        "target_hidden_size": c.target_hidden_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],
        "mask_token_id": c.mask_token_id,
        "sliding_window_non_causal": True,  # no sliding layers here; the method's default
        "sample_from_anchor": False,  # the anchor is the verified bonus token; positions 1.. are drafted
        **{k: getattr(c, k) for k in SIZE_KEYS},
        "torch_dtype": research["torch_dtype"],
        "speculators_config": {
            "algorithm": SPECULATORS_MODEL_TYPE,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.block_size - 1,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_path, "architectures": verifier_architectures},
        },
    }


def is_speculators(data: Mapping[str, Any]) -> bool:
    return data.get("speculators_model_type") == SPECULATORS_MODEL_TYPE


def is_research(data: Mapping[str, Any]) -> bool:
    architectures = data.get("architectures")
    block = data.get("dflash_config")
    return (isinstance(architectures, list) and ARCHITECTURE in architectures and isinstance(block, dict)
            and all(k in block for k in SIZE_KEYS) and "speculators_config" not in data)


def config_from_export(data: Mapping[str, Any]) -> DFlash2Config:
    """Either layout's config.json -> DFlash2Config."""
    if is_speculators(data):
        layer = data["transformer_layer_config"]
        rope = layer.get("rope_parameters") or {}
        heads = layer["num_attention_heads"]
        return DFlash2Config(
            hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"], num_attention_heads=heads,
            num_key_value_heads=layer["num_key_value_heads"],
            head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
            num_hidden_layers=layer["num_hidden_layers"], rms_norm_eps=layer["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", layer.get("rope_theta", 10000.0)),
            max_position_embeddings=layer["max_position_embeddings"], vocab_size=layer["vocab_size"],
            target_hidden_size=data.get("target_hidden_size") or layer["hidden_size"],
            # speculators' ids are inputs of layers (outputs of the layer before); the target's depth
            # is not recorded there, so the deepest captured layer bounds it.
            num_target_layers=max(data["aux_hidden_state_layer_ids"]),
            target_layer_ids=[i - 1 for i in data["aux_hidden_state_layer_ids"]], block_size=data["block_size"],
            mask_token_id=data["mask_token_id"], **{k: data[k] for k in SIZE_KEYS})
    if not is_research(data):
        raise ValueError(f"config.json is not a DFlash2 draft (architectures={data.get('architectures')}, "
                         f"speculators_model_type={data.get('speculators_model_type')}); point at a draft/ or "
                         f"draft_speculators/ directory written by draft=dflash2")
    d = data["dflash_config"]
    return DFlash2Config(
        hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_attention_heads=data["num_attention_heads"], num_key_value_heads=data["num_key_value_heads"],
        head_dim=data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
        num_hidden_layers=data["num_hidden_layers"], rms_norm_eps=data["rms_norm_eps"],
        rope_theta=data.get("rope_theta", 10000.0), max_position_embeddings=data["max_position_embeddings"],
        vocab_size=data["vocab_size"], target_hidden_size=data.get("target_hidden_size", data["hidden_size"]),
        num_target_layers=data["num_target_layers"], target_layer_ids=list(d["target_layer_ids"]),
        block_size=d.get("block_size", data.get("block_size")), mask_token_id=d["mask_token_id"],
        **{k: d[k] for k in SIZE_KEYS})


def _write(out_dir: str, tensors: Mapping[str, torch.Tensor], config: dict[str, Any]) -> str:
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


def checked_tensors(state: Mapping[str, torch.Tensor], config: DFlash2Config,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    expected = set(DFlash2Draft(config).state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"DFlash2 state does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}


def export_draft(state: Mapping[str, torch.Tensor], config: DFlash2Config, out_dir: str, dtype: torch.dtype,
                 verifier_path: Optional[str] = None) -> str:
    """The research layout (draft/)."""
    return _write(out_dir, checked_tensors(state, config, dtype), research_config(config, dtype, verifier_path))


def export_speculators(state: Mapping[str, torch.Tensor], config: DFlash2Config, out_dir: str, dtype: torch.dtype,
                       verifier_path: Optional[str] = None) -> str:
    """The speculators format (draft_speculators/)."""
    return _write(out_dir, checked_tensors(state, config, dtype), speculators_config(config, dtype, verifier_path))


def load_draft(directory: str) -> DFlash2Draft:
    """The draft from either layout, without the target's embedding and lm_head (set_target_weights)."""
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_export(json.load(f))
    draft = DFlash2Draft(config)
    state = load_file(os.path.join(directory, "model.safetensors"))
    dtype = next(iter(state.values())).dtype
    draft.load_state_dict(state)
    return draft.to(dtype)
