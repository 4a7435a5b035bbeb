"""The EAGLE-3 draft model: config, layers and the inference entry point.

Parameter names are the checkpoint names that sglang and vLLM load as an EAGLE-3 Llama draft
(`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`, `embed_tokens`), so export is a plain
state-dict write. EAGLE-3.1 (`fc_norm=True`) adds `fc_norm.{i}.weight`, one RMSNorm gain per aux
layer over the target's hidden size, applied to each captured state before `fc` (speculators' and
vLLM's names and placement). The training-time-test unroll lives in loss.py; this module only
provides the pieces it composes (projection, embedding, one decoder layer split around its
attention, logits).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lib.drafts.base import dataclass_from_keys
from lib.drafts.eagle3.attention import DraftKVCache, TTTAttention, cached_causal_attention
from lib.drafts.eagle3.fused import ops
from lib.drafts.eagle3.rope import (normalise_rope_scaling, rope_cos_sin, rope_from_hf_config,
                                   rope_inverse_frequencies, rope_magnitude)

# Draft fields that must match the target (the embedding is copied from it, fc reads its states).
TARGET_BOUND_FIELDS = ("hidden_size", "vocab_size", "target_hidden_size", "draft_vocab_size", "aux_layer_ids")


@dataclass
class Eagle3DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the target's vocabulary (embedding rows)
    draft_vocab_size: int  # rows of lm_head
    target_hidden_size: int
    aux_layer_ids: list[int]  # target decoder layers whose outputs feed fc (0-based, "output of layer i")
    rope_scaling: Optional[dict[str, Any]] = None  # None, or {"rope_type": "llama3" | "yarn", ...} (rope.py)
    hidden_act: str = "silu"
    # EAGLE-3.1: RMSNorm each aux layer's state on its own (one gain of target_hidden_size per layer, eps
    # rms_norm_eps) before fc fuses them, against the magnitude drift between depths (speculators' fc_norm).
    fc_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "vocab_size", "draft_vocab_size", "target_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Eagle3DraftConfig.{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Eagle3DraftConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}: set draft.num_key_value_heads to a "
                             f"divisor of it")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"Eagle3DraftConfig.draft_vocab_size={self.draft_vocab_size} exceeds the target "
                             f"vocab_size={self.vocab_size}: use at most {self.vocab_size}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"Eagle3DraftConfig rms_norm_eps={self.rms_norm_eps}, rope_theta={self.rope_theta}: "
                             f"both must be > 0")
        ids = list(self.aux_layer_ids) if self.aux_layer_ids is not None else []
        if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
            raise ValueError(f"Eagle3DraftConfig.aux_layer_ids={self.aux_layer_ids!r} must be a non-empty list of "
                             f"target layer indices >= 0, e.g. [1, L/2-1, L-4]")
        self.aux_layer_ids = ids
        if self.hidden_act != "silu":
            raise ValueError(f"Eagle3DraftConfig.hidden_act={self.hidden_act!r}: only 'silu' is implemented")
        if not isinstance(self.fc_norm, bool):
            raise ValueError(f"Eagle3DraftConfig.fc_norm={self.fc_norm!r} must be true or false")
        self.rope_scaling = normalise_rope_scaling(self.rope_scaling)

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def fc_in_features(self) -> int:
        return self.num_aux * self.target_hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Eagle3DraftConfig":
        return dataclass_from_keys(cls, data, "Eagle3DraftConfig")

    @classmethod
    def from_target(cls, hf_config: Any, draft_vocab_size: int, aux_layer_ids: list[int],
                    overrides: Optional[dict[str, Any]] = None) -> "Eagle3DraftConfig":
        """Derive the draft's shape from a transformers target config (Llama, Qwen2/3 and alikes).

        `overrides` maps field names to values (None = keep the target's); fields bound to the target
        (hidden size, vocabularies, aux layers) cannot be overridden. head_dim: override, else the
        target's explicit head_dim, else hidden_size // num_attention_heads.
        """
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"draft override {key!r} is not a draft config field; use one of "
                                 f"{sorted(known - set(TARGET_BOUND_FIELDS))}")
            if key in TARGET_BOUND_FIELDS:
                raise ValueError(f"draft override {key!r} is derived from the target and cannot be overridden")
        hidden = int(hf_config.hidden_size)
        heads = int(overrides.get("num_attention_heads", hf_config.num_attention_heads))
        target_head_dim = getattr(hf_config, "head_dim", None)
        head_dim = overrides.get("head_dim", target_head_dim or hidden // heads)
        rope_theta, rope_scaling = rope_from_hf_config(hf_config)
        values: dict[str, Any] = dict(
            hidden_size=hidden,
            intermediate_size=int(hf_config.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(hf_config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=rope_theta,
            max_position_embeddings=int(hf_config.max_position_embeddings),
            vocab_size=int(hf_config.vocab_size),
            draft_vocab_size=min(int(draft_vocab_size), int(hf_config.vocab_size)),
            target_hidden_size=hidden,
            aux_layer_ids=list(aux_layer_ids),
            rope_scaling=rope_scaling,
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
        )
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            values["num_key_value_heads"] = min(values["num_key_value_heads"], heads)
        values.update(overrides)
        return cls(**values)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, head_dim]; cos/sin [..., head_dim] (rotate-half layout, as HF Llama and sglang)."""
    return ops.rope(x, cos, sin)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class DraftAttention(nn.Module):
    """Projections of the draft's attention; q/k/v read the 2H-wide cat(norm(embeds), norm(hidden))."""

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., 2H] -> q [..., Hq, D], k and v [..., Hkv, D], with rotary positions applied to q and k."""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class DraftMLP(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DraftDecoderLayer(nn.Module):
    """The draft's one decoder layer, split around attention so callers choose how keys are attended."""

    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DraftMLP(config)

    def attention_inputs(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        return self.self_attn.project(x, cos, sin)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn_out [..., Hq, D]; residual = the un-normed input hidden. Returns the pre-norm output hidden."""
        h = residual + self.self_attn.o_proj(attn_out.flatten(-2))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # copied from the target, never trained
        self.fc = nn.Linear(config.fc_in_features, config.hidden_size, bias=False)
        # EAGLE-3.1: fc_norm[j] normalises aux layer j's columns of the fc input (None for plain EAGLE-3).
        self.fc_norm: Optional[nn.ModuleList] = nn.ModuleList(
            RMSNorm(config.target_hidden_size, config.rms_norm_eps) for _ in range(config.num_aux)
        ) if config.fc_norm else None
        self.midlayer = DraftDecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        # A plain attribute, not a buffer: module.to(bfloat16) must not round the rotary frequencies.
        self._rope_inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self._rope_magnitude = rope_magnitude(config.rope_scaling)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Linear weights ~ N(0, std) (the HF Llama initialiser), norms at one; the embedding is zeroed
        until load_embedding copies the target's."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)
            self.embed_tokens.weight.zero_()

    def load_embedding(self, weight: torch.Tensor) -> None:
        expected = tuple(self.embed_tokens.weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(f"target embedding has shape {tuple(weight.shape)}, the draft expects {expected} "
                             f"(vocab_size, hidden_size): the draft config was derived from another target")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def load_head_rows(self, target_lm_head: torch.Tensor) -> None:
        """lm_head <- the target's lm_head rows of the draft vocabulary (set_vocab_map first); d2t holds
        offsets, target id = draft id + d2t, as the served format does."""
        if target_lm_head.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"target lm_head has shape {tuple(target_lm_head.shape)}, the draft expects "
                             f"{(self.config.vocab_size, self.config.hidden_size)} (vocab_size, hidden_size)")
        rows = torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t
        with torch.no_grad():
            self.lm_head.weight.copy_(target_lm_head.to(self.d2t.device)[rows])

    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        if d2t.shape != self.d2t.shape or t2d.shape != self.t2d.shape:
            raise ValueError(f"vocab map shapes d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)} do not match the draft's "
                             f"{tuple(self.d2t.shape)}, {tuple(self.t2d.shape)}: rebuild it for draft_vocab_size="
                             f"{self.config.draft_vocab_size}")
        with torch.no_grad():
            self.d2t.copy_(d2t)
            self.t2d.copy_(t2d)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        if self._rope_inv_freq.device != position_ids.device:
            self._rope_inv_freq = self._rope_inv_freq.to(position_ids.device)
        return rope_cos_sin(self._rope_inv_freq, position_ids, dtype, self._rope_magnitude)

    def project_hidden(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        if aux_hidden.shape[-1] != self.config.fc_in_features:
            raise ValueError(f"aux hidden width {aux_hidden.shape[-1]} != n_aux*target_hidden_size="
                             f"{self.config.fc_in_features}: the engine captures other layers than the draft expects")
        x = aux_hidden.to(self.fc.weight.dtype)
        if self.fc_norm is not None:
            # One RMSNorm per aux layer: view the columns as [..., n_aux, H_target] and normalise each
            # layer's block with its own gain in one pass (equal to normalising the chunks one by one).
            gains = torch.stack([norm.weight for norm in self.fc_norm])
            x = ops.rms_norm(x.unflatten(-1, (self.config.num_aux, self.config.target_hidden_size)), gains,
                             self.config.rms_norm_eps).flatten(-2)
        return self.fc(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids).to(self.fc.weight.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from the pre-norm output hidden."""
        return self.lm_head(self.norm(hidden))

    def draft_to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def forward(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, position_ids: torch.Tensor,
                attention: TTTAttention, step_rows: list[torch.Tensor],
                head: Optional[Callable[[int, torch.Tensor], Any]] = None, recompute: bool = False) -> list[Any]:
        """The training-time-test unroll over a packed batch (alignment: lib/drafts/eagle3/loss.py).

        A module forward, so FSDP's hooks gather the parameters. input_ids, position_ids [T];
        aux_hidden [T, n_aux*H_target]; attention: this batch's TTTAttention; step_rows[i]: the rows
        that carry a loss at step i. Returns per step head(i, pre-norm hidden of those rows); the default
        head gives their draft logits [N_i, draft_vocab]. recompute: keep only the inputs of each step's
        q/k/v projection (with its norms) and of its output projection and MLP, and run them again in
        backward (their activations are most of a long context's memory).
        """
        head = head or (lambda _step, rows_hidden: self.compute_logits(rows_hidden))
        finish = self.midlayer.finish
        tokens = input_ids.shape[0]
        hidden = self.project_hidden(aux_hidden)
        positions = torch.arange(tokens, device=input_ids.device)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        for i, rows in enumerate(step_rows):
            # Step i of row t is the i-th chained draft step after position t, which a server runs at
            # position t + i: query and new key rotate there, and the keys of earlier steps keep the
            # positions they were written at.
            cos, sin = self.rope(position_ids + i, hidden.dtype)
            # Rows whose shifted source leaves the batch read a filler token: they never carry a loss,
            # and only their own later-step (diagonal) keys, equally loss-free, ever attend to them.
            step_ids = input_ids[(positions + 1 + i).clamp(max=tokens - 1)]
            if recompute:
                q, k, v = checkpoint(self.midlayer.attention_inputs, self.embed(step_ids), hidden, cos, sin,
                                     use_reentrant=False)
            else:
                q, k, v = self.midlayer.attention_inputs(self.embed(step_ids), hidden, cos, sin)
            keys.append(k)
            values.append(v)
            attn_out = attention(q, keys, values)
            if recompute:
                hidden = checkpoint(finish, attn_out, hidden, use_reentrant=False)
            else:
                hidden = finish(attn_out, hidden)
            outputs.append(head(i, hidden[rows]))
        return outputs

    @torch.no_grad()
    def forward_infer(self, input_ids: torch.Tensor, hidden: torch.Tensor, is_projected: bool,
                      position_ids: torch.Tensor, kv_cache: Optional[DraftKVCache] = None):
        """One draft forward for speculative decoding (docs/draft_format.md).

        input_ids [B, S]: token x_{p+1} at the row of position p; hidden [B, S, n_aux*H_target] (target
        aux states, is_projected=False) or [B, S, H] (the draft's own out_hidden, is_projected=True);
        position_ids [B, S]; the cache holds earlier positions of these B rows (common length).
        Returns (draft logits [B, S, draft_vocab], out_hidden [B, S, H], kv_cache).
        """
        h = hidden.to(self.fc.weight.dtype) if is_projected else self.project_hidden(hidden)
        if h.shape[-1] != self.config.hidden_size:
            raise ValueError(f"hidden width {h.shape[-1]} != hidden_size {self.config.hidden_size}: pass "
                             f"is_projected=False for target aux states")
        cos, sin = self.rope(position_ids, h.dtype)
        q, k, v = self.midlayer.attention_inputs(self.embed(input_ids), h, cos, sin)
        cache = kv_cache if kv_cache is not None else DraftKVCache()
        keys, values = cache.append(k, v)
        attn = cached_causal_attention(q, keys, values, self.midlayer.self_attn.scale)
        out_hidden = self.midlayer.finish(attn, h)
        return self.compute_logits(out_hidden), out_hidden, cache
