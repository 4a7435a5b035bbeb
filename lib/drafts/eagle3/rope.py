"""Rotary position embedding of the EAGLE-3 draft: the target's rope, computed the way servers do.

The draft inherits the target's rope (theta and scaling), and sglang/vLLM serve it with their own
rotary classes from the exported config.json; the frequencies and the cos/sin scale here must equal
theirs. Supported: plain rope, llama3 (Llama 3.1+) and YaRN (gpt-oss, long-context Qwen). YaRN keys on
which the servers disagree (transformers' `attention_factor` replaces the magnitude scale, sglang's
`attn_factor` multiplies it) are refused rather than trained one way and served another.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "llama3", "yarn")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_REQUIRED = ("factor", "original_max_position_embeddings")
_YARN_OPTIONAL = ("beta_fast", "beta_slow", "truncate", "mscale", "mscale_all_dim")
# Keys transformers' rope_parameters may carry next to the scaling proper; they change nothing here.
_NEUTRAL_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor")


def rope_from_hf_config(hf_config: Any) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, rope_scaling) from either transformers 5 `rope_parameters` or the legacy keys."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    else:
        scaling = getattr(hf_config, "rope_scaling", None)
        theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError("target config has no rope_theta (neither in rope_parameters nor at top level): "
                         "pass draft override rope_theta")
    return float(theta), normalise_rope_scaling(scaling)


def normalise_rope_scaling(scaling: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """None for plain rope, else the scaling dict with `rope_type` set; errors name the missing or
    unsupported key."""
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type", "default")
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported by the draft (supported: "
                         f"{list(SUPPORTED_ROPE_TYPES)}); override draft rope_scaling")
    if rope_type == "default":
        return None
    required = _LLAMA3_KEYS if rope_type == "llama3" else _YARN_REQUIRED
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling ({rope_type}) lacks {missing}: give all of {list(required)}")
    if rope_type == "yarn":
        unknown = sorted(set(scaling) - set(_YARN_REQUIRED) - set(_YARN_OPTIONAL) - set(_NEUTRAL_KEYS))
        if unknown:
            raise ValueError(f"rope_scaling (yarn) key(s) {unknown} are not supported: sglang and transformers read "
                             f"them differently, so the draft would be served with another rope than it was "
                             f"trained with; drop them (supported: {list(_YARN_REQUIRED + _YARN_OPTIONAL)})")
        if float(scaling["factor"]) < 1.0:
            raise ValueError(f"rope_scaling (yarn) factor={scaling['factor']} must be >= 1")
    return scaling


def _yarn_correction_range(scaling: dict[str, Any], dim: int, base: float) -> tuple[float, float]:
    """The first and last rotary pair indices of YaRN's blend: pairs turning more than beta_fast times over
    the original context keep their frequency, those turning fewer than beta_slow times are interpolated."""
    context = float(scaling["original_max_position_embeddings"])

    def pair_index(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index(float(scaling.get("beta_fast") or 32)), pair_index(float(scaling.get("beta_slow") or 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim/2] (float64), scaled as `scaling` says."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "llama3":  # slow down low frequencies, keep high ones, blend in between
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        context = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
        return blend * inv_freq + (1.0 - blend) * inv_freq / factor
    # yarn: keep (extrapolate) the fast pairs, divide the slow ones by factor, a linear ramp in between
    low, high = _yarn_correction_range(scaling, head_dim, theta)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / factor * ramp + inv_freq * (1.0 - ramp)


def rope_magnitude(scaling: Optional[dict[str, Any]]) -> float:
    """The factor cos and sin are multiplied by: YaRN's attention temperature, 1 otherwise."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    factor = float(scaling["factor"])

    def magnitude(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return magnitude(float(mscale)) / magnitude(float(mscale_all_dim))
    return magnitude(1.0)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, magnitude: float = 1.0):
    """cos, sin [..., head_dim] of position * frequency, computed in fp32 (or wider for wider dtypes)."""
    compute = torch.promote_types(dtype, torch.float32)
    angles = position_ids.to(compute).unsqueeze(-1) * inv_freq.to(compute)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * magnitude).to(dtype), (angles.sin() * magnitude).to(dtype)
