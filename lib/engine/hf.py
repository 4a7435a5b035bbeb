"""The default engine backend: the target as a transformers model, captured with forward hooks.

Only the base model (embeddings, decoder layers, final norm) is loaded and run; the full-vocab lm_head
is never computed (the trainer applies the target's lm_head to the final hidden state itself, on the
draft vocab only). Packed batches run as one sequence of T tokens whose attention never crosses
sample boundaries:
- `varlen` (CUDA, bf16/fp16): flash or cuDNN attention over cu_seqlens, no mask at all (the fast path,
  lib/engine/varlen.py);
- `sdpa` / `eager`: a block-diagonal causal [1, 1, T, T] mask (CPU default; O(T^2) memory).
flex attention with a document BlockMask was tried and dropped: no faster than varlen, and on
torch 2.11 its kernel failed to recompile once the batch length changed (docs/engine.md).
The planned layers' outputs (the draft strategy's CapturePlan) are copied by forward hooks straight
into the caller's handoff views, so no layer's output is kept beyond the hook and
`output_hidden_states` is never used.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from lib.launch.compiling import compile_fn
from lib.data.batch import PackedBatch
from lib.config import AttnImpl, EngineConfig, TargetConfig, VarlenKernel
from lib.config import resolve_attn_impl as resolve_attn_choice
from lib.drafts.base import FINAL_HIDDEN, CapturePlan, default_capture_plan
from lib.engine.base import (
    RANDOM_INIT_SEED,
    EngineInputError,
    capture_destination,
    check_batch_structure,
    find_sample_problems,
    pinned,
)
from lib.engine.moe import install_moe_impl
from lib.engine.qk_norm_rope import install_fast_attention
from lib.engine.tp import TensorParallel
from lib.engine.cudnn_attention import missing_reason as cudnn_missing_reason, ragged_metadata
from lib.engine.varlen import VARLEN_ATTN_NAME, max_seqlen_arg
from lib.target.shape import resolve_dtype
from lib.target.weights import load_pretrained

log = logging.getLogger("specdraft.engine")
ATTN_IMPLS = tuple(a.value for a in AttnImpl)
_HF_ATTN_NAMES = {"varlen": VARLEN_ATTN_NAME, "sdpa": "sdpa", "eager": "eager"}


def attention_for_target(config, impl: str) -> str:
    """The attention the target can run: gpt-oss (sinks) has no sdpa in transformers.

    varlen handles its sinks and sliding windows itself (lib/engine/varlen.py); under sdpa (CPU) a
    gpt-oss target falls back to eager with the packed block-diagonal (and sliding-window) masks:
    exact, but O(T^2) memory per layer.
    """
    if getattr(config, "model_type", None) != "gpt_oss" or impl in ("eager", "varlen"):
        return impl
    log.warning("engine.attn_impl=%s: gpt-oss attention sinks run only in transformers' eager attention here; "
                "the engine falls back to engine.attn_impl=eager (block-diagonal masks, O(T^2) memory per layer)",
                impl)
    return "eager"


def resolve_attn_impl(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """engine.attn_impl -> one of varlen | sdpa | eager for this device and dtype.

    A run's config arrives resolved (lib.config.resolve); library callers may still pass auto. The
    rule, and its errors (ConfigError, a ValueError), are lib.config's either way.
    """
    return resolve_attn_choice(name, device.type, str(dtype).removeprefix("torch.")).value


def build_target_config(target: TargetConfig):
    """The target's transformers config: from target.hf_config (random init) or target.path."""
    if target.random_init and target.hf_config is not None:
        cfg = dict(target.hf_config)
        if "model_type" not in cfg:
            raise ValueError("target.hf_config needs a 'model_type' key (e.g. qwen3, llama) to pick the architecture")
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if not target.path:
        raise ValueError(
            "target.path is not set: point it at a local HF checkpoint directory, or set target.random_init=true "
            "with target.hf_config"
        )
    if not os.path.isfile(os.path.join(target.path, "config.json")):
        raise ValueError(f"target.path={target.path!r} has no config.json; point it at a local HF checkpoint directory")
    return AutoConfig.from_pretrained(target.path)


def build_random_target(target: TargetConfig, dtype: torch.dtype, device: torch.device, attn: str = "sdpa"):
    """The random-init target as a full causal LM, identical on every rank that builds it on `device`.

    Trainers that need the target's embedding and lm_head for a random-init run call this too, so
    engine and trainer agree on the weights without shipping them.
    """
    config = build_target_config(target)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(RANDOM_INIT_SEED)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def load_base_model(target: TargetConfig, dtype: torch.dtype, device: torch.device, attn: str) -> PreTrainedModel:
    """The target's base model (no lm_head), frozen, in eval mode, on `device`."""
    if target.random_init:
        model = build_random_target(target, dtype, device, attn).base_model
    else:
        build_target_config(target)  # validates target.path with a clear message first
        # The checkpoint's lm_head is deliberately left out; keep transformers from reporting it as unexpected.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = load_pretrained(AutoModel, target.path, dtype, device, attn)
        finally:
            hf_logging.set_verbosity(verbosity)
    for name in ("layers", "norm", "embed_tokens"):
        if not hasattr(model, name):
            raise ValueError(
                f"target architecture {type(model).__name__} has no `{name}`; the hf engine supports decoder-only "
                "models laid out like Llama/Qwen (model.embed_tokens, model.layers, model.norm)"
            )
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        raise ValueError(
            f"target layer types {sorted(layer_types)} are not supported by the hf engine (full and sliding-window "
            "attention only); pick a target without linear-attention/chunked layers"
        )
    model.eval().requires_grad_(False)
    return model.to(device)


