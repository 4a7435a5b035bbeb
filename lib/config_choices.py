"""The choice-valued config keys: one str enum per key, so Hydra refuses a value outside the choice
when it composes the config (lib/config.py re-exports them; import them from there)."""
from __future__ import annotations

import enum


class Placement(str, enum.Enum):
    # Member names equal their values: OmegaConf parses enums by name.
    colocate = "colocate"  # pair r shares GPU r
    disaggregate = "disaggregate"  # trainer on GPU r, engine on GPU r + P/2
    sequential = "sequential"  # one process per GPU does forward then draft step


class Device(str, enum.Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class MpsMode(str, enum.Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Backend(str, enum.Enum):
    hf = "hf"
    sglang = "sglang"


class AttnImpl(str, enum.Enum):
    auto = "auto"  # varlen on CUDA with bf16/fp16 weights, sdpa otherwise (resolve())
    varlen = "varlen"
    sdpa = "sdpa"
    eager = "eager"


class VarlenKernel(str, enum.Enum):
    flash = "flash"  # torch's FlashAttention-2 kernel (every target: GQA, sliding windows, sinks)
    cudnn = "cudnn"  # cuDNN's fused attention over the same cu_seqlens; gpt-oss layers keep flash


class MoeImpl(str, enum.Enum):
    auto = "auto"  # grouped (lib/engine/moe.py); dense targets ignore it
    grouped = "grouped"  # the engine's own: one sort per layer, torch._grouped_mm, compiled with the layer
    hf = "hf"  # transformers' experts implementation (its grouped_mm where it can dispatch)
    eager = "eager"  # transformers' per-expert loop: the reference


class TargetDtype(str, enum.Enum):
    auto = "auto"  # bfloat16 on GPU, float32 on CPU (resolve())
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"
    # Short spellings lib/engine/base.py always accepted. They are aliases (same value), so OmegaConf,
    # which looks names up, takes target.dtype=bf16 and stores the canonical member.
    bf16 = "bfloat16"
    fp16 = "float16"
    half = "float16"
    fp32 = "float32"
    float = "float32"


class DraftFamily(str, enum.Enum):
    # Each member is a DraftStrategy registered under lib/drafts/<name>/ (lib/drafts/base.py).
    eagle3 = "eagle3"
    dflash = "dflash"  # block diffusion (lib/drafts/dflash/); knobs in draft.options (conf/draft/dflash.yaml)


class Overlong(str, enum.Enum):
    truncate = "truncate"  # cut a sample to data.max_length
    skip = "skip"  # drop it (counted)


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"  # no network needed: the run lands in run.dir/wandb; `wandb sync` uploads it later
