"""A lean decode path for dense Llama-family targets: the decoding behind sample_stream (tools/regenerate.py).

The transformers forward spends most of a batched decode step on the CPU: per layer its model, layer
and attention wrappers, the mask builders, kwargs plumbing, and a DynamicCache that grows by
concatenating the whole KV cache every step. At the Qwen3-8B shape on an H200 that made a 63-row
step ~100 ms for ~10 ms of GPU work. This path runs the same computation by calling the model's own
submodules (embedding, norms, q/k/v/o projections, q/k norms, MLP, rotary embedding, so every rope
scaling and norm stays transformers'), and keeps the cache in preallocated per-layer buffers written
in place.

Cache layout: per layer K and V [B, Hkv, capacity, D]. Rows are left-padded (sample_stream arranges
it), so every row's newest token sits in the same slot and one shared `length` says how many slots
are filled; the [B, S, L] visibility mask hides each row's padding. Padding slots hold zeros, never
uninitialised memory: a masked slot still multiplies into the attention output (0 * NaN is NaN).

Supported: model_type qwen3, qwen2, llama, mistral with full attention on every layer. Anything else
(MoE, gpt-oss, sliding windows, projections split by tensor parallelism) gets None from
lean_decoder() and stays on the transformers forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lib.eval.compiled_decode import CompiledLayers, fold_mask, folded_attention, rotate

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
# Decode steps and verify chunks take folded_attention (a key head's query heads folded into one attention
# that reads the cache once; a plain one when every head has its own keys); longer queries (prefills) repeat
# K/V instead. lib/eval/target.py's decode attention uses the same bound.
GROUPED_MAX_QUERIES = 16
# Growth when the buffers are full: geometric (so growing copies O(1) slots per step amortised) but by a
# quarter rather than doubling: at the 8B shape with 64 rows a 4k-slot cache is ~38 GB, and doubling
# would reserve up to that much again. Each step reads the whole cache anyway, so the copies stay small.
_GROWTH = 0.25
_MIN_HEADROOM = 64


def unsupported_reason(base: nn.Module) -> Optional[str]:
    """Why `base` (a transformers base model) cannot take the lean path, or None when it can."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        return f"layer types {sorted(set(layer_types))}: only full attention is supported"
    if layer_types is None and getattr(config, "sliding_window", None) is not None:
        return f"sliding_window={config.sliding_window}: only full attention is supported"
    if not hasattr(base, "rotary_emb") or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm")):
        return f"{type(base).__name__} lacks embed_tokens/layers/norm/rotary_emb"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    want = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
    for i, layer in enumerate(base.layers):
        attn = getattr(layer, "self_attn", None)
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if attn is None or not all(hasattr(layer, n) for n in parts) or not hasattr(attn, "o_proj"):
            return f"layer {i} ({type(layer).__name__}) is not a Llama-style decoder layer"
        for name, width in want.items():
            # Tensor-parallel shards (engine.tp) hold a slice of the heads: the full forward is theirs.
            if getattr(getattr(attn, name, None), "out_features", None) != width:
                return f"layer {i} self_attn.{name} does not produce {width} features (sharded or unknown)"
    return None


class _Norm:
    """An RMSNorm module as one fused op, F.rms_norm(x) * weight, where that equals the module.

    transformers' Llama-family RMSNorm is 8 ops (to float, pow, mean, add, rsqrt, mul, cast, mul); a
    decode step runs 4 per layer, and on a GPU each op is a kernel launch the CPU must issue. The fused
    form is checked against the module once, on this device and dtype: a module that differs (another
    formula, a hub kernel) is called as it is."""

    def __init__(self, module: nn.Module, like: torch.Tensor):
        self.module = module
        self.weight = getattr(module, "weight", None)
        self.eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        self.fused = self.weight is not None and self.eps is not None and self._matches(like)

    def _matches(self, like: torch.Tensor) -> bool:
        width = self.weight.shape[-1]
        x = torch.randn(4, 3, width, generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype) * 3
        with torch.no_grad():
            want, got = self.module(x), self._fused(x)
        tol = 2 * torch.finfo(want.dtype).eps * float(want.abs().max())
        return got.shape == want.shape and got.dtype == want.dtype and float((got - want).abs().max()) <= tol

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 inside rms_norm and rounded to x's dtype, then scaled: the module's order.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused(x) if self.fused else self.module(x)


class KVCache:
    """Per layer K and V [B, Hkv, capacity, D]; slots [0, length) are filled for every row."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def empty(cls, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, like: torch.Tensor) -> "KVCache":
        shape = (rows, kv_heads, capacity, head_dim)
        return cls([like.new_empty(shape) for _ in range(layers)], [like.new_empty(shape) for _ in range(layers)], 0)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, need: int) -> None:
        """Make room for `need` slots; one layer is copied at a time, so the peak is one layer's buffer."""
        if need <= self.capacity:
            return
        capacity = _with_headroom(need)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :self.length].copy_(old[:, :, :self.length])
                store[i] = new

    def join(self, other: "KVCache") -> None:
        """Append other's rows below these, both left-padded (zeros) to the wider of the two."""
        width = max(self.length, other.length)
        capacity = max(_with_headroom(width), self.capacity)
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for i, (a, b) in enumerate(zip(mine, theirs)):
                new = a.new_empty(a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3])
                for rows, src, filled in ((new[:a.shape[0]], a, self.length), (new[a.shape[0]:], b, other.length)):
                    rows[:, :, :width - filled].zero_()
                    rows[:, :, width - filled:width].copy_(src[:, :, :filled])
                mine[i] = new
        self.length = width

    def keep(self, index: torch.Tensor, first: int) -> None:
        """Keep the rows at `index` and drop the leading `first` slots (no kept row sees them)."""
        length = self.length - first
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(len(index), old.shape[1], old.shape[2], old.shape[3])
                new[:, :, :length].copy_(old[:, :, first:self.length].index_select(0, index))
                store[i] = new
        self.length = length


