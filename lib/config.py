"""Configuration schema: one dataclass per concern, validated before any process group or model load.

Hydra composes conf/ on top of these dataclasses (structured configs), so an unknown key is an error
at composition time. `validate()` then checks what types cannot: ranges, sums, paths and the fit
between the config and the launch (process count, GPUs). Every failure is one line that names the
key, the value and the fix.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TARGET_DIR = os.path.join(REPO_ROOT, "assets", "tiny_target")
TINY_DATA_DIR = os.path.join(REPO_ROOT, "assets", "tiny_data")
MEMORY_HEADROOM = 0.10  # CUDA contexts, NCCL buffers and fragmentation


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the value and the fix."""


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


@dataclass
class TargetConfig:
    name: str = "tiny"
    path: Optional[str] = None  # local HF checkpoint directory (config.json + safetensors + tokenizer)
    random_init: bool = False  # build from `path`'s config.json or `hf_config` with random weights
    hf_config: Optional[dict[str, Any]] = None  # model shape for random_init without a path
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    aux_layers: Optional[list[int]] = None  # default [1, L/2-1, L-4]


@dataclass
class DraftConfig:
    name: str = "eagle3"
    draft_vocab_size: int = 32000  # clipped to the target vocab
    init_from: Optional[str] = None  # an existing draft export to fine-tune (reuses its vocab map)
    intermediate_size: Optional[int] = None  # default: the target's
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None


@dataclass
class DataConfig:
    name: str = "tiny"
    path: Optional[str] = None  # JSON Lines of conversations (data=tiny sets the embedded corpus)
    heldout_path: Optional[str] = None  # prompts for evaluation; None -> last `heldout_size` lines of path
    heldout_size: int = 64
    template: str = "auto"  # auto: the tokenizer's own chat template; else a registered name
    max_length: int = 2048
    overlong: str = "truncate"  # truncate | skip
    cache_dir: Optional[str] = None  # default: next to the data file
    num_workers: int = 0  # tokenisation processes; 0 -> min(8, cpus)


@dataclass
class PlacementConfig:
    name: Placement = Placement.colocate


@dataclass
class EngineConfig:
    backend: str = "hf"  # hf | sglang
    tp: int = 1
    token_budget: int = 8192  # tokens per packed batch
    compile: Optional[bool] = None  # None: torch.compile the target layers on GPU (~30% faster), not on CPU
    attn_impl: str = "auto"  # auto (varlen on CUDA bf16, sdpa otherwise) | varlen | sdpa | eager


@dataclass
class HandoffConfig:
    slots: int = 3  # the engine runs up to slots-1 steps ahead


@dataclass
class TrainConfig:
    max_steps: int = 200  # 0 = dry run: build groups, check them, write topology.json, exit
    ttt_length: int = 7
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    # None: fuse the draft step's elementwise work with torch.compile on GPU (32B shape: 488 -> 456 ms per
    # step on an H200), not on CPU where compiling costs more than it saves (lib/drafts/eagle3/fused.py)
    compile: Optional[bool] = None


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
class RunConfig:
    dir: str = "auto"  # auto: outputs/<time>, chosen by rank 0 when the launcher set none
    startup_timeout_s: int = 900
    loop_timeout_s: int = 120
    dry_run: bool = False
    stop_after_steps: int = 0  # >0: stop this job after that many steps (checkpointed), e.g. for time-limited allocations


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
    device: Device = Device.auto
    mps: MpsMode = MpsMode.auto
    train_frac: float = 0.45
    infer_frac: float = 0.45


# ---------------------------------------------------------------------------------------------
# Composition and validation
# ---------------------------------------------------------------------------------------------

CONF_DIR = os.path.join(REPO_ROOT, "conf")
ENGINE_BACKENDS = ("hf", "sglang")
OVERLONG_POLICIES = ("truncate", "skip")


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("repo"):
        # Paths to embedded assets must not depend on the working directory of the launch.
        OmegaConf.register_new_resolver("repo", lambda rel="": os.path.join(REPO_ROOT, rel))
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
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            node = hydra_compose(config_name="config", overrides=list(overrides))
        return OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain_hydra_error(exc)) from None


