"""Mixture-of-experts targets in the hf engine: the grouped expert path and the experts' TP shards.

transformers keeps each MoE layer's experts as 3-D weights ([experts, out, in] or transposed) and
routes with a per-layer router. The engine's grouped path (engine.moe_impl=grouped, the default)
replaces only the experts' forward: the T*k routed (token, expert) pairs are sorted by expert ONCE per
layer, each expert's tokens then run as one group of a grouped GEMM (torch._grouped_mm: a single kernel
on Hopper, a reference implementation on CPU) with each row's routing weight folded into the down
projection's input; the outputs are gathered back into (token, slot) order and summed per token in
fp32 (a reduction, no atomic adds; a Triton kernel on CUDA, lib/engine/moe_kernels.py). Every
shape in it depends only on T (no per-expert token counts leave the device), so a compiled decoder
layer keeps the whole MoE block in its graph. Known routers keep transformers' routing rule with the
top-k as one small kernel (lib/engine/moe_router.py), so routing decisions are the reference's own.
On CUDA the first projection (gather, gate/up GEMM, SwiGLU) is one Triton kernel (lib/engine/moe_fused.py),
and Qwen3-MoE decoder layers get an engine forward whose combine kernel also adds the layer's residual.

Two weight layouts are known (anything else keeps transformers' experts and is logged):
- qwen3_moe-like: gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I], SiLU, no biases;
- gpt_oss: gate_up_proj [E, H, 2I] (gate and up interleaved), down_proj [E, I, H], biases on both,
  and its clamped SwiGLU (the module's own _apply_gate is called, so the activation is the reference's).
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lib.config import MoeImpl
from lib.engine.forward_swap import ForwardSwap
from lib.engine.moe_fused import (DOWN_PROJECTION_TILE, FIRST_PROJECTION_TILE, fused_available, gathered_swiglu,
                                  grouped_down, tile_map)
from lib.engine.moe_kernels import gather_rows, silu_mul_scaled, sum_gathered_rows
from lib.engine.moe_router import install_fast_routers, router_swapped

log = logging.getLogger("specdraft.engine")
# The first projection (gather, gate/up GEMM, SwiGLU) as one kernel where it applies (lib/engine/moe_fused.py);
# bench/engine.py --variants unfused measures the path without it in the same process.
FUSE_FIRST_PROJECTION = True
# Experts' last tiles at a quarter or half of the rows when they fit (moe_fused's small_tails): 69,924 tokens/s
# against 69,305 without, same capture; --variants full-tails.
FUSED_SMALL_TAILS = True
# The down projection as moe_fused.grouped_down (small last tiles) instead of torch._grouped_mm, where the
# first projection is fused: off, the capture measured 70,197 tokens/s with torch's against 69,924 with it
# (H200, 2026-11-29); --variants triton-down.
TRITON_DOWN_PROJECTION = False
# The decoder layer's residual add after the MoE block done by the combine kernel (Qwen3-MoE layers without
# engine TP; one pass over the hidden states fewer per layer); --variants separate-residual.
FUSED_MOE_RESIDUAL = True
# The fused kernels' launch shapes are FIRST_PROJECTION_TILE and DOWN_PROJECTION_TILE (moe_fused.Tile, imported
# above, read at call time); --variants four-stages sets the first projection's previous shape.


class ExpertsLayout(enum.Enum):
    concatenated = "concatenated"  # qwen3_moe-like: x @ W^T, gate|up stacked on the output rows
    interleaved = "interleaved"  # gpt_oss: x @ W + b, gate/up alternating columns


@dataclass(frozen=True)
class ExpertsInfo:
    """One experts module's layout, validated against its weights' shapes at construction."""

    layout: ExpertsLayout
    num_experts: int
    hidden: int
    intermediate: int
    silu: bool = False  # concatenated layout with a plain SiLU gate: the fused SwiGLU kernel applies

    def __post_init__(self) -> None:
        if min(self.num_experts, self.hidden, self.intermediate) < 1:
            raise ValueError(f"experts module with num_experts={self.num_experts}, hidden={self.hidden}, "
                             f"intermediate={self.intermediate}: all must be >= 1")


def experts_info(experts: nn.Module) -> Optional[ExpertsInfo]:
    """The layout of a transformers experts module, or None when it is not one the engine knows."""
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        return None
    e = gate_up.shape[0]
    if hasattr(experts, "gate_up_proj_bias") and hasattr(experts, "_apply_gate"):
        h, two_i = gate_up.shape[1], gate_up.shape[2]
        if tuple(down.shape) != (e, two_i // 2, h):
            return None
        return ExpertsInfo(ExpertsLayout.interleaved, e, h, two_i // 2)
    if hasattr(experts, "act_fn") and not hasattr(experts, "gate_up_proj_bias"):
        two_i, h = gate_up.shape[1], gate_up.shape[2]
        if tuple(down.shape) != (e, h, two_i // 2):
            return None
        silu = isinstance(experts.act_fn, nn.SiLU) or type(experts.act_fn).__name__ == "SiLUActivation"
        return ExpertsInfo(ExpertsLayout.concatenated, e, h, two_i // 2, silu)
    return None


def _sort_key_dtype(num_experts: int) -> torch.dtype:
    # A radix sort makes one pass per key byte: expert ids of up to 256 experts sort in one pass (the
    # 4-byte keys took four, 42 us per 30B-A3B layer on the H200).
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768 else torch.int32


def moe_experts(layers: nn.ModuleList) -> list[nn.Module]:
    """Every experts module under the decoder layers (one per MoE layer; dense layers have none)."""
    return [m for layer in layers for name, m in layer.named_modules() if name.endswith("experts")
            and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)]


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x in expert-contiguous groups (ends at offs) times each group's w[e] ([in, out])."""
    if x.dtype != torch.bfloat16 and (x.is_cuda or torch.compiler.is_compiling()):
        # The CUDA grouped kernel, and the op's compiled form on any device, are bf16-only: fp32/fp16 GPU
        # runs and compiled CPU runs (tests) take one matmul per expert (a graph break under compile).
        ends = offs.tolist()
        starts = [0] + ends[:-1]
        return torch.cat([x[s:t] @ w[e] for e, (s, t) in enumerate(zip(starts, ends))])
    return torch._grouped_mm(x, w, offs=offs)


