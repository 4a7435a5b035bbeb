"""The lean decode step's decoder layer under torch.compile (tools/regenerate.py --compile).

A batched decode step of the lean path (lib/eval/fast_decode.py) is launch-bound on a GPU: about 50
small operations per layer, each a kernel the CPU must issue, against about 10 ms of GPU work for the
whole 8B-shape step at 64 rows. Compiled, each layer's elementwise work (norms, rotary, SiLU, the
residual adds) fuses into a few kernels around the matmuls and the attention.

Only the one-token decode step (S = 1 with a cache) is compiled; prefills stay eager (few calls, many
shapes). The layer is a function of plain tensors (LayerWeights), never of the layer module or the
norm objects, so one graph serves every layer: a compiled function guards on what it reads, and
per-layer objects would make it compile per layer until dynamo's recompile limit. The cache writes
stay outside the compiled code (an input mutated inside it may be copied back whole), so a layer is
two compiled calls around two in-place slot writes.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("specdraft.eval")

# Every sdpa backend but cuDNN's. For masked bf16 attention on Hopper torch picks cuDNN, whose graph setup
# is keyed on exact shapes while a decode step's key width grows by one each step: ~1.3 ms of CPU on every
# layer call, 47 ms of a 62 ms Qwen3-8B step at 64 rows (profiled on the H200, 2026-11-29,
# bench/decode_step.py). The memory-efficient kernel serves masks with no per-shape setup. Speculative
# decoding runs the drafters under it too (lib/eval/spec_decode.py).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor, x * cos + rotate_half(x) * sin, in 4 ops instead
    of 7: rotate_half(x) = cat(-x2, x1) is x's halves swapped (one flip) with the first negated, and that
    sign is folded into signed_sin = cat(-sin1, sin2) once per step (negation is exact, so equal bits)."""
    d = x.shape[-1]
    return x * cos + x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2) * signed_sin


def fold_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """A [B, 1, S, L] mask for folded_attention's queries: each of a key head's `group` query heads sees
    the same S rows, so they repeat along the folded axis ([B, 1, group*S, L]); S = 1 broadcasts as is."""
    b, _, s, width = mask.shape
    if s == 1:
        return mask
    return mask[:, :, None].expand(b, 1, group, s, width).reshape(b, 1, group * s, width)


def folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: Optional[float]) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, Hkv, L, D], mask from fold_mask -> [B, H, S, D].

    With an explicit mask, grouped-query attention has no fused kernel: sdpa would need K/V repeated
    H/Hkv times (a copy of the whole cache per layer). The query heads sharing a key head are adjacent
    (repeat_kv's order), so they fold into the query axis instead and one masked kernel reads the cache once."""
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    with sdpa_kernel(DECODE_BACKENDS):
        out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads * s, d), k, v, attn_mask=mask,
                                             scale=scale)
    return out.reshape(b, heads, s, d)


class LayerWeights(NamedTuple):
    """One decoder layer's tensors (references to the model's own, no copies) and its norms' epsilon."""
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    q: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k: torch.Tensor
    k_bias: Optional[torch.Tensor]
    v: torch.Tensor
    v_bias: Optional[torch.Tensor]
    o: torch.Tensor
    o_bias: Optional[torch.Tensor]
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    eps: float


