"""Export of the trained draft in the layout sglang, vLLM and SpecForge load as an EAGLE-3 draft.

out_dir/config.json: a one-layer Llama config with architectures ["LlamaForCausalLMEagle3"],
draft_vocab_size, target_hidden_size and the aux layer ids in both places servers read them:
  - eagle_config.eagle_aux_hidden_state_layer_ids (sglang, SpecForge): "output of target layer i";
    sglang adds 1 when it registers them (python/sglang/srt/models/llama.py,
    set_eagle3_layers_to_capture).
  - top-level eagle_aux_hidden_state_layer_ids (vLLM, vllm/v1/worker/gpu/spec_decode/eagle/
    eagle3_utils.py): vLLM captures the *input* of layer j (vllm/model_executor/models/llama.py),
    so it gets our ids + 1.
out_dir/model.safetensors: the draft's state dict under its own names (see docs/draft_format.md).
EAGLE-3.1 drafts (config `fc_norm: true`) add `fc_norm.{i}.weight` [target_hidden_size], one per aux
layer. vLLM reads the key and those names as speculators writes them; sglang's EAGLE-3 Llama draft
has no such parameters and its load_weights skips names it does not allocate, so it would serve
such an export without the norms (docs/draft_format.md).

load_draft also reads the speculators layout (written by speculators_format.py beside this one):
`research_view` and `our_name` below map its config and names back to these.
"""
from __future__ import annotations

import json
import os
import warnings
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import torch

from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.rope import rope_from_hf_config

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# sglang's and vLLM's EAGLE-3 Llama drafts size fc for exactly three aux states.
SERVER_NUM_AUX = 3
_WRAPPER_PREFIX = "_orig_mod."  # torch.compile's wrapper module
# The speculators layout (speculators_format.py writes it; load_draft reads it): its model type, and
# its name of our decoder layer.
SPECULATORS_MODEL_TYPE = "eagle3"
OUR_LAYER_PREFIX, SPECULATORS_LAYER_PREFIX = "midlayer.", "layers.0."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def draft_config_json(config: Eagle3DraftConfig, dtype: torch.dtype) -> dict[str, Any]:
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters = {**config.rope_scaling, "rope_theta": config.rope_theta}
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": _dtype_name(dtype),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(config.aux_layer_ids),
                         "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in config.aux_layer_ids],
        # EAGLE-3.1's per-aux-layer RMSNorm before fc (the key vLLM and speculators read).
        "fc_norm": config.fc_norm,
    }


