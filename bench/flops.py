"""Useful FLOPs of the two roles, counted from shapes (matmuls and attention; norms etc. ignored).

Used by the benchmarks to turn step times into TFLOP/s and MFU. Attention counts only the causal
half of each sample's square (what a document-masked kernel must do).
"""
from __future__ import annotations

BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet


def _attn_pairs(lengths: list[int]) -> float:
    """Sum over samples of the causal (query, key) pairs."""
    return sum(n * (n + 1) / 2 for n in lengths)


def target_forward_flops(hf, lengths: list[int], with_lm_head: bool = False) -> float:
    """Prefill FLOPs of a Llama/Qwen-style decoder over packed samples."""
    h, inter, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    d = getattr(hf, "head_dim", None) or h // heads
    tokens = sum(lengths)
    per_token = layers * 2 * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter)
    attn = layers * 4 * heads * d * _attn_pairs(lengths)
    head = 2 * h * hf.vocab_size * tokens if with_lm_head else 0
    return per_token * tokens + attn + head


def draft_step_flops(dc, lengths: list[int], ttt_length: int, target_vocab: int) -> float:
    """One EAGLE-3 training step: forward + backward (2x) of the trainable draft over ttt_length
    unroll steps, plus the frozen target head's forward (once)."""
    h, inter = dc.hidden_size, dc.intermediate_size
    heads, kv, d = dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim
    tokens = sum(lengths)
    fc = 2 * dc.fc_in_features * h * tokens
    layer = 2 * tokens * (2 * h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * inter)
    head = 2 * tokens * h * dc.draft_vocab_size
    attn_step0 = 4 * heads * d * _attn_pairs(lengths)
    fwd = fc + ttt_length * (layer + head + attn_step0) + 4 * heads * d * tokens * ttt_length * (ttt_length - 1) / 2
    target_head = 2 * tokens * h * target_vocab
    return 3 * fwd + target_head
