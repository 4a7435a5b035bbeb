"""The engine's packed forward replayed from CUDA graphs (engine.cuda_graph).

Why: the compiled capture is GPU-bound, yet on the H200 the Qwen3-30B-A3B batch spent ~3.5 ms of its
~118 ms with the GPU idle between its ~1,700 kernels (each launch waits ~1.6 us on the one before it;
bench/timeline.py) plus a stall at each batch start, where copies from pageable memory wait for the
stream to drain. A replayed graph launches the whole forward at once.

A graph needs fixed shapes and addresses, so:
- every batch is padded to the token budget with padding samples (token 0, positions from 0), each no
  longer than the bound of the real samples, so the padding adds little attention work and never
  attends to or from a real sample; its rows are computed and dropped;
- one graph per (sample bucket, longest-sample bound): the sample count (with padding) rounded up to a
  power of two of at least 8 (padded with empty samples), the bound to a power of two of at least 128.
  These are the cuDNN kernel's own buckets (lib/engine/cudnn_attention.py); flash takes the bound as
  its max_seqlen, which only sizes its grid;
- the batch's tokens and attention metadata are copied into the graph's static inputs, the planned
  layers' outputs land in static buffers and are copied into the caller's destination after replay.
All graphs draw on one memory pool: they never run concurrently, and nothing a graph allocates
outlives its capture but the static buffers made beforehand.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from lib.engine.base import pinned
from lib.engine.cudnn_attention import MIN_BOUND, MIN_SAMPLES, pow2_at_least

log = logging.getLogger("specdraft.engine")


@dataclass(frozen=True)
class GraphKey:
    samples: int  # sample slots, padding and empty samples included (a power of two >= MIN_SAMPLES)
    bound: int  # >= every sample's length (a power of two >= MIN_BOUND)


def padded_lengths(lengths: list[int], budget: int) -> tuple[list[int], GraphKey]:
    """The real samples' lengths, then padding samples filling the batch to `budget` tokens, and the key
    of the graph that runs them. Padding samples are no longer than the real samples' bound."""
    total = sum(lengths)
    if not lengths or min(lengths) < 1 or total > budget:
        raise ValueError(f"a graphed batch needs samples of >= 1 token totalling <= {budget}; got {lengths}")
    bound = pow2_at_least(max(lengths), MIN_BOUND)
    pad, out = budget - total, list(lengths)
    while pad > 0:
        out.append(min(pad, bound))
        pad -= out[-1]
    return out, GraphKey(pow2_at_least(len(out), MIN_SAMPLES), bound)


def flash_cu_seqlens(lengths: list[int], samples: int) -> torch.Tensor:
    """[samples + 1] cumulative starts: the samples, then empty ones at the batch's end."""
    cu = torch.zeros(samples + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=cu[1:len(lengths) + 1])
    cu[len(lengths) + 1:] = cu[len(lengths)]
    return cu


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    metadata: dict[str, torch.Tensor]  # static attention inputs, refilled per batch


class GraphedForward:
    """Replays the model's forward over budget-sized padded batches, one CUDA graph per GraphKey.

    `forward(ids, positions, attention_kwargs, aux, final)` runs the model over [budget] tokens with the
    attention keyword arguments and writes the planned layers' rows into `aux` and the last hidden
    state into `final` ([budget, ...] static buffers); `metadata(lengths, key)` builds the attention's
    host-side tensors for a key and `attention_kwargs(metadata, key)` the keyword arguments around them.
    """

    def __init__(self, forward: Callable, metadata: Callable, attention_kwargs: Callable, budget: int,
                 aux_width: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self._forward, self._metadata, self._kwargs = forward, metadata, attention_kwargs
        self.budget, self.device = budget, device
        self._ids = torch.zeros(budget, dtype=torch.long, device=device)
        self._positions = torch.zeros(budget, dtype=torch.long, device=device)
        self._aux = torch.zeros(budget, max(aux_width, 1), dtype=dtype, device=device)
        self._final = torch.zeros(budget, hidden, dtype=dtype, device=device)
        self._graphs: dict[GraphKey, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def keys(self) -> list[GraphKey]:
        return list(self._graphs)

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's [T, aux] and [T, hidden] rows, views of static buffers valid until the next run."""
        n = input_ids.numel()
        padded, key = padded_lengths(lengths, self.budget)
        self._ids[:n].copy_(pinned(input_ids), non_blocking=True)
        self._positions[:n].copy_(pinned(position_ids), non_blocking=True)
        if n < self.budget:
            self._ids[n:].zero_()
            pad_positions = torch.cat([torch.arange(m) for m in padded[len(lengths):]])
            self._positions[n:].copy_(pinned(pad_positions), non_blocking=True)
        host = self._metadata(padded, key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(key, host)
        else:
            for name, t in host.items():
                entry.metadata[name].copy_(pinned(t), non_blocking=True)
        entry.graph.replay()
        return self._aux[:n], self._final[:n]

    def _capture(self, key: GraphKey, host: dict[str, torch.Tensor]) -> _Graph:
        metadata = {name: t.to(self.device) for name, t in host.items()}
        kwargs = self._kwargs(metadata, key)
        # Warm-up on a side stream, as graph capture wants: compiles, builds cuDNN plans, settles the
        # allocator; the warm-up's results are this batch's, and the capture below recomputes them.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(self._ids, self._positions, kwargs, self._aux, self._final)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(self._ids, self._positions, kwargs, self._aux, self._final)
        except RuntimeError as e:  # something in the forward synchronises with the host or allocates pinned memory
            raise RuntimeError(f"engine.cuda_graph=true: the target's forward cannot be captured as a CUDA graph "
                               f"({e}); set engine.cuda_graph=false") from e
        log.info("engine: CUDA graph captured for %d sample slots, bound %d (%d graphs)", key.samples, key.bound,
                 len(self._graphs) + 1)
        return _Graph(graph, metadata)
