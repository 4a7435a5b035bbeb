"""The seam between the draft family being trained and everything that is the same for all of them.

The engine, the handoff, the trainer loop and online evaluation never name a draft family: they ask
the run's `DraftStrategy` (cfg.draft.name, e.g. `draft=eagle3`) for
- `capture_plan`: which target layers the engine captures, and whether it keeps the final hidden state;
- `payload_specs`: the handoff payload sized from that plan;
- `build`: the trainer-side bundle (the FSDP2 unit the loop optimises, plus the family's own state);
- `prepare` / `micro_loss` / `summarize`: one optimiser step's loss and metrics;
- `export`: the draft on disk, in the formats its servers load;
- `eval_*` / `load_export` / `drafter`: speculative-decoding evaluation, online and offline;
- `recognizes`: whether an export's config.json is this family's (eval.py reads the family from it).

A family is a package lib/drafts/<name>/ whose __init__.py registers its subclass with
`register_strategy`, plus conf/draft/<name>.yaml: nothing else names it. The package is found by
scanning (lib/config/choices.py draft_families, also over $SPECDRAFT_DRAFT_ROOTS) and imported when a
config or an export first needs it, so naming one family never pulls in the others.
"""
from __future__ import annotations

import importlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import nn

from lib.config import Config, ConfigError, TargetConfig
from lib.config.choices import draft_families
from lib.data.batch import TensorSpec

# Payload names for what the engine captures; the packed batch's own tensors come first.
AUX_HIDDEN = "aux_hidden"  # [T, len(plan.layers) * hidden]: the planned layers' outputs, concatenated in order
FINAL_HIDDEN = "final_hidden"  # [T, hidden]: the last layer's output after the target's final norm
BATCH_TENSORS = (("input_ids", torch.int64), ("loss_mask", torch.bool), ("position_ids", torch.int64))


@dataclass(frozen=True)
class CapturePlan:
    """What the engine captures per token for the draft: decoder-layer outputs and the final hidden state."""

    layers: tuple[int, ...]  # decoder layers whose outputs are captured, in column order (repeats allowed)
    hidden_size: int  # the target's hidden size, one column block per layer
    final_hidden: bool = True
    extras: tuple[str, ...] = ()  # further per-token tensors; no engine backend provides any yet

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "extras", tuple(self.extras))
        if any(i < 0 for i in self.layers):
            raise ValueError(f"CapturePlan.layers={list(self.layers)} has negative layer indices; "
                             "use decoder layer indices counted from 0")
        if self.hidden_size < 1:
            raise ValueError(f"CapturePlan.hidden_size={self.hidden_size} must be >= 1: take it from the target config")
        if not self.layers and not self.final_hidden and not self.extras:
            raise ValueError("CapturePlan captures nothing: give layers, final_hidden=True or extras")

    @property
    def widths(self) -> dict[str, int]:
        """Captured tensor name -> row width, in payload order."""
        out = {}
        if self.layers:
            out[AUX_HIDDEN] = len(self.layers) * self.hidden_size
        if self.final_hidden:
            out[FINAL_HIDDEN] = self.hidden_size
        return out

    def check_target(self, num_layers: int, hidden_size: int) -> None:
        """The plan fits the loaded target; engine backends call this at load."""
        if hidden_size != self.hidden_size:
            raise ValueError(f"capture plan is for hidden size {self.hidden_size}, the target has {hidden_size}: "
                             "build the plan from this target's config")
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"capture plan layers {list(self.layers)} include {bad}, outside the target's "
                             f"{num_layers} layers [0, {num_layers - 1}]; fix target.aux_layers")
        if self.extras:
            raise ValueError(f"capture plan asks for extra tensors {list(self.extras)}; no engine backend captures "
                             "them yet: add them to lib/engine/hf.py first")


def dataclass_from_keys(cls, data: Mapping[str, Any], what: str):
    """cls(**data) for a config dataclass, with unknown keys named (e.g. a config.json of another version)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**dict(data))


def batch_payload_specs(token_budget: int) -> list[TensorSpec]:
    """The packed batch's own tensors, which every payload starts with."""
    return [TensorSpec(name, dtype, (), token_budget) for name, dtype in BATCH_TENSORS]


