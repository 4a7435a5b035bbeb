"""Useful FLOPs of the two roles, counted from shapes (matmuls and attention; norms etc. ignored).

Used by the benchmarks to turn step times into TFLOP/s and MFU. Attention counts only the causal
half of each sample's square (what a document-masked kernel must do).
"""
from __future__ import annotations

BF16_PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16, datasheet


def _attn_pairs(lengths: list[int]) -> float:
    """Sum over samples of the causal (query, key) pairs."""
    return sum(n * (n + 1) / 2 for n in lengths)


def _window_pairs(lengths: list[int], window: int) -> float:
    """Sum over samples of the (query, key) pairs of a causal sliding window (query + window-1 before)."""
    return sum(n * (n + 1) / 2 if n <= window else window * (window + 1) / 2 + (n - window) * window
               for n in lengths)


def mlp_matmul_params(hf) -> float:
    """MLP matmul parameters one token runs through, summed over layers: the ACTIVE ones for MoE
    targets (its k routed experts plus the router), the whole gated MLP for dense layers."""
    h, layers = hf.hidden_size, hf.num_hidden_layers
    dense = 3 * h * hf.intermediate_size
    if getattr(hf, "model_type", "") == "gpt_oss":  # every layer MoE; intermediate_size is per expert
        return layers * (hf.num_experts_per_tok * dense + hf.num_local_experts * h)
    experts = getattr(hf, "num_experts", 0) or 0
    if experts and getattr(hf, "moe_intermediate_size", None):  # qwen3_moe-style
        moe = hf.num_experts_per_tok * 3 * h * hf.moe_intermediate_size + experts * h
        step, dense_only = getattr(hf, "decoder_sparse_step", 1) or 1, set(getattr(hf, "mlp_only_layers", []) or [])
        return sum(moe if i not in dense_only and (i + 1) % step == 0 else dense for i in range(layers))
    return layers * dense


def attention_pairs(hf, lengths: list[int]) -> float:
    """Causal (query, key) pairs summed over layers; sliding-window layers (gpt-oss) count their window."""
    types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    full, window = _attn_pairs(lengths), getattr(hf, "sliding_window", None)
    return sum(_window_pairs(lengths, window) if t == "sliding_attention" and window else full for t in types)


def target_forward_flops(hf, lengths: list[int], with_lm_head: bool = False) -> float:
    """Prefill FLOPs of a Llama/Qwen-style decoder over packed samples (MoE: active parameters only)."""
    h, layers = hf.hidden_size, hf.num_hidden_layers
    heads, kv = hf.num_attention_heads, hf.num_key_value_heads
    d = getattr(hf, "head_dim", None) or h // heads
    tokens = sum(lengths)
    per_token = 2 * (layers * (h * heads * d + 2 * h * kv * d + heads * d * h) + mlp_matmul_params(hf))
    attn = 4 * heads * d * attention_pairs(hf, lengths)
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
