"""Export of the trained draft in the speculators format, which vLLM loads natively.

out_dir/config.json is a speculators `Eagle3SpeculatorConfig` (schema of speculators 0.9.0,
speculators/models/eagle3/config.py); vLLM turns it into its own draft config in
vllm/transformers_utils/configs/speculators/ (base.py + algos.py `update_eagle3`):
  - `speculators_config` without a top-level `model_type` marks the format (vllm/transformers_utils/
    config.py), and `speculators_model_type: "eagle3"` selects the EAGLE-3 conversion;
  - `transformer_layer_config` is the one-layer Llama config of the draft (vLLM starts from it);
  - `speculators_config.proposal_methods[0].speculative_tokens` becomes vLLM's default
    num_speculative_tokens, and `speculators_config.verifier.name_or_path` is the target that
    `vllm serve <out_dir>` loads (None: pass the target yourself, see docs/draft_format.md);
  - `eagle_aux_hidden_state_layer_ids` is handed to vLLM's target as-is. vLLM captures the
    *input* of decoder layer k (vllm/model_executor/models/llama.py appends hidden + residual
    before layer k runs), i.e. the output of layer k - 1, and speculators uses the same ids (its
    resolve_target_layer_ids accepts k = num_layers, the final hidden state). Our aux_layer_ids
    are 0-based "output of layer i", so we write i + 1.
  - `norm_before_residual` is written explicitly: our decoder layer keeps the *un-normed*
    incoming hidden as the residual (DraftDecoderLayer.finish), which is False. speculators
    defaults to False, but vLLM's update_eagle3 defaults a missing key to True, so leaving it out
    would make vLLM run a different model.
  - `fc_norm` is the draft's own flag (EAGLE-3.1: one RMSNorm per aux layer before fc; speculators
    0.9.0's Eagle3DraftModel builds `fc_norm` as a ModuleList of num_aux norms over hidden_size with
    the layer config's rms_norm_eps, and vLLM's Eagle3 Llama draft reads the same key and names).
    `norm_before_fc` (one norm over the concatenation, exclusive with fc_norm) and `norm_output`
    are variants this draft does not have: always false.
out_dir/model.safetensors: speculators' state-dict names (Eagle3DraftModel): our `midlayer.*` is
`layers.0.*`; embed_tokens, fc, fc_norm.{i} (EAGLE-3.1), norm, lm_head, d2t (int64) and t2d (bool)
keep their names. export.load_draft reads the layout back (export.research_view, export.our_name).
speculators' own model class sizes fc as n_aux * hidden_size, so it loads only drafts whose
target_hidden_size equals hidden_size; vLLM reads target_hidden_size and loads either.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch

# export.py owns the check of a draft state dict against the config, and reading either layout back
# (load_draft); both formats share them.
from lib.drafts.eagle3.export import (OUR_LAYER_PREFIX, SPECULATORS_LAYER_PREFIX, SPECULATORS_MODEL_TYPE,
                                      checked_tensors, draft_config_json, write_export)
from lib.drafts.eagle3.model import Eagle3DraftConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The class name speculators 0.9 writes into `architectures`; vLLM overwrites it (update_eagle3).
ARCHITECTURE = "Eagle3DraftModel"
# The speculators release whose config schema this file writes.
SCHEMA_VERSION = "0.9.0"
# How many draft tokens vLLM proposes per step unless told otherwise (speculators' converter default).
DEFAULT_SPECULATIVE_TOKENS = 3
# Keys of our research-format config.json that make up the Llama layer config.
_LAYER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_hidden_layers", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
               "rope_parameters", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "attention_bias",
               "mlp_bias", "torch_dtype")


def speculators_name(name: str) -> str:
    """Our state-dict name -> speculators' (midlayer.* -> layers.0.*)."""
    return SPECULATORS_LAYER_PREFIX + name.removeprefix(OUR_LAYER_PREFIX) if name.startswith(OUR_LAYER_PREFIX) else name


def _verifier_architectures(verifier_path: Optional[str]) -> list[str]:
    """The target's architectures when verifier_path is a local model directory, else [] (a hub
    name is not resolved here: export must not need the network)."""
    if verifier_path is None:
        return []
    cfg_file = os.path.join(verifier_path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        return []
    with open(cfg_file) as f:
        return list(json.load(f).get("architectures") or [])


def speculators_config_json(config: Eagle3DraftConfig, dtype: torch.dtype, verifier_path: Optional[str],
                            speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS) -> dict[str, Any]:
    if not isinstance(speculative_tokens, int) or isinstance(speculative_tokens, bool) or speculative_tokens < 1:
        raise ValueError(f"speculative_tokens={speculative_tokens!r} must be an integer >= 1 (the number of draft "
                         f"tokens vLLM proposes per step, e.g. the training ttt_length)")
    research = draft_config_json(config, dtype)
    layer = {key: research[key] for key in _LAYER_KEYS}
    layer["dtype"] = research["torch_dtype"]  # transformers 5 name of torch_dtype
    return {
        "speculators_model_type": SPECULATORS_MODEL_TYPE,
        "speculators_version": SCHEMA_VERSION,
        "architectures": [ARCHITECTURE],
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in config.aux_layer_ids],
        "norm_before_residual": False,
        # EAGLE-3.1's per-aux-layer norm before fc, when the draft has it; the other variants
        # speculators and vLLM know (norm_before_fc is exclusive with fc_norm) it never has.
        "norm_before_fc": False,
        "fc_norm": config.fc_norm,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "torch_dtype": research["torch_dtype"],
        "dtype": research["torch_dtype"],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_path, "architectures": _verifier_architectures(verifier_path)},
        },
    }


def export_speculators(state: Mapping[str, torch.Tensor], config: Eagle3DraftConfig, out_dir: str,
                       dtype: torch.dtype = torch.bfloat16, verifier_path: Optional[str] = None,
                       speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS) -> str:
    """Write config.json + model.safetensors in the speculators format from a full (unsharded)
    draft state dict; returns out_dir.

    verifier_path: the target model (hub name or directory) recorded as the verifier; with it,
    `vllm serve <out_dir>` serves the target with this draft. Floating tensors are cast to
    `dtype`; d2t stays int64 and t2d bool. Files are written under temporary names and renamed,
    so a reader never sees half an export.
    """
    cfg = speculators_config_json(config, dtype, verifier_path, speculative_tokens)
    tensors = {speculators_name(name): t for name, t in checked_tensors(state, config, dtype).items()}
    return write_export(out_dir, tensors, cfg)