def capture_payload_specs(plan: CapturePlan, token_budget: int, dtype: torch.dtype) -> list[TensorSpec]:
    """The batch tensors followed by what the plan captures, each up to token_budget rows."""
    return batch_payload_specs(token_budget) + [
        TensorSpec(name, dtype, (width,), token_budget) for name, width in plan.widths.items()]


@dataclass
class DraftBundle:
    """The trainer's side of a draft: the module the loop optimises, checkpoints and pushes.

    Each family subclasses it with its own state (target head, draft config, ...); the loop only
    uses what is declared here.
    """

    model: nn.Module  # the FSDP2 unit; its forward is the family's loss

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def config_dict(self) -> dict[str, Any]:
        """The draft's config, JSON-ready: sent with online-evaluation weight pushes."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its config")


class DraftStrategy(ABC):
    """One draft family, end to end. Instances are stateless; per-run state lives in the bundle."""

    name: ClassVar[str]
    headline_metrics: ClassVar[tuple[str, ...]] = ()  # metrics-row keys the trainer log line shows after loss

    # ---- capture and handoff ----
    @abstractmethod
    def capture_plan(self, hf_config: Any, cfg: Config) -> CapturePlan:
        """What the engine captures for this family, from the target's transformers config and the run config."""

    def payload_specs(self, plan: CapturePlan, token_budget: int, dtype: torch.dtype) -> list[TensorSpec]:
        """The handoff payload: engine and trainer both size their slots with it."""
        return capture_payload_specs(plan, token_budget, dtype)

    # ---- training ----
    @abstractmethod
    def build(self, ctx) -> DraftBundle:
        """The trainer-side bundle for this run (ctx: lib.launch.runtime.RunContext); collective over trainers."""

    @abstractmethod
    def prepare(self, bundle: DraftBundle, micro: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[Any], torch.Tensor]:
        """(per-micro-batch context, this rank's loss normaliser); the loop sums the normaliser over trainers."""

    @abstractmethod
    def micro_loss(self, bundle: DraftBundle, batch: Mapping[str, torch.Tensor], context: Any,
                   normaliser: torch.Tensor, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, float32 metric sums to add up over micro-batches and trainers)."""

    @abstractmethod
    def summarize(self, sums: torch.Tensor) -> dict[str, float]:
        """Metric sums over all micro-batches and trainers -> the metrics row (must contain "loss")."""

    # ---- export ----
    @abstractmethod
    def export(self, bundle: DraftBundle, state: Mapping[str, torch.Tensor], out_dir: str, dtype: torch.dtype,
               verifier_path: Optional[str] = None) -> list[str]:
        """Write the draft from the bundle model's full state dict under out_dir; returns the directories written."""

    # ---- evaluation ----
    @abstractmethod
    def eval_weights(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What an online-evaluation push carries, from the bundle model's full state dict."""

    @abstractmethod
    def eval_model(self, config: dict[str, Any], target: nn.Module, device: torch.device,
                   dtype: torch.dtype) -> nn.Module:
        """A fresh draft for online evaluation (pushed weights are loaded into it); target: the engine's base model."""

    @abstractmethod
    def load_export(self, directory: str, device: torch.device, dtype: torch.dtype, target: nn.Module) -> nn.Module:
        """The draft from an export directory, for offline evaluation; target: the loaded causal LM."""

    @abstractmethod
    def drafter(self, model: nn.Module):
        """A lib.drafts.drafting.Drafter that proposes tokens with `model`."""

    @abstractmethod
    def recognizes(self, config_json: Mapping[str, Any]) -> bool:
        """Whether an export's config.json is this family's (the one `load_export` reads). Key on what
        the export writes to say what it is (architectures, a family-specific block), so that exactly
        one family claims any export; family_of_export asks every family."""


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_STRATEGIES: dict[str, DraftStrategy] = {}


def register_strategy(cls: type[DraftStrategy]) -> type[DraftStrategy]:
    """Class decorator: make `cls.name` selectable as draft.name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (the draft.name that selects it)")
    existing = _STRATEGIES.get(name)
    if existing is not None and type(existing) is not cls:
        raise ValueError(f"draft strategy {name!r} is already registered by {type(existing).__name__}")
    _STRATEGIES[name] = cls()
    return cls


def known_strategies() -> list[str]:
    """The families on disk (imported or not) and any strategy registered in code."""
    return sorted(set(_STRATEGIES) | set(draft_families()))


def _import_family(name: str, package_dir: str) -> None:
    """Import lib.drafts.<name>, which registers it. A family under an extra root joins this package's
    search path first, so it imports under the same name (and with the same relative imports) as one
    in the repository."""
    import lib.drafts

    parent = os.path.dirname(package_dir)
    if parent not in lib.drafts.__path__:
        lib.drafts.__path__.append(parent)
    importlib.import_module(f"lib.drafts.{name}")
    if name not in _STRATEGIES:
        raise ConfigError(f"draft.name={name!r}: {package_dir} registers no DraftStrategy named {name!r}; its "
                          f"__init__.py must import the module whose class has name = {name!r} and "
                          f"@register_strategy (lib/drafts/base.py)")


def get_strategy(name: str) -> DraftStrategy:
    """The strategy registered as `name`, importing its package on first use; an unknown name is a
    ConfigError naming draft.name and the known ones."""
    name = getattr(name, "value", name)  # a str enum member from older code
    if name not in _STRATEGIES:
        families = draft_families()
        if name in families:
            _import_family(name, families[name])
    if name not in _STRATEGIES:
        raise ConfigError(f"draft.name={name!r} is not a known draft strategy; use one of "
                          f"{', '.join(known_strategies())} (draft=<name>), or add lib/drafts/{name}/ (registering "
                          f"a DraftStrategy) and conf/draft/{name}.yaml")
    return _STRATEGIES[name]


def export_config(directory: str) -> dict[str, Any]:
    """An export's config.json."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the draft export's config ({err}); point at a draft export "
                          f"directory (config.json + model.safetensors)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object: not a draft export")
    return data


