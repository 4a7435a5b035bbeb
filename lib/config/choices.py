"""The choice-valued config keys: one str enum per key, so Hydra refuses a value outside the choice
when it composes the config (lib/config/__init__.py re-exports them; import them from there).

draft.name is the exception: its choices are the draft families found on disk (`draft_families`), so
adding a family touches only lib/drafts/<family>/ and conf/draft/<family>.yaml. The scan reads
directories and imports nothing (launch.sh's config check must stay free of torch);
lib/drafts/base.py imports a family's package when it is first asked for it.
"""
from __future__ import annotations

import enum
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Further roots laid out like this repository (ROOT/lib/drafts/<family>/, ROOT/conf/draft/<family>.yaml),
# separated by os.pathsep: families kept outside the checkout (tests write a toy one into a temp dir).
DRAFT_ROOTS_ENV = "SPECDRAFT_DRAFT_ROOTS"


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


class Overlong(str, enum.Enum):
    truncate = "truncate"  # cut a sample to data.max_length
    skip = "skip"  # drop it (counted)


class TrainLoss(str, enum.Enum):
    """train.loss: the per-row loss of the EAGLE-3 unroll against the target's distribution over the
    draft vocabulary (lib/drafts/eagle3/loss.py; speculators 0.9.0's names in brackets)."""

    ce = "ce"  # soft cross-entropy -sum p log q: KL(p||q) plus the target's entropy [kl_div]
    lk = "lk"  # -log(alpha), alpha = sum_v min(p_v, q_v), the acceptance rate of sampled drafts [nla]
    lk_hybrid = "lk_hybrid"  # w KL(p||q) + (1 - w) TV, w = exp(-3 alpha) not differentiated [lk_hybrid]
    tv = "tv"  # total variation 1 - alpha [tv]
    jsd = "jsd"  # Jensen-Shannon divergence [jsd]


class WandbMode(str, enum.Enum):
    online = "online"
    offline = "offline"  # no network needed: the run lands in run.dir/wandb; `wandb sync` uploads it later


def draft_roots() -> list[str]:
    """This repository first, then the roots named in $SPECDRAFT_DRAFT_ROOTS that exist."""
    extra = [os.path.abspath(p) for p in os.environ.get(DRAFT_ROOTS_ENV, "").split(os.pathsep) if p]
    return [REPO_ROOT] + [p for p in dict.fromkeys(extra) if os.path.isdir(p) and p != REPO_ROOT]


def draft_families() -> dict[str, str]:
    """Family name -> its package directory: every ROOT/lib/drafts/<name>/ with an __init__.py, over
    draft_roots(). A name found under two roots is an error: which one draft=<name> loads would
    depend on the order of the roots."""
    found: dict[str, str] = {}
    for root in draft_roots():
        drafts = os.path.join(root, "lib", "drafts")
        if not os.path.isdir(drafts):
            continue
        for name in sorted(os.listdir(drafts)):
            package = os.path.join(drafts, name)
            if not (name.isidentifier() and os.path.isfile(os.path.join(package, "__init__.py"))):
                continue  # __pycache__, data folders
            if name in found:
                raise ValueError(f"draft family {name!r} is in both {found[name]} and {package}; rename one, "
                                 f"or drop its root from ${DRAFT_ROOTS_ENV}")
            found[name] = package
    return found


def draft_choice_family(choice: str) -> str:
    """The family (draft.name) that conf group choice draft=<choice> selects: a conf file may name
    another family's strategy with options (conf/draft/eagle3_1.yaml is eagle3 with fc_norm). A
    choice with no conf file is returned as given (composing it then fails with Hydra's message)."""
    import yaml

    for root in draft_roots():
        path = os.path.join(root, "conf", "draft", f"{choice}.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                name = ((yaml.safe_load(f) or {}).get("draft") or {}).get("name")
            return name if isinstance(name, str) else choice
    return choice


def draft_conf_dirs() -> list[str]:
    """The conf/ directories of the extra roots (Hydra searches them after the repository's conf/)."""
    return [os.path.join(r, "conf") for r in draft_roots()[1:] if os.path.isdir(os.path.join(r, "conf"))]
