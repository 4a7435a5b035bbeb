"""The rule every family's FLOP count follows (lib/drafts/<family>/flops.py), for the trainer-step
benchmark's MFU (bench/trainer.py).

Useful FLOPs of one training step, counted from shapes and the step's own batch layout:
- matmuls only (norms, rotary, softmax, losses, depthwise convolutions and optimizer updates are
  left out: elementwise work, small against the matmuls at the shapes measured);
- a matmul [m, k] @ [k, n] costs 2mkn forward; backward adds the input gradient when the input
  needs one and the weight gradient when the weight trains, 2mkn each (so a trainable layer inside
  the graph counts 3x, a layer reading captured states 2x, a frozen head 2x or 1x);
- attention counts 4 * heads * head_dim per visible (query, key) pair forward (scores and values),
  3x with backward; only the pairs the family's mask lets through;
- rows the family never computes (e.g. logits of rows without a loss) are not counted, and
  recomputation (train.recompute, a flash kernel's backward) is not useful work.
"""
from __future__ import annotations


def linear(rows: float, fan_in: int, fan_out: int, input_grad: bool = True, weight_grad: bool = True) -> float:
    """FLOPs of rows x [fan_in -> fan_out] forward plus the gradients that exist."""
    return 2.0 * rows * fan_in * fan_out * (1 + bool(input_grad) + bool(weight_grad))


def attention(pairs: float, heads: int, head_dim: int, backward: bool = True) -> float:
    """FLOPs of scores and weighted values over `pairs` visible (query, key) pairs per head."""
    return 4.0 * heads * head_dim * pairs * (3 if backward else 1)


def sample_lengths(cu_seqlens) -> list[int]:
    """Packed sample lengths from cu_seqlens (a tensor or a list)."""
    cu = [int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
    return [b - a for a, b in zip(cu, cu[1:])]


def causal_pairs(lengths: list[int]) -> float:
    """Sum over samples of the causal (query, key) pairs, keys up to and including the query."""
    return float(sum(n * (n + 1) // 2 for n in lengths))