def family_of_export(directory: str, requested: Optional[str] = None,
                     fix: str = "pass draft={family}, or an export of the {requested} family") -> str:
    """The family whose export `directory` is, asked of every known family (`recognizes`).

    requested: a family the user named (draft=<name>). It must agree with the export; it decides only
    for an export no family recognizes (a third-party config without its family's keys). ConfigError,
    one line, when it disagrees (ending in `fix`, formatted with family and requested), when no family
    claims the export and none was named, or when several claim it."""
    data = export_config(directory)
    claims = [name for name in known_strategies() if get_strategy(name).recognizes(data)]
    shown = f"{os.path.join(directory, 'config.json')} (architectures={data.get('architectures')})"
    if requested is not None:
        requested = getattr(requested, "value", requested)
        get_strategy(requested)  # an unknown name fails as in the config
        if claims and requested not in claims:
            raise ConfigError(f"draft={requested} disagrees with the export: {shown} is the {' / '.join(claims)} "
                              f"family's; {fix.format(family=claims[0], requested=requested)}")
        return requested
    if len(claims) == 1:
        return claims[0]
    if not claims:
        raise ConfigError(f"{shown} is no known draft family's export (known: {', '.join(known_strategies())}); "
                          f"pass draft=<family> to say which, or point at a draft/ export directory")
    raise ConfigError(f"{shown} is claimed by several draft families ({', '.join(claims)}); pass draft=<one of them>")


def default_capture_plan(target: TargetConfig, hf_config: Any) -> CapturePlan:
    """The default draft's plan for a target alone: for engines loaded without a run config (tests, benchmarks)."""
    cfg = Config(target=target)
    return get_strategy(cfg.draft.name).capture_plan(hf_config, cfg)