def layer_weights(layer: nn.Module, norms: tuple, hidden_act: Optional[str]) -> LayerWeights | str:
    """The layer's LayerWeights, or why it cannot run compiled (it then runs the lean eager path).

    `norms` are the lean path's checked norms (input, post-attention, q, k; None where absent): only
    ones whose fused form equals the module can be written as F.rms_norm here."""
    if hidden_act != "silu":
        return f"hidden_act={hidden_act!r} (the compiled layer writes SiLU)"
    present = [n for n in norms if n is not None]
    if not all(n.fused for n in present) or len({n.eps for n in present}) != 1:
        return "a norm that is not a plain RMSNorm, or norms with different epsilons"
    attn, mlp = layer.self_attn, layer.mlp
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, nn.Linear) for m in linears):
        return f"{type(attn).__name__}/{type(mlp).__name__} without plain Linear projections"
    if any(m.bias is not None for m in linears[4:]):
        return "MLP projections with biases"
    q, k, v, o, gate, up, down = linears
    weight = lambda n: None if n is None else n.weight  # noqa: E731
    return LayerWeights(norms[0].weight, norms[1].weight, weight(norms[2]), weight(norms[3]), q.weight, q.bias,
                        k.weight, k.bias, v.weight, v.bias, o.weight, o.bias, gate.weight, up.weight, down.weight,
                        float(present[0].eps))


def _project(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: LayerWeights, heads: int,
             kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, 1, H] -> rotated q [B, heads, 1, D], rotated k and v [B, kv_heads, 1, D]."""
    b = hidden.shape[0]
    x = w.input_norm * F.rms_norm(hidden, (hidden.shape[-1],), eps=w.eps)
    q = F.linear(x, w.q, w.q_bias).view(b, 1, heads, head_dim)
    k = F.linear(x, w.k, w.k_bias).view(b, 1, kv_heads, head_dim)
    v = F.linear(x, w.v, w.v_bias).view(b, 1, kv_heads, head_dim).transpose(1, 2)
    if w.q_norm is not None:
        q = w.q_norm * F.rms_norm(q, (head_dim,), eps=w.eps)
        k = w.k_norm * F.rms_norm(k, (head_dim,), eps=w.eps)
    return rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin), v


def _attend(hidden: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
            w: LayerWeights, scale: float) -> torch.Tensor:
    """The rest of the layer: folded attention over the filled slots keys/values [B, kv_heads, L, D],
    output projection, MLP, residuals."""
    b, heads, _, d = q.shape
    out = folded_attention(q, keys, values, mask, scale)
    hidden = hidden + F.linear(out.reshape(b, 1, heads * d), w.o, w.o_bias)
    x = w.post_norm * F.rms_norm(hidden, (hidden.shape[-1],), eps=w.eps)
    return hidden + F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)


class CompiledLayers:
    """The decode step's layers as two compiled functions shared by every layer."""

    def __init__(self, weights: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, scale: float):
        self.weights, self.heads, self.kv_heads, self.head_dim, self.scale = weights, heads, kv_heads, head_dim, scale
        self._project = torch.compile(_project, dynamic=True)
        self._attend = torch.compile(_attend, dynamic=True)

    @classmethod
    def build(cls, layers: list[nn.Module], norms: list[tuple], hidden_act: Optional[str], heads: int,
              kv_heads: int, head_dim: int) -> Optional["CompiledLayers"]:
        """CompiledLayers for these layers, or None (logged once) when one of them cannot be compiled."""
        weights = [layer_weights(layer, n, hidden_act) for layer, n in zip(layers, norms)]
        reasons = [r for r in weights if isinstance(r, str)]
        if reasons:
            log.warning("decode compile: not available for this target (%s); decoding stays eager", reasons[0])
            return None
        scales = {float(layer.self_attn.scaling) for layer in layers}
        if len(scales) != 1:
            log.warning("decode compile: layers with different attention scales; decoding stays eager")
            return None
        return cls(weights, heads, kv_heads, head_dim, scales.pop())

    def layer(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor, cached: int) -> torch.Tensor:
        """Layer i for one new token per row: writes slot `cached` of keys/values [B, kv_heads, C, D]."""
        w = self.weights[i]
        q, k, v = self._project(hidden, cos, sin, w, self.heads, self.kv_heads, self.head_dim)
        keys[:, :, cached:cached + 1].copy_(k)
        values[:, :, cached:cached + 1].copy_(v)
        return self._attend(hidden, q, keys[:, :, :cached + 1], values[:, :, :cached + 1], mask, w, self.scale)
