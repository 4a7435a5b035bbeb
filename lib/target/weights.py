"""The target's embedding and lm_head, read straight from its checkpoint (one tensor each, without
building the model) or taken from a loaded model. Drafts borrow the embedding; the trainer's target
head and the evaluation's target runner need the lm_head.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

EMBEDDING_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
LM_HEAD_NAMES = ("lm_head.weight", "model.language_model.lm_head.weight")


def _safetensors_files(path: str) -> dict[str, str]:
    """tensor name -> file for a local HF checkpoint directory (sharded or single file)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}: point target.path at a local HF checkpoint directory")
    names: dict[str, str] = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as handle:
            names.update({name: os.path.join(path, file) for name in handle.keys()})
    return names


def read_checkpoint_tensor(path: str, candidates: tuple[str, ...]) -> Optional[torch.Tensor]:
    """The first of `candidates` present in the checkpoint at `path`, read alone; None if none is."""
    from safetensors import safe_open
    names = _safetensors_files(path)
    for name in candidates:
        if name in names:
            with safe_open(names[name], framework="pt") as handle:
                return handle.get_tensor(name)
    return None


def _ties_embeddings(path: str) -> Optional[bool]:
    """tie_word_embeddings from the checkpoint's config.json (top level or text_config); None if unset."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        data = json.load(f)
    return data.get("tie_word_embeddings", (data.get("text_config") or {}).get("tie_word_embeddings"))


def load_target_embedding(target: Union[str, nn.Module]) -> torch.Tensor:
    """The target's input embedding [vocab, hidden]: from a loaded HF model or a checkpoint directory."""
    if isinstance(target, nn.Module):
        return target.get_input_embeddings().weight.detach()
    weight = read_checkpoint_tensor(target, EMBEDDING_NAMES)
    if weight is None:
        raise KeyError(f"target checkpoint {target!r} has none of {list(EMBEDDING_NAMES)}: cannot copy the embedding")
    return weight


def load_target_lm_head(target: Union[str, nn.Module]) -> torch.Tensor:
    """The target's output projection [vocab, hidden]; the embedding when the target ties them."""
    if isinstance(target, nn.Module):
        return target.get_output_embeddings().weight.detach()
    tied = _ties_embeddings(target)
    weight = None if tied else read_checkpoint_tensor(target, LM_HEAD_NAMES)
    if weight is None:
        if tied is False:
            raise KeyError(f"target checkpoint {target!r} sets tie_word_embeddings=false but has none of "
                           f"{list(LM_HEAD_NAMES)}")
        weight = load_target_embedding(target)
    return weight


def load_pretrained(auto_class, path: str, dtype: torch.dtype, device: torch.device, attn: str) -> nn.Module:
    """`auto_class.from_pretrained(path)` on `device`, in eval mode; on a GPU loaded straight there
    (device_map, which needs accelerate), not through a full copy in host memory."""
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    model = auto_class.from_pretrained(path, dtype=dtype, attn_implementation=attn, **placement)
    return model.to(device).eval()


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa") -> nn.Module:
    """A local checkpoint as a transformers causal LM (lm_head included) on `device`."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, dtype, device, attn)
