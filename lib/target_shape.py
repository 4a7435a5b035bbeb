"""The target's shape (hidden size, layers, vocab, aux layers, dtype) read from its config alone.

Engine and trainer both derive the handoff specs from this, without loading weights, so the two
sides agree by construction; the handoff's start-up check catches any drift.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.config import ConfigError, TargetConfig

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


@dataclass(frozen=True)
class TargetShape:
    hidden_size: int
    num_layers: int
    vocab_size: int
    aux_layers: tuple[int, ...]
    dtype: torch.dtype

    @property
    def n_aux(self) -> int:
        return len(self.aux_layers)


def load_hf_config(target: TargetConfig):
    from transformers import AutoConfig

    if target.path is not None:
        return AutoConfig.from_pretrained(target.path)
    spec = dict(target.hf_config or {})
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise ConfigError("target.hf_config.model_type=None: set the architecture, e.g. qwen3 or llama")
    return AutoConfig.for_model(model_type, **spec)


def default_aux_layers(num_layers: int) -> list[int]:
    return [1, num_layers // 2 - 1, num_layers - 4]


def resolve_dtype(target: TargetConfig, device: torch.device) -> torch.dtype:
    if target.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if target.dtype not in _DTYPES:
        raise ConfigError(f"target.dtype={target.dtype!r}: use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[target.dtype]


def target_shape(target: TargetConfig, device: torch.device, hf_config=None) -> TargetShape:
    hf = hf_config if hf_config is not None else load_hf_config(target)
    layers = hf.num_hidden_layers
    aux = list(target.aux_layers) if target.aux_layers is not None else default_aux_layers(layers)
    bad = [i for i in aux if not 0 <= i < layers]
    if bad or not aux:
        raise ConfigError(f"target.aux_layers={aux}: each must be a layer index in [0, {layers}), e.g. "
                          f"{default_aux_layers(layers)}")
    return TargetShape(hf.hidden_size, layers, hf.vocab_size, tuple(aux), resolve_dtype(target, device))
