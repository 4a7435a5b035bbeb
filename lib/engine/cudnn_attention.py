"""cuDNN's fused attention over a packed (ragged) batch, through cudnn-frontend's Python graphs with the
built graphs cached (engine.varlen_kernel=cudnn).

Why not torch's own op: aten._cudnn_attention_forward's ragged form builds a new cuDNN graph on every
call (torch 2.11; ~80 ms of CPU per layer on the H200, 2k tokens/s for the Qwen3-30B-A3B capture), while
its Hopper kernel ran the same attention in 396 us against FlashAttention-2's 767 us (profiled on the
H200, 2026-11-29). Here a graph is built once per (samples, longest-sample bound, heads, head size) and
reused; both the sample count and the bound are rounded up to powers of two so a run needs few graphs.
Padding samples have length 0 and start at the batch's end: cuDNN's padding mask leaves them empty.

Needs the optional package nvidia-cudnn-frontend (tested: 1.12.0) and the libcudnn that torch loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SAMPLES = 8
MIN_BOUND = 128
TESTED_FRONTEND = "1.12.0"
_cache: dict[tuple, "_Plan"] = {}  # the engine captures from one thread
_handles: dict[int, object] = {}


def missing_reason() -> str | None:
    """Why engine.varlen_kernel=cudnn cannot run here (package absent or unusable), or None."""
    try:
        import cudnn  # noqa: F401  (the package dlopens libcudnn at import)
    except Exception as e:  # ImportError, or OSError when libcudnn is not found
        return (f"engine.varlen_kernel=cudnn needs the nvidia-cudnn-frontend package "
                f"(pip install nvidia-cudnn-frontend=={TESTED_FRONTEND}): import failed ({e}); "
                f"or set engine.varlen_kernel=flash")
    return None


def pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def ragged_metadata(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side per-batch inputs: cumulative starts [B'+1] and lengths [B'] (int32), B' = the sample count
    rounded up to a power of two (>= MIN_SAMPLES), padded with empty samples at the batch's end."""
    padded = pow2_at_least(len(lengths), MIN_SAMPLES)
    seq = torch.zeros(padded, dtype=torch.int32)
    seq[: len(lengths)] = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.zeros(padded + 1, dtype=torch.int32)
    torch.cumsum(seq, 0, out=cu[1:])
    return cu, seq


@dataclass
class _Plan:
    graph: object
    tensors: dict
    workspace: int


def _handle(device: torch.device):
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    return _handles[index]


def _build(samples: int, bound: int, hq: int, hkv: int, d: int, scale: float, dtype: torch.dtype, handle) -> _Plan:
    import cudnn

    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def packed(name: str, heads: int):  # [T, heads, d] rows seen as [B, heads, bound, d] plus ragged starts
        return g.tensor(name=name, dim=[samples, heads, bound, d], stride=[bound * heads * d, d, heads * d, 1],
                        data_type=io)

    def ints(name: str, n: int):
        return g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)

    t = {"q": packed("q", hq), "k": packed("k", hkv), "v": packed("v", hkv),
         "seq": ints("seq", samples), "off_q": ints("off_q", samples + 1), "off_kv": ints("off_kv", samples + 1)}
    t["q"].set_ragged_offset(t["off_q"])
    t["k"].set_ragged_offset(t["off_kv"])
    t["v"].set_ragged_offset(t["off_kv"])
    o, _ = g.sdpa(name="packed_causal", q=t["q"], k=t["k"], v=t["v"], is_inference=True, attn_scale=scale,
                  use_padding_mask=True, seq_len_q=t["seq"], seq_len_kv=t["seq"], use_causal_mask=True)
    o.set_output(True).set_dim([samples, hq, bound, d]).set_stride([bound * hq * d, d, hq * d, 1])
    o.set_ragged_offset(t["off_q"])
    t["o"] = o
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return _Plan(g, t, g.get_workspace_size())


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, off_q: torch.Tensor,
                            off_kv: torch.Tensor, seq: torch.Tensor, bound: int, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (Hq a multiple of Hkv), causal inside each sample -> [T, Hq, D].

    seq and the cumulative starts cu from ragged_metadata (on q's device), off_q = cu * Hq * D and
    off_kv = cu * Hkv * D (element offsets); bound >= the longest sample."""
    if q.numel() >= 2 ** 31:  # the ragged offsets are int32 element counts
        raise ValueError(f"engine.varlen_kernel=cudnn: a packed batch of {q.shape[0]} tokens x {q.shape[1]} heads x "
                         f"{q.shape[2]} overflows cuDNN's int32 offsets; lower engine.token_budget below "
                         f"{2 ** 31 // (q.shape[1] * q.shape[2])} or use engine.varlen_kernel=flash")
    import cudnn

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, hq, d = q.shape
    hkv, samples = k.shape[1], seq.numel()
    handle = _handle(q.device)
    key = (samples, bound, hq, hkv, d, scale, q.dtype, q.device)
    plan = _cache.get(key)
    if plan is None:
        plan = _cache[key] = _build(samples, bound, hq, hkv, d, scale, q.dtype, handle)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    out = torch.empty_like(q)
    shape = (samples + 1, 1, 1, 1)
    t = plan.tensors
    workspace = torch.empty(max(plan.workspace, 1), dtype=torch.uint8, device=q.device)
    plan.graph.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["seq"]: seq.view(samples, 1, 1, 1),
                        t["off_q"]: off_q.view(shape), t["off_kv"]: off_kv.view(shape)},
                       workspace, handle=handle)
    return out
