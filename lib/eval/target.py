"""The target model as speculative decoding drives it: verify forwards with one-shot aux capture."""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lib.eval.compiled_decode import fold_mask, folded_attention
from lib.eval.fast_decode import GROUPED_MAX_QUERIES, LeanDecoder, lean_decoder

_DECODE_ATTN = "decode_grouped"


def _grouped_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface for decoding: q [B, H, S, D], k/v [B, Hkv, L, D] -> [B, S, H, D].

    transformers' sdpa copies every cached key and value H/Hkv times per layer under an explicit mask,
    which dominates a batched decode step over a long cache; a few queries take folded_attention
    (lib/eval/compiled_decode.py) instead, which reads the cache once.
    """
    heads, s = query.shape[1], query.shape[2]
    kv_heads = key.shape[1]
    if s > GROUPED_MAX_QUERIES or attention_mask is None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = folded_attention(query, key, value, fold_mask(attention_mask, heads // kv_heads), scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_DECODE_ATTN, _grouped_query_attention)


class TargetRunner:
    """The target as decoding needs it: a base model (embed_tokens, layers, norm) and its output
    projection. Aux-layer outputs are caught by forward hooks that live for one forward only, so the
    engine's own capture hooks on the same model are left alone."""

    def __init__(self, base: nn.Module, lm_head: torch.Tensor):
        missing = [name for name in ("embed_tokens", "layers", "norm") if not hasattr(base, name)]
        if missing:
            raise ValueError(f"target base model {type(base).__name__} lacks {missing}: pass a Llama/Qwen-style "
                             f"decoder (model.embed_tokens, model.layers, model.norm)")
        hidden = base.embed_tokens.weight.shape[1]
        if lm_head.dim() != 2 or lm_head.shape[1] != hidden:
            raise ValueError(f"lm_head has shape {tuple(lm_head.shape)}, expected [vocab, {hidden}]: pass the "
                             f"target's output projection (load_target_lm_head(target.path))")
        self.base = base
        self.lm_head = lm_head.detach()
        self._lean: dict[bool, Optional[LeanDecoder]] = {}  # by compile

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> "TargetRunner":
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings: pass an AutoModelForCausalLM")
        return cls(model.base_model, head.weight)

    @classmethod
    def from_backend(cls, backend: Any, lm_head: torch.Tensor) -> "TargetRunner":
        """An engine backend (lib.engine.hf.HFBackend) loads no lm_head; the caller supplies it."""
        weight = backend.model.embed_tokens.weight
        return cls(backend.model, lm_head.to(device=weight.device, dtype=weight.dtype))

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    def cost_parameters(self) -> int:
        """Weights a token's forward multiplies by: all but the embedding lookup, plus the lm_head."""
        embed = self.base.embed_tokens.weight
        return sum(p.numel() for p in self.base.parameters() if p is not embed) + self.lm_head.numel()

    @contextmanager
    def decoding(self):
        """No autograd, eager layers and an attention implementation that accepts the hole mask.

        The engine may run varlen/flex attention (they need packed-batch arguments) and compiled
        layers (decoding shapes would recompile them, for minutes, and spend dynamo's recompile
        budget); decoding runs _grouped_query_attention (sdpa without copying the cache per head).
        Eager stays eager, and gpt-oss keeps the masked attention it had (its sinks). no_grad rather
        than inference_mode: a draft that is also trained must not pick up inference tensors (its
        cached rotary table)."""
        current = self.base.config._attn_implementation
        if current == "eager":
            wanted = current
        elif getattr(self.base.config, "model_type", None) == "gpt_oss":
            wanted = "sdpa"
        else:
            wanted = _DECODE_ATTN
        switch = wanted != current
        if switch:
            self.base.set_attn_implementation(wanted)
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                yield
        finally:
            if switch:
                self.base.set_attn_implementation(current)

    def lean_decoder(self, compile: bool = False) -> Optional[LeanDecoder]:
        """The lean decode path (lib/eval/fast_decode.py) when this target supports it, else None;
        `compile`: its one-token decode steps run compiled (lib/eval/compiled_decode.py).

        Built once: it holds only references to the model's modules. forward() (aux layers, hooks,
        speculative verification) stays on the transformers forward."""
        if compile not in self._lean:
            self._lean[compile] = lean_decoder(self.base, self.lm_head, compile)
        return self._lean[compile]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor, cache: Any,
                aux_layers: Sequence[int] = ()):
        """ids/positions [B, S], visible [B, S, L] -> (greedy next token at each row [B, S],
        aux states [B, S, n_aux*H] or None, the grown cache)."""
        hidden, aux, cache = self._run(ids, positions, visible, cache, aux_layers)
        return F.linear(hidden, self.lm_head).argmax(-1), aux, cache

    def last_logits(self, ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                    cache: Any) -> tuple[torch.Tensor, Any]:
        """As forward, but the float32 logits of each row's last slot [B, V] (for sampling), and the cache."""
        hidden, _, cache = self._run(ids, positions, visible, cache, ())
        return F.linear(hidden[:, -1], self.lm_head).float(), cache

    def _run(self, ids, positions, visible, cache, aux_layers):
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.base.layers[i].register_forward_hook(partial(_keep_output, captured, i)) for i in set(aux_layers)]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        try:
            out = self.base(input_ids=ids, position_ids=positions, attention_mask=mask[:, None],
                            use_cache=True, **{_cache_kwarg(self.base): cache})
        finally:
            for hook in hooks:
                hook.remove()
        aux = torch.cat([captured[i] for i in aux_layers], dim=-1) if aux_layers else None
        return out.last_hidden_state, aux, _output_cache(out)


def _cache_kwarg(base: nn.Module) -> str:
    """The KV-cache argument of the model's forward: `cache` since transformers renamed it (the old
    `past_key_values` then warns with a FutureWarning on every call), `past_key_values` before (5.17)."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _output_cache(out: Any) -> Any:
    # The output field was renamed with the argument; reading the old name warns once on new versions.
    fields = getattr(out, "__dataclass_fields__", {})
    return out.cache if "cache" in fields else out.past_key_values


def _keep_output(store: dict, index: int, module: nn.Module, args, output) -> None:
    store[index] = output[0] if isinstance(output, tuple) else output


def as_target_runner(target: Any, lm_head: Optional[torch.Tensor] = None) -> TargetRunner:
    """A TargetRunner from a TargetRunner, a transformers causal LM, or an engine backend + lm_head."""
    if isinstance(target, TargetRunner):
        return target
    if isinstance(target, nn.Module) and target.get_output_embeddings() is not None:
        return TargetRunner.from_causal_lm(target)
    if isinstance(getattr(target, "model", None), nn.Module) and lm_head is not None:
        return TargetRunner.from_backend(target, lm_head)
    raise TypeError(f"cannot decode with a {type(target).__name__}: pass a TargetRunner, an AutoModelForCausalLM, "
                    f"or an engine backend together with lm_head=load_target_lm_head(target.path)")


def stop_token_ids(tokenizer, target_path) -> list[int]:
    """End of sequence and end of turn: the tokenizer's eos plus the checkpoint's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if target_path and os.path.isfile(os.path.join(target_path, "generation_config.json")):
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(target_path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)