def _explain_hydra_error(exc: BaseException) -> str:
    # Hydra wraps the useful line ("Invalid value ...", "Key ... not in ...") in its cause.
    cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    useful = [ln for ln in lines if not ln.startswith(("full_key", "reference_type", "object_type"))]
    first = " ".join(useful[:2]) if useful else type(exc).__name__
    where = f"{key}: " if key else ""
    if "Could not find" in first or "Could not load" in first:
        groups = {g: sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, g)) if f.endswith(".yaml"))
                  for g in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, g))}
        options = "; ".join(f"{g}: {', '.join(v)}" for g, v in sorted(groups.items()))
        return f"{first.split(' Available')[0]}. Fix: pick a shipped option ({options}) or add a file under conf/."
    if "not in" in first and "Key" in first:
        return f"{where}unknown key ({first}). Fix: check the spelling against lib/config.py."
    if "Missing mandatory value" in first:
        return f"{first}. Fix: set it on the command line, e.g. data.path=/data/chat.jsonl."
    return f"{where}{first}. Fix: correct the override (see lib/config.py for keys and types)."


@dataclass(frozen=True)
class LaunchShape:
    """What torchrun started, read from its environment: the config must fit it."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    gpus_per_node: int  # visible CUDA devices on this node (0 without CUDA)

    @staticmethod
    def from_env(gpus_per_node: int) -> "LaunchShape":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        return LaunchShape(world, local, max(1, world // max(local, 1)), gpus_per_node)


def resolve_device(cfg: Config, gpus_per_node: int) -> Device:
    if cfg.device == Device.auto:
        return Device.cuda if gpus_per_node > 0 else Device.cpu
    return cfg.device


def validate(cfg: Config, shape: LaunchShape) -> None:
    """Checks every rank runs before any process group or model load; raises ConfigError."""
    _check_fractions(cfg)
    _check_ranges(cfg)
    _check_paths(cfg)
    _check_launch_fit(cfg, shape)


def _fail(key: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{key}={value!r}: {fix}")


def _check_fractions(cfg: Config) -> None:
    for key in ("train_frac", "infer_frac"):
        value = getattr(cfg, key)
        if not 0.0 < value < 1.0:
            _fail(key, value, "must be in (0, 1), e.g. 0.45")
    total = cfg.train_frac + cfg.infer_frac + MEMORY_HEADROOM
    if total > 1.0 + 1e-9:
        _fail("train_frac+infer_frac", round(cfg.train_frac + cfg.infer_frac, 4),
              f"must leave {MEMORY_HEADROOM:.2f} headroom (sum <= {1 - MEMORY_HEADROOM:.2f}); "
              f"lower one, e.g. train_frac={cfg.train_frac} infer_frac={round(0.9 - cfg.train_frac, 4)}")


def _check_ranges(cfg: Config) -> None:
    positive = {
        "engine.tp": cfg.engine.tp, "engine.token_budget": cfg.engine.token_budget,
        "handoff.slots": cfg.handoff.slots, "train.ttt_length": cfg.train.ttt_length,
        "train.grad_accum": cfg.train.grad_accum, "draft.draft_vocab_size": cfg.draft.draft_vocab_size,
        "data.max_length": cfg.data.max_length, "train.log_every": cfg.train.log_every,
        "run.loop_timeout_s": cfg.run.loop_timeout_s, "run.startup_timeout_s": cfg.run.startup_timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            _fail(key, value, "must be >= 1")
    for key, value in {"train.max_steps": cfg.train.max_steps, "checkpoint.every": cfg.checkpoint.every,
                       "eval.every": cfg.eval.every, "train.warmup_steps": cfg.train.warmup_steps,
                       "run.stop_after_steps": cfg.run.stop_after_steps}.items():
        if value < 0:
            _fail(key, value, "must be >= 0")
    if cfg.train.lr <= 0:
        _fail("train.lr", cfg.train.lr, "must be > 0, e.g. 1e-4")
    if cfg.engine.backend not in ENGINE_BACKENDS:
        _fail("engine.backend", cfg.engine.backend, f"must be one of {', '.join(ENGINE_BACKENDS)}")
    if cfg.data.overlong not in OVERLONG_POLICIES:
        _fail("data.overlong", cfg.data.overlong, f"must be one of {', '.join(OVERLONG_POLICIES)}")
    if cfg.data.max_length > cfg.engine.token_budget:
        _fail("data.max_length", cfg.data.max_length,
              f"exceeds engine.token_budget={cfg.engine.token_budget}; a sample must fit one batch: "
              f"lower data.max_length or raise engine.token_budget")
    if any(k < 1 for k in cfg.eval.draft_tokens):
        _fail("eval.draft_tokens", cfg.eval.draft_tokens, "every entry must be >= 1")


def _check_paths(cfg: Config) -> None:
    t = cfg.target
    if t.path is None:
        if not (t.random_init and t.hf_config):
            _fail("target.path", None, "point it at a local HF checkpoint directory, or set "
                  "target.random_init=true with a target shape that has hf_config (e.g. target=qwen3_8b)")
    elif not os.path.isfile(os.path.join(t.path, "config.json")):
        _fail("target.path", t.path, "no config.json there; point it at a local HF checkpoint directory")
    tokenizer = t.tokenizer or t.path
    if tokenizer is None:
        _fail("target.tokenizer", None, "a random-init target needs a tokenizer directory to tokenise "
              "data.path; set target.tokenizer=/path/to/tokenizer")
    if cfg.data.path is None:
        _fail("data.path", None, "set it to a JSON Lines file of conversations, e.g. data.path=/data/chat.jsonl "
              "(or data=tiny for the embedded corpus)")
    if not os.path.isfile(cfg.data.path):
        _fail("data.path", cfg.data.path, "file not found; point it at a JSON Lines file of conversations")
    if cfg.data.heldout_path is not None and not os.path.isfile(cfg.data.heldout_path):
        _fail("data.heldout_path", cfg.data.heldout_path, "file not found; point it at a JSON Lines file, "
              "or set data.heldout_path=null to hold out the last data.heldout_size lines of data.path")
    if cfg.draft.init_from is not None and not os.path.isfile(os.path.join(cfg.draft.init_from, "config.json")):
        _fail("draft.init_from", cfg.draft.init_from, "no config.json there; point it at a draft export (draft/)")


def _check_launch_fit(cfg: Config, shape: LaunchShape) -> None:
    placement = cfg.placement.name
    p = shape.nproc_per_node
    device = resolve_device(cfg, shape.gpus_per_node)
    if device == Device.cuda and shape.gpus_per_node == 0:
        _fail("device", "cuda", "no GPU is visible; use device=cpu (or device=auto)")
    if placement != Placement.sequential and p % 2:
        _fail("nproc_per_node", p, f"placement={placement.value} needs an even process count per node "
              "(trainer r pairs with engine r + P/2); use 2x the number of pairs")
    if device == Device.cuda:
        need = {Placement.colocate: p // 2, Placement.disaggregate: p, Placement.sequential: p}[placement]
        if shape.gpus_per_node < need:
            _fail("nproc_per_node", p, f"placement={placement.value} needs {need} GPUs per node but "
                  f"{shape.gpus_per_node} are visible; use --nproc_per_node="
                  f"{shape.gpus_per_node * (2 if placement == Placement.colocate else 1)}")
    engines = p if placement == Placement.sequential else p // 2
    if engines % cfg.engine.tp:
        _fail("engine.tp", cfg.engine.tp, f"must divide the {engines} engines of a node; use one of "
              f"{[d for d in range(1, engines + 1) if engines % d == 0]}")
    if placement == Placement.sequential and cfg.engine.tp > 1:
        _fail("engine.tp", cfg.engine.tp, "placement=sequential runs one process per GPU with no engine "
              "group; use engine.tp=1 or placement=colocate")
