"""Engine tensor parallelism for the hf backend (engine.tp = T).

T engines of one node form a TP group. Each step the group runs ONE forward over the concatenation
of its members' packed batches (attention stays inside samples), with the decoder weights sharded
Megatron-style: q/k/v and gate/up split by output rows (column parallel), o_proj and down_proj split
by input columns (row parallel) and summed across the group with one all-reduce each. Embeddings and
norms are replicated, so every member ends with the full hidden states and keeps its own rows:
TP rank j hands shard j to its own trainer. With more members than KV heads (T a multiple of them,
e.g. Qwen3-235B-A22B's 4 KV heads on 8 GPUs) each KV head is replicated on T/kv members. MoE layers:
the router is replicated and every expert split on its intermediate features (lib/engine/moe.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lib.data.batch import PackedBatch
from lib.engine.base import EngineInputError, SampleProblem
from lib.engine.moe import dense_parts_beside_experts, moe_experts, moe_intermediate_size, shard_experts


def _shard_rows(linear: nn.Linear, rank: int, size: int) -> None:
    """Keep this rank's slice of the output features (column parallel)."""
    n = linear.out_features // size
    linear.weight = nn.Parameter(linear.weight.data[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    linear.out_features = n


def _shard_columns(linear: nn.Linear, rank: int, size: int) -> None:
    """Keep this rank's slice of the input features (row parallel); the bias is added once, by rank 0."""
    n = linear.in_features // size
    linear.weight = nn.Parameter(linear.weight.data[:, rank * n:(rank + 1) * n].clone(), requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = None
    linear.in_features = n


class TensorParallel:
    """One engine TP group: weight sharding at load, batch gathering at every capture."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # NCCL moves only CUDA tensors; gloo only CPU ones.
        self.comm_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.device = device

    def shard(self, layers: nn.ModuleList, config) -> None:
        """Replace each decoder layer's projections by this rank's shards and all-reduce their sums."""
        reason = tp_incompatibility(config, self.size)
        if reason:
            raise ValueError(f"{reason}; pick an engine.tp that divides it (or engine.tp=1)")
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(attn, name, None), nn.Linear):
                    raise ValueError(
                        f"engine.tp={self.size}: target attention {type(attn).__name__} has no Linear `{name}`; "
                        "engine TP supports Llama/Qwen-style attention only (use engine.tp=1)"
                    )
            experts = moe_experts(nn.ModuleList([mlp]))
            for name in ("gate_proj", "up_proj", "down_proj") if not experts else ():
                if not isinstance(getattr(mlp, name, None), nn.Linear):
                    raise ValueError(
                        f"engine.tp={self.size}: target MLP {type(mlp).__name__} has no Linear `{name}`; "
                        "engine TP supports gated Llama/Qwen-style MLPs only (use engine.tp=1)"
                    )
            _shard_rows(attn.q_proj, self.rank, self.size)
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            if kv_heads % self.size == 0:
                for lin in (attn.k_proj, attn.v_proj):
                    _shard_rows(lin, self.rank, self.size)
            else:
                # More members than KV heads (tp_incompatibility: T a multiple of them): each KV head is
                # replicated on T/kv members, whose query heads all read that one KV head.
                for lin in (attn.k_proj, attn.v_proj):
                    _shard_rows(lin, self.rank // (self.size // kv_heads), kv_heads)
            if hasattr(attn, "num_key_value_groups"):  # eager/sdpa repeat each local KV head this often
                attn.num_key_value_groups = (heads // self.size) // max(kv_heads // self.size, 1)
            _shard_columns(attn.o_proj, self.rank, self.size)
            sinks = getattr(attn, "sinks", None)
            if isinstance(sinks, torch.Tensor):  # gpt-oss: one sink logit per query head, split with the heads
                n = sinks.numel() // self.size
                attn.sinks = nn.Parameter(sinks.data[self.rank * n:(self.rank + 1) * n].clone(), requires_grad=False)
            if experts:
                # MoE layer: the router stays whole on every rank, each expert is split like a dense MLP.
                # Dense parts beside the experts (shared experts) would be summed T times by the all-reduce.
                extra = dense_parts_beside_experts(mlp)
                if extra:
                    raise ValueError(f"engine.tp={self.size}: target MoE block {type(mlp).__name__} has dense parts "
                                     f"beside its experts ({', '.join(extra)}, e.g. shared experts) that engine TP "
                                     "does not shard; use engine.tp=1")
                for module in experts:
                    shard_experts(module, self.rank, self.size)
            else:
                _shard_rows(mlp.gate_proj, self.rank, self.size)
                _shard_rows(mlp.up_proj, self.rank, self.size)
                _shard_columns(mlp.down_proj, self.rank, self.size)
            # Hooks on the attention/MLP modules (not the inner Linears), so a compiled module forward
            # keeps the collective outside its graph.
            attn.register_forward_hook(self._all_reduce_attention)
            mlp.register_forward_hook(self._all_reduce_mlp)

    def _all_reduce_attention(self, module: nn.Module, args, output):
        dist.all_reduce(output[0], group=self.group)
        return output

    def _all_reduce_mlp(self, module: nn.Module, args, output):
        # gpt-oss's MoE block returns (hidden, router scores); the scores are replicated already.
        dist.all_reduce(output[0] if isinstance(output, tuple) else output, group=self.group)
        return output

    def gather(
        self, batch: PackedBatch, problems: list[SampleProblem]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], slice]:
        """All members' batches as one packed sequence on the engine device, and this rank's rows.

        Every member learns whether any member has bad samples before any forward starts, so all of
        them raise EngineInputError together instead of leaving the others waiting in a collective.
        """
        n_tok, n_seq = batch.num_tokens, len(batch.lengths)
        meta = torch.tensor([n_tok, n_seq, len(problems)], dtype=torch.int64, device=self.comm_device)
        metas = [torch.empty_like(meta) for _ in range(self.size)]
        dist.all_gather(metas, meta, group=self.group)
        sizes = torch.stack(metas).cpu().tolist()
        if any(bad for _, _, bad in sizes):
            raise EngineInputError(problems, peer_bad=not problems)
        max_tok = max(t for t, _, _ in sizes)
        max_seq = max(s for _, s, _ in sizes)
        # One padded int64 message per member: [ids | positions | lengths].
        msg = torch.zeros(2 * max_tok + max_seq, dtype=torch.int64)
        msg[:n_tok] = batch.input_ids
        msg[max_tok:max_tok + n_tok] = batch.position_ids
        msg[2 * max_tok:2 * max_tok + n_seq] = torch.tensor(batch.lengths, dtype=torch.int64)
        msg = msg.to(self.comm_device)
        msgs = [torch.empty_like(msg) for _ in range(self.size)]
        dist.all_gather(msgs, msg, group=self.group)
        ids, pos, lengths = [], [], []
        for (t, s, _), m in zip(sizes, msgs):
            ids.append(m[:t])
            pos.append(m[max_tok:max_tok + t])
            lengths.extend(m[2 * max_tok:2 * max_tok + s].tolist())
        start = sum(t for t, _, _ in sizes[:self.rank])
        return (
            torch.cat(ids).to(self.device),
            torch.cat(pos).to(self.device),
            lengths,
            slice(start, start + n_tok),
        )


def tp_incompatibility(config, tp: int) -> Optional[str]:
    """Why `tp` members cannot shard this target config, or None when they can."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if kv_heads % tp and tp % kv_heads:
        return (f"engine.tp={tp} does not divide the target's num_key_value_heads={kv_heads} "
                "(nor is it a multiple of them, which would replicate each KV head)")
    for what, value in (("num_attention_heads", heads),
                        ("intermediate_size", int(config.intermediate_size)),
                        ("moe_intermediate_size (per expert)", moe_intermediate_size(config) or tp)):
        if value % tp:
            return f"engine.tp={tp} does not divide the target's {what}={value}"
    return None
