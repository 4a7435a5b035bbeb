"""The frozen target lm_head and the target-side tensors the draft borrows.

The engine hands over the target's final (post-norm) hidden states instead of logits (~40x fewer
bytes); TargetHead turns them into what the loss needs: the target distribution restricted to the
draft vocabulary, and the full-vocabulary argmax mapped into it. Full-vocab logits exist only one
chunk of rows at a time. The weights are read straight from the target checkpoint, one tensor each,
without building the target model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

EMBEDDING_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
LM_HEAD_NAMES = ("lm_head.weight", "model.language_model.lm_head.weight")


def _safetensors_files(path: str) -> dict[str, str]:
    """tensor name -> file for a local HF checkpoint directory (sharded or single file)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {name: os.path.join(path, file) for name, file in json.load(f)["weight_map"].items()}
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}: point target.path at a local HF checkpoint directory")
    names: dict[str, str] = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as handle:
            names.update({name: os.path.join(path, file) for name in handle.keys()})
    return names


def read_checkpoint_tensor(path: str, candidates: tuple[str, ...]) -> Optional[torch.Tensor]:
    """The first of `candidates` present in the checkpoint at `path`, read alone; None if none is."""
    from safetensors import safe_open
    names = _safetensors_files(path)
    for name in candidates:
        if name in names:
            with safe_open(names[name], framework="pt") as handle:
                return handle.get_tensor(name)
    return None


def _ties_embeddings(path: str) -> Optional[bool]:
    """tie_word_embeddings from the checkpoint's config.json (top level or text_config); None if unset."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        data = json.load(f)
    return data.get("tie_word_embeddings", (data.get("text_config") or {}).get("tie_word_embeddings"))


def load_target_embedding(target: Union[str, nn.Module]) -> torch.Tensor:
    """The target's input embedding [vocab, hidden]: from a loaded HF model or a checkpoint directory."""
    if isinstance(target, nn.Module):
        return target.get_input_embeddings().weight.detach()
    weight = read_checkpoint_tensor(target, EMBEDDING_NAMES)
    if weight is None:
        raise KeyError(f"target checkpoint {target!r} has none of {list(EMBEDDING_NAMES)}: cannot copy the embedding")
    return weight


def load_target_lm_head(target: Union[str, nn.Module]) -> torch.Tensor:
    """The target's output projection [vocab, hidden]; the embedding when the target ties them."""
    if isinstance(target, nn.Module):
        return target.get_output_embeddings().weight.detach()
    tied = _ties_embeddings(target)
    weight = None if tied else read_checkpoint_tensor(target, LM_HEAD_NAMES)
    if weight is None:
        if tied is False:
            raise KeyError(f"target checkpoint {target!r} sets tie_word_embeddings=false but has none of "
                           f"{list(LM_HEAD_NAMES)}")
        weight = load_target_embedding(target)
    return weight


@dataclass
class TargetDistribution:
    probs: torch.Tensor  # [T, draft_vocab]: target softmax over the draft-vocab columns, renormalised
    draft_argmax: torch.Tensor  # [T] int64: the full-vocab argmax as a draft id, -1 when outside the draft vocab

    @property
    def in_draft_vocab(self) -> torch.Tensor:
        return self.draft_argmax >= 0


class TargetHead:
    """Frozen, replicated target lm_head plus the draft<->target id maps. Never trained."""

    def __init__(self, weight: torch.Tensor, d2t: torch.Tensor, chunk_rows: int = 1024,
                 probs_dtype: torch.dtype = torch.float32):
        if weight.dim() != 2 or d2t.dim() != 1:
            raise ValueError(f"TargetHead needs weight [vocab, hidden] and d2t [draft_vocab], got "
                             f"{tuple(weight.shape)} and {tuple(d2t.shape)}")
        if chunk_rows <= 0:
            raise ValueError(f"TargetHead chunk_rows={chunk_rows} must be > 0")
        vocab = weight.shape[0]
        draft_to_target = torch.arange(d2t.numel(), device=d2t.device) + d2t.to(torch.long)
        if int(draft_to_target.min()) < 0 or int(draft_to_target.max()) >= vocab:
            raise ValueError(f"d2t maps draft ids outside the target vocab [0, {vocab}): the vocab map was built "
                             f"for another target")
        self.weight = weight.detach()
        self.chunk_rows, self.probs_dtype = chunk_rows, probs_dtype
        self.draft_to_target = draft_to_target.to(weight.device)
        self.target_to_draft = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
        self.target_to_draft[self.draft_to_target] = torch.arange(d2t.numel(), device=weight.device)

    @classmethod
    def from_pretrained(cls, target: Union[str, nn.Module], d2t: torch.Tensor, device: torch.device,
                        dtype: torch.dtype, **kwargs) -> "TargetHead":
        weight = load_target_lm_head(target).to(device=device, dtype=dtype)
        return cls(weight, d2t.to(device), **kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @torch.no_grad()
    def target_probs(self, final_hidden: torch.Tensor) -> TargetDistribution:
        """final_hidden [T, H] (after the target's final norm) -> TargetDistribution, chunk by chunk."""
        if final_hidden.dim() != 2 or final_hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(f"final_hidden shape {tuple(final_hidden.shape)} != [T, {self.weight.shape[1]}]: it "
                             f"must be the target's last hidden state after its final norm")
        tokens = final_hidden.shape[0]
        probs = torch.empty(tokens, self.draft_to_target.numel(), dtype=self.probs_dtype, device=self.weight.device)
        draft_argmax = torch.empty(tokens, dtype=torch.long, device=self.weight.device)
        for start in range(0, tokens, self.chunk_rows):
            rows = final_hidden[start:start + self.chunk_rows].to(device=self.weight.device, dtype=self.weight.dtype)
            logits = rows @ self.weight.T  # [chunk, full vocab], transient
            draft_argmax[start:start + rows.shape[0]] = self.target_to_draft[logits.argmax(dim=-1)]
            restricted = logits.index_select(1, self.draft_to_target)
            restricted = restricted.to(torch.promote_types(restricted.dtype, torch.float32))
            probs[start:start + rows.shape[0]] = torch.softmax(restricted, dim=-1).to(self.probs_dtype)
        return TargetDistribution(probs, draft_argmax)