@dataclass
class ForwardInputs:
    """One packed sequence on the engine device, and which of its rows this rank returns."""

    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    lengths: list[int]
    rows: slice

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


class AuxWriter:
    """Forward hooks that copy the aux layers' outputs into the destination columns while armed."""

    def __init__(self, layers: nn.ModuleList, aux_layers: list[int], hidden_size: int):
        self._dst: Optional[torch.Tensor] = None
        self._rows = slice(None)
        columns: dict[int, list[int]] = {}
        for k, layer in enumerate(aux_layers):
            columns.setdefault(layer, []).append(k * hidden_size)
        self._width = hidden_size
        self._handles = [layers[i].register_forward_hook(partial(self._on_output, cols)) for i, cols in columns.items()]

    def arm(self, dst: torch.Tensor, rows: slice) -> None:
        self._dst, self._rows = dst, rows

    def disarm(self) -> None:
        self._dst = None

    def _on_output(self, columns: list[int], module: nn.Module, args, output) -> None:
        if self._dst is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        src = hidden[0, self._rows]
        for c in columns:
            self._dst[:, c:c + self._width].copy_(src)


class HFBackend:
    """transformers target on one device, optionally sharded over an engine TP group."""

    def __init__(self) -> None:
        self._model: Optional[PreTrainedModel] = None

    def load(
        self,
        target: TargetConfig,
        engine: EngineConfig,
        device: torch.device,
        tp_group: Optional[dist.ProcessGroup] = None,
        plan: Optional[CapturePlan] = None,
    ) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.dtype = resolve_dtype(target.dtype, device)
        self.attn_impl = resolve_attn_impl(engine.attn_impl, device, self.dtype)
        self.attn_impl = attention_for_target(build_target_config(target), self.attn_impl)
        if engine.token_budget < 1:
            raise ValueError(f"engine.token_budget={engine.token_budget} must be >= 1")
        self.token_budget = engine.token_budget
        self.varlen_kernel = VarlenKernel(engine.varlen_kernel)
        if self.attn_impl == "varlen" and self.varlen_kernel is VarlenKernel.cudnn:
            reason = cudnn_missing_reason()  # before the weights load
            if reason is not None:
                raise ValueError(reason)
        group_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        if engine.tp != group_size:
            raise ValueError(f"engine.tp={engine.tp} but the TP group passed to the engine has {group_size} members")
        tp = TensorParallel(tp_group, device) if group_size > 1 else None
        # TP members load a checkpoint on CPU and move only their shard to the GPU. Random weights
        # are drawn on the engine device whatever the TP degree, so every engine and trainer that
        # builds the same random target on that device type gets the same weights.
        load_device = torch.device("cpu") if tp is not None and not target.random_init else device
        model = load_base_model(target, self.dtype, load_device, _HF_ATTN_NAMES[self.attn_impl])
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.vocab_size = int(config.vocab_size)
        self.plan = plan if plan is not None else default_capture_plan(target, config)
        self.plan.check_target(self.num_layers, self.hidden_size)
        self.aux_layers = list(self.plan.layers)
        layer_types = getattr(config, "layer_types", None) or []
        # Sliding-window layers (gpt-oss) get their own packed mask; None keeps one mask for all layers.
        self._sliding_window = int(config.sliding_window) if "sliding_attention" in layer_types else None
        if tp is not None:
            tp.shard(model.layers, config)
            model.to(device)
        self.moe_impl = install_moe_impl(model.layers, engine.moe_impl, fuse_residual=tp is None)
        if self.moe_impl is not None:
            log.info("engine: MoE target, experts run with engine.moe_impl=%s", self.moe_impl.value)
        fused_qk = install_fast_attention(model.layers)
        if fused_qk:
            log.info("engine: %d attention modules run q/k norm + rope fused (one Triton kernel on CUDA)", fused_qk)
        self._tp = tp
        self._model = model
        self._aux = AuxWriter(model.layers, self.aux_layers, self.hidden_size)
        if engine.compile:
            self._compile(model.layers)
        if device.type == "cuda":
            self._warmup()

    @property
    def model(self) -> PreTrainedModel:
        """The loaded base model (this member's shard under TP); read-only use, e.g. benchmarks."""
        if self._model is None:
            raise RuntimeError("HFBackend.model read before load()")
        return self._model

    def capture(self, batch: PackedBatch, out: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        if self._model is None:
            raise RuntimeError("HFBackend.capture called before load()")
        check_batch_structure(batch)
        problems = find_sample_problems(batch, self.vocab_size, self.token_budget)
        if batch.num_tokens > self.token_budget and not problems:
            raise ValueError(
                f"packed batch has {batch.num_tokens} tokens, over engine.token_budget={self.token_budget}; "
                "pack batches with the same token budget as the engine"
            )
        if self._tp is not None:
            ids, pos, lengths, rows = self._tp.gather(batch, problems)
            inputs = ForwardInputs(ids, pos, lengths, rows)
        else:
            if problems:
                raise EngineInputError(problems)
            inputs = ForwardInputs(self._to_device(batch.input_ids), self._to_device(batch.position_ids),
                                   batch.lengths, slice(0, batch.num_tokens))
        dst = capture_destination(out, batch.num_tokens, self.plan, self.dtype, self.device)
        if inputs.num_tokens > 0:
            self._forward(inputs, dst)
        return dst

    def _forward(self, inputs: ForwardInputs, dst: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            attention = self._attention_inputs(inputs)
            if self.aux_layers:
                self._aux.arm(dst["aux_hidden"], inputs.rows)
            try:
                hidden = self._model(
                    input_ids=inputs.input_ids[None],
                    position_ids=inputs.position_ids[None],
                    use_cache=False,
                    **attention,
                ).last_hidden_state
            finally:
                self._aux.disarm()
            if FINAL_HIDDEN in dst:
                dst[FINAL_HIDDEN].copy_(hidden[0, inputs.rows])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return pinned(t).to(self.device, non_blocking=True) if self.device.type == "cuda" else t.to(self.device)

    def _attention_inputs(self, inputs: ForwardInputs) -> dict:
        """Keyword arguments that keep attention inside each sample, for the chosen implementation."""
        lengths = torch.tensor(inputs.lengths, dtype=torch.int32)
        if self.attn_impl == "varlen":
            cu = torch.zeros(len(inputs.lengths) + 1, dtype=torch.int32)
            torch.cumsum(lengths, 0, out=cu[1:])
            kwargs = {"engine_cu_seqlens": self._to_device(cu),
                      "engine_max_seqlen": max_seqlen_arg(max(inputs.lengths), self.varlen_kernel),
                      "engine_varlen_kernel": self.varlen_kernel.value}
            if self.varlen_kernel is VarlenKernel.cudnn:
                cudnn_cu, cudnn_seq = ragged_metadata(inputs.lengths)
                kwargs |= {"engine_cudnn_cu": self._to_device(cudnn_cu), "engine_cudnn_seq": self._to_device(cudnn_seq)}
            return kwargs
        n = inputs.num_tokens
        doc = torch.repeat_interleave(torch.arange(len(inputs.lengths), dtype=torch.int32), lengths).to(self.device)
        idx = torch.arange(n, device=self.device)
        allowed = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
        if self._sliding_window is None:
            return {"attention_mask": self._mask_for_impl(allowed)}
        # transformers' sliding window: a query sees itself and the window-1 tokens before it.
        window = allowed & (idx[:, None] - idx[None, :] < self._sliding_window)
        return {"attention_mask": {"full_attention": self._mask_for_impl(allowed),
                                   "sliding_attention": self._mask_for_impl(window)}}

    def _mask_for_impl(self, allowed: torch.Tensor) -> torch.Tensor:
        """[T, T] allowed pairs -> the [1, 1, T, T] mask sdpa (bool) or eager (additive) takes."""
        if self.attn_impl == "sdpa":
            return allowed[None, None]
        n = allowed.shape[0]
        additive = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return additive[None, None]

    def _compile(self, layers: nn.ModuleList) -> None:
        """Compile per decoder layer (one graph shared by all layers), keeping the capture hooks eager.

        Under TP the all-reduce hooks sit on the attention and MLP modules, so those are compiled
        instead of the whole layer and the collectives stay outside the graphs.
        """
        for layer in layers:
            parts = [layer.self_attn, layer.mlp] if self._tp is not None else [layer]
            for part in parts:
                part.forward = compile_fn(part.forward, dynamic=True)

    def _warmup(self) -> None:
        """One full-budget batch at load: compiles, and proves the budget fits in the memory cap now."""
        n = self.token_budget
        batch = PackedBatch.from_samples([([0] * n, [False] * n)], [-1])
        try:
            self.capture(batch)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"engine warm-up with engine.token_budget={n} ran out of GPU memory under the engine's memory cap "
                "(infer_frac): lower engine.token_budget or raise infer_frac"
            ) from e
        except RuntimeError as e:
            if self.attn_impl == "varlen" and self.varlen_kernel is VarlenKernel.cudnn:
                # cuDNN refuses shapes and versions its kernels lack (head sizes, old releases) with
                # errors that name neither the key nor the way back.
                raise RuntimeError(f"engine warm-up with engine.varlen_kernel=cudnn failed on this GPU and cuDNN "
                                   f"({e}); use engine.varlen_kernel=flash") from e
            raise
        torch.cuda.synchronize(self.device)
