"""The routed rows grouped by expert: a counting sort in three small Triton kernels (CUDA), torch elsewhere.

Each MoE layer orders its T*k (token, expert) pairs by expert once. As torch ops that was a stable radix
argsort, a searchsorted for the group ends, an index_put for the inverse permutation and a gather of
the routing weights: 29 us per Qwen3-30B-A3B layer on the H200 (sort 16, memsets 6, the rest in two
Inductor kernels) for 64k one-byte keys. With at most a few hundred experts a counting sort does it
in three passes over the keys, and its last pass writes every output the layer needs:

1. count: each program counts its block of keys per expert (a one-hot block summed per expert);
2. scan: each program takes a few experts and turns their counts per block into each block's start
   within the expert's group (a prefix sum along the blocks) and the expert's total;
3. place: each key's position = its group's start (a prefix sum over the experts' totals) + its
   block's start in the group + the number of equal keys before it in its block (a prefix sum down
   the block's [keys, experts] one-hot). The order, its inverse, each sorted row's token and routing
   weight are stored there, and the group ends once.

The H200 measured the layouts (30B-A3B layer): the scan over blocks as one program scanning a
[blocks, experts] tile took 79 us, as a program per 16 experts scanning along rows 3 us.

Positions come from integer prefix sums, no atomics, so the result is the stable sort's, the same on
every run. Tests compare every output with the torch path (tests/test_moe_sort.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs instead
    triton = None

# A program's one-hot block ([keys, experts] int32) stays within 32k elements, so it lives in registers.
_ONE_HOT_ELEMENTS = 32768
# The scan: a program per 16 experts, 256 blocks' counts per step (each expert's row scanned in registers).
_SCAN_EXPERTS = 16
_SCAN_CHUNK = 256


class ExpertGroups(NamedTuple):
    """The T*k routed rows ordered by expert (stable: each expert's rows in token order).

    order[i]: the flat (token, slot) index of sorted row i; inverse[j]: the sorted row of flat index j;
    ends[e]: the end of expert e's rows (int32, torch._grouped_mm's offs); token[i]: sorted row i's
    token; weight[i]: its routing weight in fp32."""

    order: torch.Tensor
    inverse: torch.Tensor
    ends: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor


def sort_key_dtype(num_experts: int) -> torch.dtype:
    # A radix sort makes one pass per key byte: expert ids of up to 256 experts sort in one pass (the
    # 4-byte keys took four, 42 us per 30B-A3B layer on the H200).
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768 else torch.int32


def group_by_expert_reference(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ExpertGroups:
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat.to(sort_key_dtype(num_experts)), stable=True)
    # Group ends by a search of the sorted ids: a count by index_add_ compiles to a sort-based
    # accumulating index_put, 0.4 ms per layer on the H200 (12% of the compiled capture).
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(flat[order], bounds, out_int32=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return ExpertGroups(order, inverse, ends, order // k, top_k_weights.reshape(-1)[order].float())


if triton is not None:

    @triton.jit
    def _count_kernel(keys_ptr, counts_ptr, n, blocks, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
        b = tl.program_id(0)
        i = b * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + i, mask=i < n, other=E_PAD)
        expert = tl.arange(0, E_PAD)
        one_hot = (key[:, None] == expert[None, :]).to(tl.int32)
        # Stored expert-major ([E, blocks]): the scan below runs along a row.
        tl.store(counts_ptr + expert.to(tl.int64) * blocks + b, tl.sum(one_hot, axis=0), mask=expert < E)

    @triton.jit
    def _scan_kernel(counts_ptr, block_start_ptr, totals_ptr, blocks, E, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
        expert = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
        carry = tl.zeros((EXPERTS,), dtype=tl.int32)
        for b0 in range(0, blocks, CHUNK):
            block = b0 + tl.arange(0, CHUNK)
            at = expert.to(tl.int64)[:, None] * blocks + block[None, :]
            live = (expert < E)[:, None] & (block < blocks)[None, :]
            c = tl.load(counts_ptr + at, mask=live, other=0)
            tl.store(block_start_ptr + at, carry[:, None] + tl.cumsum(c, axis=1) - c, mask=live)
            carry += tl.sum(c, axis=1)
        tl.store(totals_ptr + expert, carry, mask=expert < E)

    @triton.jit
    def _place_kernel(keys_ptr, weights_ptr, block_start_ptr, totals_ptr, ends_ptr, order_ptr, inverse_ptr, token_ptr,
                      weight_out_ptr, n, blocks, E, K: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
        b = tl.program_id(0)
        i = b * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        key = tl.load(keys_ptr + i, mask=live, other=E_PAD).to(tl.int32)
        expert = tl.arange(0, E_PAD)
        # Every program sums the experts' totals itself (a few hundred integers) rather than wait on
        # another launch; program 0 also stores the group ends.
        totals = tl.load(totals_ptr + expert, mask=expert < E, other=0)
        ends = tl.cumsum(totals, axis=0)
        if b == 0:
            tl.store(ends_ptr + expert, ends, mask=expert < E)
        # [BLOCK, E_PAD], the scan down the keys: laid out the other way ([E_PAD, BLOCK], scanned along its
        # rows) this kernel took 53 us per 30B-A3B layer on the H200 instead of 10.
        one_hot = (key[:, None] == expert[None, :]).to(tl.int32)
        earlier_equal = tl.sum((tl.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
        group_start = tl.sum(one_hot * (ends - totals)[None, :], axis=1)
        in_group = tl.load(block_start_ptr + key.to(tl.int64) * blocks + b, mask=live, other=0)
        pos = (group_start + in_group + earlier_equal).to(tl.int64)
        tl.store(order_ptr + pos, i.to(tl.int64), mask=live)
        tl.store(inverse_ptr + i, pos, mask=live)
        tl.store(token_ptr + pos, (i // K).to(tl.int64), mask=live)
        tl.store(weight_out_ptr + pos, tl.load(weights_ptr + i, mask=live, other=0.0).to(tl.float32), mask=live)

    def _launch_group_by_expert(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ExpertGroups:
        # Plain ints (constants of the kernels), as in lib/engine/moe_fused.py: a symbolic value there failed in dynamo.
        k, num_experts = int(top_k_index.shape[-1]), int(num_experts)
        keys = top_k_index.reshape(-1).contiguous()
        weights = top_k_weights.reshape(-1).contiguous()
        n = keys.numel()
        e_pad = triton.next_power_of_2(num_experts)
        block = max(16, min(256, _ONE_HOT_ELEMENTS // e_pad))
        blocks = triton.cdiv(n, block)
        device = keys.device
        counts = torch.empty(num_experts, blocks, dtype=torch.int32, device=device)
        block_start = torch.empty_like(counts)
        totals = torch.empty(num_experts, dtype=torch.int32, device=device)
        ends = torch.empty_like(totals)
        order = torch.empty(n, dtype=torch.int64, device=device)
        inverse = torch.empty_like(order)
        token = torch.empty_like(order)
        weight = torch.empty(n, dtype=torch.float32, device=device)
        _count_kernel[(blocks,)](keys, counts, n, blocks, num_experts, BLOCK=block, E_PAD=e_pad)
        _scan_kernel[(triton.cdiv(num_experts, _SCAN_EXPERTS),)](counts, block_start, totals, blocks, num_experts,
                                                                 EXPERTS=_SCAN_EXPERTS, CHUNK=_SCAN_CHUNK)
        _place_kernel[(blocks,)](keys, weights, block_start, totals, ends, order, inverse, token, weight, n, blocks,
                                 num_experts, K=k, BLOCK=block, E_PAD=e_pad)
        return ExpertGroups(order, inverse, ends, token, weight)


# bench/engine.py --previous-too turns the kernels off to measure the torch path in the same process.
COUNTING_SORT = True
# A block of keys must fit one program's one-hot (16 keys at least): 2048 experts at most.
_MAX_KERNEL_EXPERTS = _ONE_HOT_ELEMENTS // 16


def group_by_expert(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ExpertGroups:
    """[T, k] routed experts and weights -> the T*k rows grouped by expert (see ExpertGroups)."""
    if COUNTING_SORT and triton is not None and top_k_index.is_cuda and num_experts <= _MAX_KERNEL_EXPERTS and top_k_index.numel():
        return _launch_group_by_expert(top_k_index, top_k_weights, num_experts)
    return group_by_expert_reference(top_k_index, top_k_weights, num_experts)