def _expected_tensors(config: Eagle3DraftConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        reference = Eagle3Draft(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in reference.state_dict().items()}


def checked_tensors(state_dict: Mapping[str, torch.Tensor], config: Eagle3DraftConfig,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The draft's tensors by our names, checked against what `config` implies and cast for export
    (floating tensors to `dtype`, d2t int64, t2d bool), on the CPU."""
    state = {name.removeprefix(_WRAPPER_PREFIX): t for name, t in state_dict.items()}
    expected = _expected_tensors(config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"draft state dict does not match Eagle3Draft({config.draft_vocab_size=}): missing {missing}, "
                       f"unexpected {unexpected}; pass the full (gathered) state dict of the draft")
    tensors = {}
    for name, (shape, kind) in expected.items():
        t = state[name].detach()
        if tuple(t.shape) != shape:
            raise ValueError(f"draft tensor {name} has shape {tuple(t.shape)}, config implies {shape}: was the state "
                             f"dict gathered from all shards?")
        tensors[name] = (t.to(dtype) if kind.is_floating_point else t.to(kind)).to("cpu").contiguous()
    return tensors


def write_export(out_dir: str, tensors: dict[str, torch.Tensor], config_json: dict[str, Any]) -> str:
    """model.safetensors + config.json under temporary names, then renamed: a reader never sees half
    an export."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights, cfg_file = os.path.join(out_dir, WEIGHTS_FILE), os.path.join(out_dir, CONFIG_FILE)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    with open(cfg_file + ".tmp", "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    os.replace(weights + ".tmp", weights)
    os.replace(cfg_file + ".tmp", cfg_file)
    return out_dir


def export_draft(state_dict: Mapping[str, torch.Tensor], config: Eagle3DraftConfig, out_dir: str,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """Write config.json + model.safetensors from a full (unsharded) draft state dict; returns out_dir.

    Floating tensors are cast to `dtype`; d2t stays int64 and t2d bool. Files are written under
    temporary names and renamed, so a reader never sees half an export.
    """
    tensors = checked_tensors(state_dict, config, dtype)
    if config.num_aux != SERVER_NUM_AUX:
        warnings.warn(f"draft reads {config.num_aux} aux layers; sglang and vLLM EAGLE-3 drafts expect "
                      f"{SERVER_NUM_AUX}, so this export only loads with load_draft")
    return write_export(out_dir, tensors, draft_config_json(config, dtype))


def our_name(name: str) -> str:
    """speculators' state-dict name -> ours (layers.0.* -> midlayer.*)."""
    return OUR_LAYER_PREFIX + name.removeprefix(SPECULATORS_LAYER_PREFIX) if name.startswith(
        SPECULATORS_LAYER_PREFIX) else name


def research_view(data: dict[str, Any]) -> dict[str, Any]:
    """A speculators-format config.json as the flat research-format keys config_from_export reads:
    the layer config plus the EAGLE-3 keys (aux ids stay in the "input of layer k" count, top-level,
    which config_from_export shifts back). Variants this draft cannot run are refused."""
    if data.get("speculators_model_type") != SPECULATORS_MODEL_TYPE:
        raise ValueError(f"speculators_model_type={data.get('speculators_model_type')!r}: only "
                         f"{SPECULATORS_MODEL_TYPE!r} drafts load as an Eagle3Draft")
    layer = dict(data.get("transformer_layer_config") or {})
    if layer.get("model_type", "llama") != "llama":
        raise ValueError(f"transformer_layer_config.model_type={layer.get('model_type')!r}: only Llama-layer "
                         f"EAGLE-3 drafts load as an Eagle3Draft")
    unsupported = [key for key in ("norm_before_residual", "norm_output") if data.get(key)]
    if unsupported:
        raise ValueError(f"speculators config sets {unsupported} true: this draft keeps the un-normed hidden as "
                         f"the residual and feeds back the pre-norm output, so it cannot run that checkpoint")
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids", "norm_before_fc",
                "fc_norm"):
        if key in data:
            layer[key] = data[key]
    layer.pop("eagle_config", None)
    return layer


def config_from_export(data: dict[str, Any]) -> Eagle3DraftConfig:
    """Eagle3DraftConfig from an EAGLE-3 draft config.json (ours, SpecForge/sglang-style, or the
    speculators layout)."""
    if "speculators_model_type" in data:
        data = research_view(data)
    if data.get("norm_before_fc"):
        raise ValueError(f"draft config.json has norm_before_fc=true (one RMSNorm over the concatenated aux states) "
                         f"and fc_norm={data.get('fc_norm', False)}: only fc_norm (one RMSNorm per aux layer) is "
                         f"implemented here, and the two are exclusive")
    eagle = data.get("eagle_config") or {}
    if "eagle_aux_hidden_state_layer_ids" in eagle:
        aux = list(eagle["eagle_aux_hidden_state_layer_ids"])
    elif data.get("eagle_aux_hidden_state_layer_ids"):
        aux = [i - 1 for i in data["eagle_aux_hidden_state_layer_ids"]]  # vLLM counts layer inputs
    else:
        raise ValueError("draft config.json names no aux layers (eagle_config.eagle_aux_hidden_state_layer_ids or "
                         "eagle_aux_hidden_state_layer_ids): add the target layers the draft was trained on")
    if data.get("num_hidden_layers", 1) != 1:
        raise ValueError(f"draft config.json has num_hidden_layers={data['num_hidden_layers']}; only one-layer "
                         f"EAGLE-3 drafts are supported")
    hidden, heads = data["hidden_size"], data["num_attention_heads"]
    rope_theta, rope_scaling = rope_from_hf_config(SimpleNamespace(**{
        k: data[k] for k in ("rope_theta", "rope_scaling", "rope_parameters") if k in data}))
    return Eagle3DraftConfig(
        hidden_size=hidden, intermediate_size=data["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or hidden // heads, rms_norm_eps=data["rms_norm_eps"], rope_theta=rope_theta,
        max_position_embeddings=data["max_position_embeddings"], vocab_size=data["vocab_size"],
        draft_vocab_size=data.get("draft_vocab_size") or data["vocab_size"],
        target_hidden_size=data.get("target_hidden_size") or hidden, aux_layer_ids=aux, rope_scaling=rope_scaling,
        hidden_act=data.get("hidden_act", "silu"), fc_norm=bool(data.get("fc_norm", False)))


def load_draft(path: str, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
               embedding: Optional[torch.Tensor] = None) -> Eagle3Draft:
    """Rebuild an Eagle3Draft from an export directory, research (`draft/`) or speculators
    (`draft_speculators/`) layout. `embedding` (the target's input embedding) is needed only for
    exports that leave embed_tokens out (some third-party drafts)."""
    from safetensors.torch import load_file
    cfg_file, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for file in (cfg_file, weights):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found: {path!r} is not an EAGLE-3 draft export")
    with open(cfg_file) as f:
        data = json.load(f)
    config = config_from_export(data)
    state = load_file(weights)
    if "speculators_model_type" in data:
        state = {our_name(name): t for name, t in state.items()}
    if "embed_tokens.weight" not in state:
        if embedding is None:
            raise KeyError(f"{weights} has no embed_tokens.weight: pass embedding=load_target_embedding(target)")
        state["embed_tokens.weight"] = embedding
    if "t2d" not in state and "d2t" in state:  # some exports keep only the offsets
        state["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool)
        state["t2d"][torch.arange(config.draft_vocab_size) + state["d2t"]] = True
    draft = Eagle3Draft(config)
    draft.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    return draft.to(device=device, dtype=dtype) if device is not None else draft.to(dtype=dtype)
