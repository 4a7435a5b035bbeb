"""The MoE routers of the grouped path: transformers' formulas with the top-k as one small kernel.

Each known router class keeps its module (weights, attributes) and gets a forward that computes what
transformers' forward computes, term for term, except that torch.topk is lib/engine/moe_kernels.py's
topk_rows (exact: the same values and experts, the kernel only picks among equal values by lowest
expert id). The classes are known by name because their routing rules differ (softmax before or
after the top-k, renormalised or not); any other router keeps transformers' forward.
tests/test_moe_kernels.py holds each formula equal to transformers' own router.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lib.engine.forward_swap import ForwardSwap
from lib.engine.moe_kernels import topk_rows


def _softmax_then_topk(self, hidden_states):
    """Qwen2/Qwen3-MoE-style: softmax over all experts in fp32, top-k, optionally renormalised."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, experts = topk_rows(probs, self.top_k)
    if self.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), experts


def _topk_then_softmax(self, hidden_states):
    """gpt-oss-style: top-k of the biased logits, softmax over the k chosen in the logits' dtype."""
    logits = F.linear(hidden_states, self.weight, self.bias)
    top, experts = topk_rows(logits, self.top_k)
    return logits, F.softmax(top, dim=1, dtype=top.dtype), experts


ROUTER_FORWARDS: dict[str, Callable] = {
    "Qwen3MoeTopKRouter": _softmax_then_topk,
    "Qwen2MoeTopKRouter": _softmax_then_topk,
    "GptOssTopKRouter": _topk_then_softmax,
}

_SWAP = ForwardSwap("Fast", lambda cls: ROUTER_FORWARDS[cls.__name__])


def routers(layers: nn.ModuleList) -> list[nn.Module]:
    return [m for layer in layers for m in layer.modules() if type(m).__name__ in ROUTER_FORWARDS or _SWAP.swapped(m)]


def router_swapped(module: nn.Module) -> bool:
    """Whether `module` runs the engine's router forward (which returns logits, weights, experts)."""
    return _SWAP.swapped(module)


def install_fast_routers(layers: nn.ModuleList) -> int:
    """Give every known router under `layers` the kernel top-k (lib/engine/forward_swap.py); returns how
    many routers run it."""
    found = routers(layers)
    _SWAP.apply(found)
    return len(found)
