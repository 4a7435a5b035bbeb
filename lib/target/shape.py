"""The target's shape (hidden size, layers, vocab, dtype) read from its config alone.

Engine and trainer both derive the handoff specs from this and the draft's capture plan, without
loading weights, so the two sides agree by construction; the handoff's start-up check catches any drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.config import ConfigError, TargetConfig, resolve_target_dtype

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """target.dtype -> torch dtype; 'auto' is bf16 on GPU (the production path) and fp32 on CPU."""
    # A run's config arrives resolved (lib.config.resolve); library callers may still pass auto or a
    # short spelling (bf16). The auto rule and the accepted names are lib.config's.
    return _DTYPES[resolve_target_dtype(name, device.type).value]


@dataclass(frozen=True)
class TargetShape:
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: torch.dtype


def load_hf_config(target: TargetConfig):
    from transformers import AutoConfig

    if target.path is not None:
        return AutoConfig.from_pretrained(target.path)
    spec = dict(target.hf_config or {})
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ConfigError("target.hf_config.model_type=None: set the architecture, e.g. qwen3 or llama")
    return AutoConfig.for_model(model_type, **spec)


def target_shape(target: TargetConfig, device: torch.device, hf_config=None) -> TargetShape:
    hf = hf_config if hf_config is not None else load_hf_config(target)
    return TargetShape(hf.hidden_size, hf.num_hidden_layers, hf.vocab_size, resolve_dtype(target.dtype, device))