def grouped_experts_forward(
    experts: nn.Module, info: ExpertsInfo, hidden: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor, residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[T, H] hidden states, [T, k] routed experts and weights -> [T, H], as the experts module computes
    (plus residual [T, H], added to the rounded output as a separate add would, when given)."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    # Stable, so each expert's rows stay in token order and the grouping is the same on every run.
    order = torch.argsort(flat.to(_sort_key_dtype(info.num_experts)), stable=True)
    sorted_expert = flat[order]
    # Group ends by a search of the sorted ids: a count by index_add_ compiles to a sort-based
    # accumulating index_put, 0.4 ms per layer on the H200 (12% of the compiled capture).
    ends = torch.arange(1, info.num_experts + 1, device=flat.device, dtype=flat.dtype)
    offs = torch.searchsorted(sorted_expert, ends, out_int32=True)
    # Each row's routing weight scales the down projection's input (the projection is linear), in the
    # elementwise kernel that feeds it, so the combine below is a plain sum.
    weight = top_k_weights.reshape(-1)[order].float()
    token = order // k  # each sorted row's token
    fused = info.layout is ExpertsLayout.concatenated and info.silu and FUSE_FIRST_PROJECTION and fused_available(hidden)
    x = None if fused else gather_rows(hidden, token)
    if info.layout is ExpertsLayout.concatenated:
        if fused:
            # One tile -> expert map for both kernels (their row tiles match in the default shapes).
            tiles = tile_map(offs, token.numel(), FIRST_PROJECTION_TILE.block_m)
            h = gathered_swiglu(hidden, experts.gate_up_proj, token, weight, offs, FIRST_PROJECTION_TILE,
                                FUSED_SMALL_TAILS, tiles)
        else:
            gate_up = _grouped_matmul(x, experts.gate_up_proj.transpose(1, 2), offs)
            if info.silu:
                h = silu_mul_scaled(gate_up, weight)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                h = (experts.act_fn(gate.float()) * up.float() * weight[:, None]).to(x.dtype)  # rounded once
        if fused and TRITON_DOWN_PROJECTION:
            y = grouped_down(h, experts.down_proj, offs, DOWN_PROJECTION_TILE, True, tiles)
        else:
            y = _grouped_matmul(h, experts.down_proj.transpose(1, 2), offs)
    else:
        gate_up = _grouped_matmul(x, experts.gate_up_proj, offs) + experts.gate_up_proj_bias[sorted_expert]
        scale = weight[:, None]
        y = _grouped_matmul((experts._apply_gate(gate_up.float()) * scale).to(x.dtype), experts.down_proj, offs)
        y = y + (experts.down_proj_bias[sorted_expert] * scale).to(y.dtype)
    # Back to (token, slot) order by a gather (each sorted row i belongs at flat slot order[i]), then
    # each token's k rows summed in fp32 and rounded once. A reduction, not a scatter-add: no atomics,
    # so the sum's order, and the captured states, are the same on every run.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return sum_gathered_rows(y, inverse, k, residual)


_INFOS: dict[ExpertsInfo, ExpertsInfo] = {}


def _grouped_forward(self, hidden_states, top_k_index, top_k_weights, residual=None):
    return grouped_experts_forward(self, self.grouped_info, hidden_states, top_k_index, top_k_weights, residual)


_SWAP = ForwardSwap("Grouped", lambda cls: _grouped_forward)


def _use_grouped_forward(experts: nn.Module, info: ExpertsInfo) -> None:
    """Give `experts` the grouped forward (lib/engine/forward_swap.py) with an interned info: the compiled
    decoder layer guards on the info object too, so one object per layout keeps one graph for all layers."""
    _SWAP.apply([experts])
    experts.grouped_info = _INFOS.setdefault(info, info)


# Decoder layers whose MoE block is router + experts and whose forward is pre-norm attention and MLP with
# residual adds (transformers' Qwen3-MoE): the engine's layer forward below computes the same, calling the
# block's router and experts itself (the block's own forward, and hooks on the block itself, no longer run).
_RESIDUAL_FUSABLE = {"Qwen3MoeDecoderLayer": "Qwen3MoeSparseMoeBlock"}


def _residual_fused_layer_forward(cls):
    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        h = residual + h
        x = self.post_attention_layernorm(h)
        flat = x.view(-1, x.shape[-1])
        _, weights, chosen = self.mlp.gate(flat)
        return self.mlp.experts(flat, chosen, weights, residual=h.view(-1, h.shape[-1])).view(h.shape)
    return forward


_LAYER_SWAP = ForwardSwap("ResidualFused", _residual_fused_layer_forward)


def _fuse_moe_residuals(layers: nn.ModuleList) -> int:
    """Give the known MoE decoder layers the residual-fused forward; returns how many."""
    found = [layer for layer in layers
             if _RESIDUAL_FUSABLE.get(type(layer).__name__) == type(getattr(layer, "mlp", None)).__name__
             and _SWAP.swapped(layer.mlp.experts) and router_swapped(layer.mlp.gate)]
    _LAYER_SWAP.apply(found)
    return len(found)


def install_moe_impl(layers: nn.ModuleList, impl: MoeImpl | str, fuse_residual: bool = False) -> Optional[MoeImpl]:
    """Run the target's experts with `impl` (auto = grouped). Returns what runs, or None for a dense target.

    fuse_residual: the grouped path's combine kernel also adds the layer's residual (known layer classes;
    only where the MLP's output is the layer's own, i.e. not under engine TP, whose all-reduce sums it)."""
    try:
        impl = MoeImpl(impl)
    except ValueError:
        raise ValueError(f"engine.moe_impl={impl!r} is not an MoE implementation; use one of "
                         f"{', '.join(m.value for m in MoeImpl)}") from None
    modules = moe_experts(layers)
    if not modules:
        return None
    if impl in (MoeImpl.hf, MoeImpl.eager):
        # transformers' own experts: its default (grouped_mm where it can dispatch) or its per-expert loop.
        name = "grouped_mm" if impl is MoeImpl.hf else "eager"
        for m in modules:
            m.config._experts_implementation = name
        return impl
    for m in modules:
        info = experts_info(m)
        if info is None:
            log.warning("engine.moe_impl=%s: experts module %s has a weight layout the grouped path does not "
                        "know; it keeps transformers' experts implementation", impl.value, type(m).__name__)
            return MoeImpl.hf
    for m in modules:
        _use_grouped_forward(m, experts_info(m))
    install_fast_routers(layers)
    if fuse_residual and FUSED_MOE_RESIDUAL:
        fused = _fuse_moe_residuals(layers)
        if fused:
            log.info("engine: %d MoE decoder layers add their residual in the combine kernel", fused)
    return MoeImpl.grouped


def shard_experts(experts: nn.Module, rank: int, size: int) -> None:
    """Keep this TP rank's slice of every expert's intermediate features (column- then row-parallel).

    The router stays replicated, so every rank routes identically; the MoE block's output is then a
    partial sum that the MLP all-reduce completes, exactly as for a dense MLP. The down-projection
    bias (gpt-oss) is added once, by rank 0.
    """
    info = experts_info(experts)
    if info is None:
        raise ValueError(f"engine.tp={size}: target experts {type(experts).__name__} have a weight layout engine TP "
                         "does not know (qwen3_moe- and gpt_oss-style experts only); use engine.tp=1")
    n, i = info.intermediate // size, info.intermediate
    lo, hi = rank * n, (rank + 1) * n

    def keep(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.contiguous().clone(), requires_grad=False)

    if info.layout is ExpertsLayout.concatenated:
        gate_up = experts.gate_up_proj.data
        experts.gate_up_proj = keep(torch.cat([gate_up[:, lo:hi], gate_up[:, i + lo:i + hi]], dim=1))
        experts.down_proj = keep(experts.down_proj.data[:, :, lo:hi])
        experts.intermediate_dim = n
    else:
        # Interleaved gate/up pairs of intermediate features lo..hi are the contiguous columns 2lo..2hi.
        experts.gate_up_proj = keep(experts.gate_up_proj.data[:, :, 2 * lo:2 * hi])
        experts.gate_up_proj_bias = keep(experts.gate_up_proj_bias.data[:, 2 * lo:2 * hi])
        experts.down_proj = keep(experts.down_proj.data[:, lo:hi, :])
        if rank != 0:
            experts.down_proj_bias = keep(torch.zeros_like(experts.down_proj_bias.data))
        experts.intermediate_size = n


def dense_parts_beside_experts(block: nn.Module) -> list[str]:
    """Linear layers of an MoE block outside its experts (shared experts, their gates): engine TP does
    not shard them, and its all-reduce would sum their replicated outputs once per member."""
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def moe_intermediate_size(config) -> Optional[int]:
    """The per-expert intermediate width TP must divide, or None for a dense target."""
    if getattr(config, "moe_intermediate_size", None) and getattr(config, "num_experts", 0):
        return int(config.moe_intermediate_size)
    if getattr(config, "num_local_experts", 0) and getattr(config, "model_type", "") == "gpt_oss":
        return int(config.intermediate_size)
    return None
