"""P-EAGLE export in the speculators format, which vLLM serves (and speculators' PEagleDraftModel loads).

out_dir/config.json is a speculators `PEagleSpeculatorConfig` (speculators 0.9.0, models/peagle/config.py:
EAGLE-3's schema plus `mask_token_id`, with `speculators_model_type: "peagle"`), written from EAGLE-3's
speculators config (lib/drafts/eagle3/speculators_format.py, where each key's reader is described) with:
  - `transformer_layer_config.num_hidden_layers`: the draft's layer count (layers.0 reads 2H, the rest H);
  - `mask_token_id`: the token of the mask slots; vLLM's update_peagle (vllm/transformers_utils/configs/
    speculators/algos.py) copies it to `pard_token`, which its parallel-drafting proposer reads;
  - `norm_before_residual`: written as trained (vLLM defaults a missing key to false, speculators' trainer
    to true);
  - `embed_requires_grad`: whether the embedding was trained (its weights are in the file either way);
  - `speculators_config.algorithm: "peagle"` and `proposal_methods[0].speculative_tokens` = the trained k,
    vLLM's default num_speculative_tokens.
out_dir/model.safetensors holds speculators' names, which are ours: embed_tokens, fc, fc_norm.{i}, layers.{i}.*,
norm, lm_head, mask_hidden [1, 1, n_aux*H], d2t (int64) and t2d (bool). No research layout is written:
the servers that run P-EAGLE read this one.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch

from lib.drafts.eagle3.export import CONFIG_FILE, WEIGHTS_FILE, write_export
from lib.drafts.eagle3.rope import rope_from_hf_config
from lib.drafts.eagle3.speculators_format import speculators_config_json
from lib.drafts.peagle.model import PEagleDraft, PEagleDraftConfig

MODEL_TYPE = "peagle"
ARCHITECTURE = "PEagleDraftModel"  # the class speculators writes; vLLM maps it to its P-EAGLE Llama draft


def config_json(config: PEagleDraftConfig, dtype: torch.dtype, verifier_path: Optional[str],
                embed_trained: bool = True) -> dict[str, Any]:
    out = speculators_config_json(config, dtype, verifier_path, speculative_tokens=config.num_depths)
    out["transformer_layer_config"]["num_hidden_layers"] = config.num_hidden_layers
    out.update(speculators_model_type=MODEL_TYPE, architectures=[ARCHITECTURE], mask_token_id=config.mask_token_id,
               norm_before_residual=config.norm_before_residual, embed_requires_grad=embed_trained)
    out["speculators_config"]["algorithm"] = MODEL_TYPE
    return out


def config_from_json(data: Mapping[str, Any]) -> PEagleDraftConfig:
    """PEagleDraftConfig from a speculators P-EAGLE config.json (ours or speculators' own)."""
    if data.get("speculators_model_type") != MODEL_TYPE:
        raise ValueError(f"config.json has speculators_model_type={data.get('speculators_model_type')!r}: not a "
                         f"P-EAGLE draft (point at a draft=peagle export)")
    layer = dict(data.get("transformer_layer_config") or {})
    if layer.get("model_type", "llama") != "llama":
        raise ValueError(f"transformer_layer_config.model_type={layer.get('model_type')!r}: only Llama-layer P-EAGLE "
                         f"drafts load here")
    bad = [key for key in ("norm_before_fc", "norm_output") if data.get(key)]
    if bad or data.get("mask_token_id") is None:
        raise ValueError(f"P-EAGLE config.json sets {bad or 'no mask_token_id'}: this draft has neither "
                         f"norm_before_fc nor norm_output, and needs the mask token")
    hidden, heads = layer["hidden_size"], layer["num_attention_heads"]
    theta, scaling = rope_from_hf_config(SimpleNamespace(**{
        k: layer[k] for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in layer}))
    proposals = (data.get("speculators_config") or {}).get("proposal_methods") or [{}]
    return PEagleDraftConfig(
        hidden_size=hidden, intermediate_size=layer["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=layer.get("num_key_value_heads") or heads,
        head_dim=layer.get("head_dim") or hidden // heads,
        rms_norm_eps=layer["rms_norm_eps"], rope_theta=theta, max_position_embeddings=layer["max_position_embeddings"],
        vocab_size=layer["vocab_size"], draft_vocab_size=data.get("draft_vocab_size") or layer["vocab_size"],
        target_hidden_size=data.get("target_hidden_size") or hidden,
        aux_layer_ids=[i - 1 for i in data["eagle_aux_hidden_state_layer_ids"]],  # vLLM counts layer inputs
        rope_scaling=scaling, hidden_act=layer.get("hidden_act", "silu"), fc_norm=bool(data.get("fc_norm", False)),
        num_hidden_layers=layer.get("num_hidden_layers", 1), mask_token_id=int(data["mask_token_id"]),
        num_depths=int(proposals[0].get("speculative_tokens", 8)),
        norm_before_residual=bool(data.get("norm_before_residual", False)))


def checked_tensors(state: Mapping[str, torch.Tensor], config: PEagleDraftConfig,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The draft's tensors checked against `config` and cast for export (floats to dtype, d2t int64, t2d bool)."""
    with torch.device("meta"):
        expected = {name: (tuple(t.shape), t.dtype) for name, t in PEagleDraft(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"P-EAGLE state dict does not match its config: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}; pass the full (gathered) state dict of the draft")
    tensors = {}
    for name, (shape, kind) in expected.items():
        t = state[name].detach()
        if tuple(t.shape) != shape:
            raise ValueError(f"P-EAGLE tensor {name} has shape {tuple(t.shape)}, its config implies {shape}")
        tensors[name] = (t.to(dtype) if kind.is_floating_point else t.to(kind)).cpu().contiguous()
    return tensors


def export_draft(state: Mapping[str, torch.Tensor], config: PEagleDraftConfig, out_dir: str,
                 dtype: torch.dtype = torch.bfloat16, verifier_path: Optional[str] = None,
                 embed_trained: bool = True) -> str:
    """config.json + model.safetensors from a full (unsharded) draft state dict, written atomically."""
    return write_export(out_dir, checked_tensors(state, config, dtype),
                        config_json(config, dtype, verifier_path, embed_trained))


def load_draft(path: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> PEagleDraft:
    from safetensors.torch import load_file

    cfg_file, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for file in (cfg_file, weights):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: {path!r} is not a P-EAGLE draft export")
    with open(cfg_file) as f:
        config = config_from_json(json.load(f))
    draft = PEagleDraft(config)
    state = load_file(weights)
    draft.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    return draft.to(device=device, dtype=dtype) if device is not None else draft.to(dtype=dtype)
