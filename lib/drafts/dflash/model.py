"""The DFlash draft: config, layers, and one forward over blocks of [anchor, mask, ..., mask].

Shape (the method's recipe): a small stack of Qwen3-style decoder layers. The captured target states
of `target_layer_ids` are concatenated, projected by `fc` and normalised by `hidden_norm` into a
context; every layer's keys/values are [context ; block], its queries are the block only. Which keys a
query sees is the attention mask's business (lib/drafts/dflash/mask.py): the context strictly before
the block's anchor, and the whole own block (bidirectional). Input embedding and lm_head are the
target's, frozen; they are non-persistent buffers so they are never trained, exported or pushed.
Parameter names follow the layout DFlash loaders read (fc, hidden_norm, layers.i.*, norm).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lib.drafts.base import dataclass_from_keys
from lib.drafts.dflash.fused import ops

# attention(q, k, v) -> out with q [1, Hq, Q, D], k/v [1, Hkv, K, D]; the mask is bound inside.
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int  # draft decoder layers
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    target_hidden_size: int
    num_target_layers: int
    target_layer_ids: list[int]  # target decoder layers whose outputs form the context, in column order
    block_size: int = 16
    mask_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_hidden_layers", "max_position_embeddings", "vocab_size", "target_hidden_size",
                     "num_target_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DFlashConfig.{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"DFlashConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}: set draft.num_key_value_heads")
        if self.block_size < 2:
            raise ValueError(f"DFlashConfig.block_size={self.block_size} must be >= 2 (an anchor plus at least one "
                             f"mask token): set draft.options.block_size, e.g. 16")
        ids = [int(i) for i in self.target_layer_ids]
        if not ids or any(not 0 <= i < self.num_target_layers for i in ids):
            raise ValueError(f"DFlashConfig.target_layer_ids={self.target_layer_ids} must be a non-empty list in "
                             f"[0, {self.num_target_layers - 1}]: fix target.aux_layers or drop it")
        self.target_layer_ids = ids
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"DFlashConfig.mask_token_id={self.mask_token_id} is outside the vocabulary "
                             f"[0, {self.vocab_size - 1}]: set draft.options.mask_token_id")

    @property
    def fc_in_features(self) -> int:
        return len(self.target_layer_ids) * self.target_hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DFlashConfig":
        return dataclass_from_keys(cls, data, "DFlashConfig")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class DFlashAttention(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * c.head_dim, c.hidden_size, bias=False)
        # Qwen3: per-head norms before rotary, applied with it in one op (ops.norm_rope) so that
        # train.compile fuses the pair; the modules hold the weights under the loaders' names.
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, H] -> rotated keys and values [B, S, Hkv, D] (context and block share the projections)."""
        shape = (*x.shape[:-1], self.kv_heads, self.head_dim)
        k = ops.norm_rope(self.k_proj(x).view(shape), self.k_norm.weight, self.k_norm.eps, cos, sin)
        return k, self.v_proj(x).view(shape)

    def forward(self, x: torch.Tensor, ctx_kv: tuple[torch.Tensor, torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        q = self.q_proj(x).view(*x.shape[:-1], self.heads, self.head_dim)
        q = ops.norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin)
        k, v = self.keys_values(x, cos, sin)
        k, v = torch.cat([ctx_kv[0], k], 1), torch.cat([ctx_kv[1], v], 1)
        out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class DFlashLayer(nn.Module):
    def __init__(self, c: DFlashConfig):
        super().__init__()
        self.self_attn = DFlashAttention(c)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, context, ctx_cos, ctx_sin, cos, sin, attn: AttnFn):
        # The context enters every layer un-normalised by this layer's input norm: it is already
        # normalised once (hidden_norm), and each layer projects it with its own k/v.
        return self.forward_kv(x, self.self_attn.keys_values(context, ctx_cos, ctx_sin), cos, sin, attn)

    def forward_kv(self, x, ctx_kv, cos, sin, attn: AttnFn):
        """forward with this layer's context keys/values given (drafters cache them: they depend on
        the context alone, never on the block)."""
        x = x + self.self_attn(self.input_layernorm(x), ctx_kv, cos, sin, attn)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(ops.silu_mul(self.mlp.gate_proj(h), self.mlp.up_proj(h)))