def _with_headroom(need: int) -> int:
    return need + max(_MIN_HEADROOM, int(need * _GROWTH))


class LeanDecoder:
    """The target's forward for decoding, through its own submodules and a KVCache (see the module doc)."""

    def __init__(self, base: nn.Module, lm_head: torch.Tensor, compile: bool = False):
        reason = unsupported_reason(base)
        if reason is not None:
            raise ValueError(f"the lean decode path cannot run this target: {reason}; decode through "
                             f"TargetRunner.last_logits (sample_stream(..., lean=False)) instead")
        config = base.config
        self.base, self.lm_head = base, lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = list(base.layers[:config.num_hidden_layers])
        like = base.embed_tokens.weight
        # Per layer: input, post-attention, q and k norms (the last two Qwen3 only, None elsewhere).
        self.norms = [tuple(_Norm(m, like) if m is not None else None
                            for m in (l.input_layernorm, l.post_attention_layernorm,
                                      getattr(l.self_attn, "q_norm", None), getattr(l.self_attn, "k_norm", None)))
                      for l in self.layers]
        self.final_norm = _Norm(base.norm, like)
        # compile: the one-token decode step's layers run compiled (lib/eval/compiled_decode.py).
        self.compiled = CompiledLayers.build(self.layers, self.norms, getattr(config, "hidden_act", None), self.heads,
                                             self.kv_heads, self.head_dim) if compile else None

    def last_logits(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                    cache: Optional[KVCache]) -> tuple[torch.Tensor, KVCache]:
        """As TargetRunner.last_logits: ids/positions [B, S], visible [B, S, L] with L = cached + S ->
        float32 logits of each row's last slot [B, V] and the cache holding the S new slots."""
        b, s = ids.shape
        cached = 0 if cache is None else cache.length
        if visible.shape != (b, s, cached + s):
            raise ValueError(f"visible has shape {tuple(visible.shape)}, expected {(b, s, cached + s)} "
                             f"(rows, new slots, cached {cached} + new): build it with visible_keys(valid, {s})")
        hidden = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(hidden, positions)
        half = self.head_dim // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]  # [B, 1, S, D]
        # [B, 1, S, L], built once per step. Rows start at multiples of 16 elements: CUDA's memory-efficient
        # kernel otherwise pads a copy of the mask on every call, i.e. once per layer.
        width = visible.shape[-1]
        mask = torch.zeros(b, s, -(-width // 16) * 16, dtype=hidden.dtype, device=hidden.device)[..., :width]
        mask = mask.masked_fill_(~visible, torch.finfo(hidden.dtype).min)[:, None]
        group = self.heads // self.kv_heads
        fold = s <= GROUPED_MAX_QUERIES
        if fold:
            mask = fold_mask(mask, group)  # once per step, not per layer
        if cache is None:
            cache = KVCache.empty(len(self.layers), b, self.kv_heads, self.head_dim, _with_headroom(s), hidden)
        else:
            cache.reserve(cached + s)
        if s == 1 and cached and self.compiled is not None:
            flat = mask.contiguous()  # the compiled layers guard on strides: a fresh contiguous mask each step
            # TargetRunner.decoding() keeps the engine's compiled layers eager; these are compiled for this.
            with torch.compiler.set_stance("default"):
                for i in range(len(self.layers)):
                    hidden = self.compiled.layer(i, hidden, cos, sin, flat, cache.keys[i], cache.values[i], cached)
            return self._finish(hidden, cache, cached + s)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            input_norm, post_norm, q_norm, k_norm = self.norms[i]
            x = input_norm(hidden)
            q = attn.q_proj(x).view(b, s, self.heads, self.head_dim)
            k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
            cache.keys[i][:, :, cached:cached + s].copy_(k)
            cache.values[i][:, :, cached:cached + s].copy_(v)
            if cached:
                k, v = cache.keys[i][:, :, :cached + s], cache.values[i][:, :, :cached + s]
            if fold:
                out = folded_attention(q, k, v, mask, attn.scaling)
            else:
                if group > 1:
                    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(post_norm(hidden))
        return self._finish(hidden, cache, cached + s)

    def _finish(self, hidden: torch.Tensor, cache: KVCache, length: int) -> tuple[torch.Tensor, KVCache]:
        cache.length = length
        last = self.final_norm(hidden[:, -1])
        return F.linear(last, self.lm_head).float(), cache


def lean_decoder(base: nn.Module, lm_head: torch.Tensor, compile: bool = False) -> Optional[LeanDecoder]:
    """A LeanDecoder when the target is supported, else None (the caller keeps the transformers forward)."""
    return None if unsupported_reason(base) is not None else LeanDecoder(base, lm_head, compile)
