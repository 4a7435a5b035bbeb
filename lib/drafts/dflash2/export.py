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

from typing import Any, Mapping, Optional

import torch
from lib.drafts.dflash.export import checked_tensors, config_fields, load_export, verifier_entry, write_export
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
            "verifier": verifier_entry(verifier_path),
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
    return DFlash2Config(**config_fields(data, d.get("block_size", data.get("block_size"))),
                         **{k: d[k] for k in SIZE_KEYS})


def export_draft(state: Mapping[str, torch.Tensor], config: DFlash2Config, out_dir: str, dtype: torch.dtype,
                 verifier_path: Optional[str] = None) -> str:
    """The research layout (draft/)."""
    return write_export(out_dir, checked_tensors(state, DFlash2Draft(config), "DFlash2", dtype),
                        research_config(config, dtype, verifier_path))


def export_speculators(state: Mapping[str, torch.Tensor], config: DFlash2Config, out_dir: str, dtype: torch.dtype,
                       verifier_path: Optional[str] = None) -> str:
    """The speculators format (draft_speculators/)."""
    return write_export(out_dir, checked_tensors(state, DFlash2Draft(config), "DFlash2", dtype),
                        speculators_config(config, dtype, verifier_path))


def load_draft(directory: str) -> DFlash2Draft:
    """The draft from either layout, without the target's embedding and lm_head (set_target_weights)."""
    return load_export(directory, config_from_export, DFlash2Draft)