class DFlashDraft(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        c = config
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # The target's, frozen; set with set_target_weights (training) or bind_lm_head (evaluation).
        self.register_buffer("embed_tokens", torch.empty(0), persistent=False)
        self.register_buffer("lm_head", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_target_weights(self, embedding: Optional[torch.Tensor], lm_head: Optional[torch.Tensor]) -> None:
        c = self.config
        for name, weight in (("embed_tokens", embedding), ("lm_head", lm_head)):
            if weight is None:
                continue
            if tuple(weight.shape) != (c.vocab_size, c.target_hidden_size):
                raise ValueError(f"target {name} has shape {tuple(weight.shape)}, the draft expects "
                                 f"[{c.vocab_size}, {c.target_hidden_size}]: use the target the draft was built for")
            setattr(self, name, weight.detach().to(self.fc.weight.device))

    @property
    def has_lm_head(self) -> bool:
        return self.lm_head.numel() > 0

    def context(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Captured target states [..., n_layers*H_t] -> the normalised context [..., H]."""
        return self.hidden_norm(self.fc(aux_hidden.to(self.fc.weight.dtype)))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens.numel() == 0:
            raise RuntimeError("DFlashDraft has no target embedding: call set_target_weights(embedding, lm_head)")
        return F.embedding(ids, self.embed_tokens).to(self.fc.weight.dtype)

    def head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen target lm_head [vocab, hidden] in `dtype`."""
        if not self.has_lm_head:
            raise RuntimeError("DFlashDraft has no target lm_head: call set_target_weights(embedding, lm_head)")
        return self.lm_head.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head_weight(hidden.dtype).t()

    def forward(self, block_ids: torch.Tensor, block_pos: torch.Tensor, aux_hidden: torch.Tensor,
                ctx_pos: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """block_ids/block_pos [B, Q] (blocks laid out one after the other), aux_hidden [B, K, n*H_t] with
        positions ctx_pos [B, K]; attn applies the [Q, K+Q] mask. Returns final hidden states [B, Q, H]."""
        return self.forward_context(block_ids, block_pos, self.context(aux_hidden), ctx_pos, attn)

    def context_kv(self, aux_hidden: torch.Tensor, ctx_pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotated context keys/values [B, K, Hkv, D] for captured states at ctx_pos."""
        context = self.context(aux_hidden)
        cos, sin = rope_cos_sin(ctx_pos, self.config.head_dim, self.config.rope_theta, context.dtype)
        return [layer.self_attn.keys_values(context, cos, sin) for layer in self.layers]

    def forward_kv(self, block_ids: torch.Tensor, block_pos: torch.Tensor,
                   ctx_kv: list[tuple[torch.Tensor, torch.Tensor]], attn: AttnFn) -> torch.Tensor:
        """forward with every layer's context keys/values given (context_kv); final hidden [B, Q, H]."""
        x = self.embed(block_ids)
        cos, sin = rope_cos_sin(block_pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer, kv in zip(self.layers, ctx_kv):
            x = layer.forward_kv(x, kv, cos, sin, attn)
        return self.norm(x)

    def forward_context(self, block_ids: torch.Tensor, block_pos: torch.Tensor, context: torch.Tensor,
                        ctx_pos: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """forward with the context already projected (drafters keep it across rounds)."""
        c = self.config
        x = self.embed(block_ids)
        cos, sin = rope_cos_sin(block_pos, c.head_dim, c.rope_theta, x.dtype)
        ctx_cos, ctx_sin = rope_cos_sin(ctx_pos, c.head_dim, c.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, context, ctx_cos, ctx_sin, cos, sin, attn)
        return self.norm(x)
