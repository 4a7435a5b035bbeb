"""What every engine backend promises, and the checks they share.

An engine backend runs the frozen target model over a packed batch (prefill only) and returns the
hidden states the draft learns from, as the draft strategy's CapturePlan says (lib/drafts/base.py):
the outputs of the planned decoder layers, concatenated ("aux_hidden"), and the last layer's output
after the target's final norm ("final_hidden"). Backends differ in how they run the target (plain
transformers, tensor-parallel transformers, sglang), never in what they return.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from lib.data.batch import PackedBatch
from lib.config import EngineConfig, TargetConfig
from lib.drafts.base import CapturePlan

# Random-init targets must be identical on every rank that builds one (TP members, and trainers that
# rebuild the target's embedding and lm_head), so the seed is fixed rather than taken from the run.
RANDOM_INIT_SEED = 1234



class EngineBackend(Protocol):
    hidden_size: int
    num_layers: int
    vocab_size: int
    aux_layers: list[int]  # the plan's layers
    plan: CapturePlan
    dtype: torch.dtype

    def load(
        self,
        target: TargetConfig,
        engine: EngineConfig,
        device: torch.device,
        tp_group: Optional[dist.ProcessGroup],
        plan: Optional[CapturePlan] = None,  # None: the default draft's plan for this target
    ) -> None: ...

    def capture(self, batch: PackedBatch, out: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class SampleProblem:
    """One sample the engine refuses to run, and what to do about it."""

    index: int  # position in the batch
    sample_id: Optional[int]  # dataset index, when the batch carries sample ids
    reason: str
    fix: str

    def describe(self) -> str:
        who = f"sample id {self.sample_id}" if self.sample_id is not None else "sample"
        return f"{who} (batch index {self.index}): {self.reason}; {self.fix}"


class EngineInputError(ValueError):
    """Some samples of a batch cannot be run; nothing was computed for the batch.

    The caller counts `problems`, drops those samples with `remaining(batch)` and captures the rest.
    Under engine tensor parallelism every TP member raises together when any member's batch is bad;
    a member whose own batch was fine gets an empty `problems` list and retries its batch unchanged,
    so the group stays in step.
    """

    def __init__(self, problems: list[SampleProblem], peer_bad: bool = False):
        self.problems = list(problems)
        self.peer_bad = peer_bad
        lines = [p.describe() for p in self.problems]
        if peer_bad and not lines:
            lines.append("another member of the engine TP group had bad samples; capture this batch again")
        super().__init__("engine cannot run this batch: " + " | ".join(lines))

    @property
    def sample_ids(self) -> list[Optional[int]]:
        return [p.sample_id for p in self.problems]

    def remaining(self, batch: PackedBatch) -> PackedBatch:
        return drop_samples(batch, [p.index for p in self.problems])


def check_batch_structure(batch: PackedBatch) -> None:
    """Malformed batches are a packing bug, not a data problem: fail loudly, naming the field."""
    n = batch.num_tokens
    cu = batch.cu_seqlens
    if batch.input_ids.dim() != 1 or batch.position_ids.shape != batch.input_ids.shape:
        raise ValueError(
            f"PackedBatch.input_ids {tuple(batch.input_ids.shape)} and position_ids {tuple(batch.position_ids.shape)} "
            "must both be 1-D [T]; build batches with PackedBatch.from_samples"
        )
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != n:
        raise ValueError(
            f"PackedBatch.cu_seqlens={cu.tolist()} must start at 0 and end at T={n}; build batches with "
            "PackedBatch.from_samples"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"PackedBatch.cu_seqlens={cu.tolist()} must be non-decreasing")
    if batch.sample_ids and len(batch.sample_ids) != cu.numel() - 1:
        raise ValueError(
            f"PackedBatch has {cu.numel() - 1} samples but {len(batch.sample_ids)} sample_ids; give one id per sample"
        )
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1].long(), lengths.long())
    expected = torch.arange(n, dtype=torch.long) - starts
    if not torch.equal(batch.position_ids.detach().cpu().long(), expected):
        raise ValueError(
            "PackedBatch.position_ids must restart at 0 at every cu_seqlens boundary (0..len-1 per sample); "
            "build batches with PackedBatch.from_samples"
        )


def find_sample_problems(batch: PackedBatch, vocab_size: int, token_budget: int) -> list[SampleProblem]:
    """Per-sample reasons the target cannot run a sample: empty, over the budget, or out-of-vocab ids."""
    lengths = batch.lengths
    ids = batch.input_ids.detach().cpu()
    bad_token = (ids < 0) | (ids >= vocab_size)
    bad_per_sample = [0] * len(lengths)
    if bool(bad_token.any()):
        owner = torch.searchsorted(batch.cu_seqlens.cpu().long(), bad_token.nonzero().flatten(), right=True) - 1
        for i in owner.tolist():
            bad_per_sample[i] += 1
    problems = []
    for i, n in enumerate(lengths):
        sid = batch.sample_ids[i] if batch.sample_ids else None
        if n == 0:
            problems.append(SampleProblem(i, sid, "it has no tokens", "drop empty samples before packing"))
        elif n > token_budget:
            problems.append(SampleProblem(
                i, sid, f"its {n} tokens exceed engine.token_budget={token_budget}",
                "truncate samples to data.max_length <= engine.token_budget or raise engine.token_budget",
            ))
        if bad_per_sample[i]:
            start = int(batch.cu_seqlens[i])
            seg = ids[start:start + n]
            bad_ids = seg[(seg < 0) | (seg >= vocab_size)].unique()[:5].tolist()
            problems.append(SampleProblem(
                i, sid, f"{bad_per_sample[i]} token ids outside [0, {vocab_size}) (e.g. {bad_ids})",
                "tokenise with the target's own tokenizer (target.tokenizer) and rebuild the data cache",
            ))
    return problems


def drop_samples(batch: PackedBatch, indices: list[int]) -> PackedBatch:
    """The batch without the samples at `indices` (batch positions), repacked."""
    drop = set(indices)
    cu = batch.cu_seqlens.tolist()
    keep = [i for i in range(len(cu) - 1) if i not in drop]
    samples = [
        (batch.input_ids[cu[i]:cu[i + 1]].tolist(), batch.loss_mask[cu[i]:cu[i + 1]].tolist()) for i in keep
    ]
    ids = [batch.sample_ids[i] for i in keep] if batch.sample_ids else []
    return PackedBatch.from_samples(samples, ids)


def pinned(t: torch.Tensor) -> torch.Tensor:
    """A host tensor in page-locked memory (GPU tensors as they are), for non_blocking copies to the GPU:
    a copy from pageable memory first waits for the stream to drain (CUDA's rule for pageable
    transfers), idling the GPU at every batch while the host prepares the next one."""
    if t.is_cuda or not torch.cuda.is_available() or t.is_pinned():
        return t
    return t.pin_memory()


def capture_destination(
    out: Optional[dict[str, torch.Tensor]],
    rows: int,
    plan: CapturePlan,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Views of the first `rows` rows of `out` (checked against the plan's shapes), or fresh tensors."""
    widths = plan.widths
    if out is None:
        return {name: torch.empty(rows, w, dtype=dtype, device=device) for name, w in widths.items()}
    dst = {}
    for name, width in widths.items():
        if name not in out:
            raise ValueError(f"capture(out=...) lacks {name!r}; pass views for {sorted(widths)}")
        t = out[name]
        if t.dim() != 2 or t.shape[1] != width or t.shape[0] < rows:
            raise ValueError(
                f"capture(out[{name!r}]) has shape {tuple(t.shape)}, the engine needs at least ({rows}, {width}); "
                "size the handoff slots with the draft strategy's payload_specs(plan, token_budget, dtype)"
            )
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"capture(out[{name!r}]) is {t.dtype} on {t.device}, the engine produces {dtype} on {device}; "
                "allocate the handoff slots with the engine's dtype and device"
            )
        dst[name] = t[:rows]
    return dst
