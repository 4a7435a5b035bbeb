"""The draft vocabulary: the most frequent target tokens under the loss mask, and its two maps.

d2t [draft_vocab] int64 holds offsets (target_id = draft_id + d2t[draft_id]); t2d [target_vocab]
bool marks the target ids the draft can emit. Draft ids follow ascending target id, so offsets are
non-negative and non-decreasing. The map is saved in the run directory once and reused on resume
and fine-tuning: rebuilding it would silently permute lm_head rows against a trained checkpoint.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from lib.launch.runtime import RunContext

VOCAB_MAP_FILENAME = "vocab_map.safetensors"


def build_vocab_map(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `draft_vocab_size` ids by count; ties (including the zero counts that fill a small corpus)
    go to the lower token id, so the result is deterministic."""
    if token_counts.dim() != 1:
        raise ValueError(f"token_counts must be 1-D [target_vocab], got shape {tuple(token_counts.shape)}")
    vocab = token_counts.numel()
    if not 0 < draft_vocab_size <= vocab:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, {vocab}] (the target vocab size)")
    if bool((token_counts < 0).any()):
        raise ValueError("token_counts has negative entries: pass occurrence counts")
    order = torch.sort(token_counts.to(torch.float64), descending=True, stable=True).indices
    chosen = torch.sort(order[:draft_vocab_size]).values
    d2t = chosen - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    return d2t.to(torch.long), t2d


def check_vocab_map(d2t: torch.Tensor, t2d: torch.Tensor) -> None:
    """d2t and t2d describe the same ascending set of target ids."""
    if d2t.dtype != torch.long or t2d.dtype != torch.bool or d2t.dim() != 1 or t2d.dim() != 1:
        raise ValueError(f"vocab map must be d2t int64 [draft_vocab] and t2d bool [target_vocab], got "
                         f"{d2t.dtype} {tuple(d2t.shape)} and {t2d.dtype} {tuple(t2d.shape)}")
    target_ids = torch.arange(d2t.numel()) + d2t.cpu()
    expected = torch.nonzero(t2d.cpu()).squeeze(1)
    if target_ids.numel() != expected.numel() or not torch.equal(target_ids, expected):
        raise ValueError("vocab map is inconsistent: arange(draft_vocab) + d2t must list exactly the ids where "
                         "t2d is true, ascending; rebuild it with build_vocab_map")


def save_vocab_map(run_dir: str, d2t: torch.Tensor, t2d: torch.Tensor) -> str:
    """Write run_dir/vocab_map.safetensors; refuses to replace a different existing map."""
    from safetensors.torch import save_file
    check_vocab_map(d2t, t2d)
    path = os.path.join(run_dir, VOCAB_MAP_FILENAME)
    if os.path.exists(path):
        old_d2t, old_t2d = load_vocab_map(run_dir)
        if torch.equal(old_d2t, d2t.cpu()) and torch.equal(old_t2d, t2d.cpu()):
            return path
        raise FileExistsError(f"{path} already holds a different vocab map; a trained draft depends on it: "
                              f"use a fresh run.dir to build a new one")
    os.makedirs(run_dir, exist_ok=True)
    tmp = path + ".tmp"
    save_file({"d2t": d2t.cpu().contiguous(), "t2d": t2d.cpu().contiguous()}, tmp)
    os.replace(tmp, path)
    return path


def load_vocab_map(run_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file
    path = os.path.join(run_dir, VOCAB_MAP_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no vocab map at {path}")
    tensors = load_file(path)
    missing = [k for k in ("d2t", "t2d") if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a vocab map written by save_vocab_map")
    check_vocab_map(tensors["d2t"], tensors["t2d"])
    return tensors["d2t"], tensors["t2d"]


def ensure_vocab_map(run_dir: str, draft_vocab_size: int, target_vocab_size: int,
                     count_tokens: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's vocab map: loaded if run_dir has one (count_tokens is then not called), else built
    from count_tokens() (a [target_vocab] count of loss-masked tokens) and saved."""
    if os.path.isfile(os.path.join(run_dir, VOCAB_MAP_FILENAME)):
        d2t, t2d = load_vocab_map(run_dir)
        if d2t.numel() != draft_vocab_size or t2d.numel() != target_vocab_size:
            raise ValueError(f"{os.path.join(run_dir, VOCAB_MAP_FILENAME)} maps {d2t.numel()} draft ids onto a "
                             f"{t2d.numel()}-token target, but this run asks for draft_vocab_size="
                             f"{draft_vocab_size} over {target_vocab_size}: keep draft.draft_vocab_size="
                             f"{d2t.numel()} or start a fresh run.dir")
        return d2t, t2d
    counts = count_tokens()
    if counts.numel() != target_vocab_size:
        raise ValueError(f"token counts cover {counts.numel()} ids, the target vocab has {target_vocab_size}")
    d2t, t2d = build_vocab_map(counts, draft_vocab_size)
    save_vocab_map(run_dir, d2t, t2d)
    return d2t, t2d


def _token_counts(ctx: RunContext, vocab_size: int) -> torch.Tensor:
    from lib.data.datasets import load_dataset, token_counts

    return token_counts(load_dataset(ctx.cfg.data, ctx.tokenizer_path, "train"), vocab_size)


def vocab_map(ctx: RunContext, vocab_size: int, draft_vocab: int,
              init_map: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per run by the trainer leader, loaded by all. init_map: the (d2t, t2d) of the draft
    being fine-tuned (draft.init_from), whose rows must keep their meaning."""
    group = ctx.groups.trainer_gloo
    if ctx.is_trainer_leader:
        if init_map is not None:
            save_vocab_map(ctx.run_dir, *init_map())
        ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, lambda: _token_counts(ctx, vocab_size))
    dist.barrier(group=group)
    return ensure_vocab_map(ctx.run_dir, draft_vocab, vocab_size, _no_rebuild)


def _no_rebuild() -> torch.Tensor:
    raise RuntimeError("the trainer leader did not write vocab_map.safetensors; see its log")
