"""validate(): the checks every rank runs on a composed config, and `python -m lib.config.check`.

    python -m lib.config.check nproc --placement P --gpus G [--nproc N]
        prints the process count per node for placement P on G visible GPUs (N: the user's NPROC, checked)
    python -m lib.config.check check --gpus G --nproc N [--nnodes K] [--] [overrides...]
        composes and validates exactly as every rank of train.py will, for that launch shape

Both print a failure as one line on stderr ("config error: <key>=<value>: <fix>") and exit 2, so a
launcher can stop before it starts MPS or torchrun.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Optional

from lib.config import (
    CONF_DIR, MEMORY_HEADROOM, Backend, Config, ConfigError, Device, LaunchShape, Overlong, Placement,
    ProcessLayout, TargetDtype, TrainLoss, VarlenKernel, WandbMode, _as_enum, _fail, check_draft_name, compose,
    resolve_attn_impl, resolve_device, target_name,
)

# Families whose strategy reads train.loss (draft=eagle3_1 is draft.name=eagle3 with an option); the others
# train with their own cross-entropy and refuse any other value here, before anything loads.
LOSS_FAMILIES = ("eagle3",)


def validate(cfg: Config, shape: LaunchShape) -> None:
    """Checks every rank (and launch.sh, once) runs before any process group or model load.

    Raises ConfigError whose one-line message names the key, the value and the fix.
    """
    _check_fractions(cfg)
    _check_ranges(cfg)
    _check_choices(cfg, shape)
    _check_paths(cfg)
    _check_launch_fit(cfg, shape)
    _check_run_dir(cfg)
    _check_metrics(cfg)


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
        "run.save_timeout_s": cfg.run.save_timeout_s,
    }
    for key, value in positive.items():
        if value < 1:
            _fail(key, value, "must be >= 1")
    for key, value in {"train.max_steps": cfg.train.max_steps, "checkpoint.every": cfg.checkpoint.every,
                       "eval.every": cfg.eval.every, "train.warmup_steps": cfg.train.warmup_steps,
                       "run.stop_after_steps": cfg.run.stop_after_steps,
                       "train.max_consecutive_skips": cfg.train.max_consecutive_skips}.items():
        if value < 0:
            _fail(key, value, "must be >= 0")
    if cfg.train.max_time_s < 0:
        _fail("train.max_time_s", cfg.train.max_time_s, "must be >= 0 (0: no time limit)")
    if cfg.train.lr <= 0:
        _fail("train.lr", cfg.train.lr, "must be > 0, e.g. 1e-4")
    if cfg.data.max_length > cfg.engine.token_budget:
        _fail("data.max_length", cfg.data.max_length,
              f"exceeds engine.token_budget={cfg.engine.token_budget}; a sample must fit one batch: "
              f"lower data.max_length or raise engine.token_budget")
    if any(k < 1 for k in cfg.eval.draft_tokens):
        _fail("eval.draft_tokens", cfg.eval.draft_tokens, "every entry must be >= 1")


def _check_choices(cfg: Config, shape: LaunchShape) -> None:
    """Choice-valued keys (also when a Config was built in Python, not composed) and their combinations."""
    from lib.data.templates import TEMPLATES  # registry only; no tokenizer or torch import

    _as_enum("engine.backend", cfg.engine.backend, Backend)
    _as_enum("engine.varlen_kernel", cfg.engine.varlen_kernel, VarlenKernel)
    _as_enum("target.dtype", cfg.target.dtype, TargetDtype)
    _as_enum("data.overlong", cfg.data.overlong, Overlong)
    draft = check_draft_name(cfg.draft.name)
    if cfg.data.template not in TEMPLATES:
        _fail("data.template", cfg.data.template, f"not a registered template; use one of {', '.join(TEMPLATES)} "
              "(auto: the tokenizer's own chat template), or register one in lib/data/templates.py")
    device = resolve_device(cfg.device, shape.gpus_per_node)
    resolve_attn_impl(cfg.engine.attn_impl, device.value, cfg.target.dtype)  # attn_impl, and its fit to device/dtype
    if cfg.train.recompute and draft != "eagle3":
        _fail("train.recompute", True, "only the EAGLE-3 unroll has it (DFlash keeps no logits for backward: its "
              "cross-entropy forms the gradient chunk by chunk in forward); drop the key for draft=dflash")
    loss = _as_enum("train.loss", cfg.train.loss, TrainLoss)
    if loss != TrainLoss.ce and draft not in LOSS_FAMILIES:
        _fail("train.loss", loss, f"only the EAGLE-3 line (draft=eagle3, draft=eagle3_1) trains with another loss "
              f"than its own cross-entropy; draft={draft} does not: drop the key or set train.loss=ce")
    if cfg.checkpoint.resume and cfg.run.dir == "auto":
        _fail("checkpoint.resume", True, "run.dir=auto makes a fresh directory, which holds no checkpoint; "
              "pass the run's directory, e.g. run.dir=outputs/20250101-120000")


def _check_paths(cfg: Config) -> None:
    t = cfg.target
    if t.path is None:
        if not (t.random_init and t.hf_config):
            _fail("target.path", None, "point it at a local HF checkpoint directory, or set "
                  "target.random_init=true with a target shape that has hf_config (e.g. target=qwen3_8b)")
    elif not (os.path.isfile(os.path.join(t.path, "config.json")) or _is_gguf(t.path)):
        _fail("target.path", t.path, "no config.json there and not a .gguf file; point it at a local HF checkpoint "
              "directory or a GGUF file")
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


def _is_gguf(path: str) -> bool:
    """A .gguf file, or a directory holding one (lib/target/checkpoint.py converts it before the run)."""
    if os.path.isfile(path):
        return path.endswith(".gguf")
    return os.path.isdir(path) and any(f.endswith(".gguf") for f in os.listdir(path))


def _check_launch_fit(cfg: Config, shape: LaunchShape) -> None:
    placement = _as_enum("placement.name", cfg.placement.name, Placement)
    p, gpus = shape.nproc_per_node, shape.gpus_per_node
    device = resolve_device(cfg.device, gpus)
    if device == Device.cuda and gpus == 0:
        _fail("device", "cuda", "no GPU is visible; use device=cpu (or device=auto)")
    layout = ProcessLayout(placement, p)
    if device == Device.cuda and gpus < layout.gpus_needed:
        _fail("nproc_per_node", p, f"placement={placement.value} needs {layout.gpus_needed} GPUs per node but "
              f"{gpus} are visible; use --nproc_per_node={ProcessLayout.for_gpus(placement, gpus).nproc}")
    engines = layout.pairs
    if engines % cfg.engine.tp:
        _fail("engine.tp", cfg.engine.tp, f"must divide the {engines} engines of a node; use one of "
              f"{[d for d in range(1, engines + 1) if engines % d == 0]}")
    if placement == Placement.sequential and cfg.engine.tp > 1:
        _fail("engine.tp", cfg.engine.tp, "placement=sequential runs one process per GPU with no engine "
              "group; use engine.tp=1 or placement=colocate")
    if cfg.eval.every > 0 and cfg.engine.tp > 1:
        # Online evaluation decodes on pair 0's engine with a whole, unsplit target.
        _fail("eval.every", cfg.eval.every, f"online evaluation needs engine.tp=1 (got engine.tp={cfg.engine.tp}); "
              "set eval.every=0 and evaluate the export afterwards with eval.py, or use engine.tp=1")


def _check_metrics(cfg: Config) -> None:
    """The metric sinks' packages are optional: a sink asked for must be importable before the run starts."""
    import importlib.util

    m = cfg.metrics
    _as_enum("metrics.wandb.mode", m.wandb.mode, WandbMode)
    if m.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        _fail("metrics.tensorboard", True, "needs the tensorboardX package (pip install -r requirements.txt, or "
              "pip install tensorboardX); or set metrics.tensorboard=false")
    if m.wandb.project is not None:
        if not str(m.wandb.project).strip() or "/" in str(m.wandb.project):
            _fail("metrics.wandb.project", m.wandb.project, "must be a W&B project name without '/' (put the team "
                  "in metrics.wandb.entity), or null for no W&B run")
        if importlib.util.find_spec("wandb") is None:
            _fail("metrics.wandb.project", m.wandb.project, "needs the wandb package (pip install wandb); or set "
                  "metrics.wandb.project=null")


# ---------------------------------------------------------------------------------------------
# The run directory: one run per directory
# ---------------------------------------------------------------------------------------------

# What a run writes into run.dir (train.py, lib/trainer, the draft exports); run.overwrite=true removes
# exactly these, so nothing else in the directory (let alone outside it) is ever deleted.
RUN_FILES = ("config.yaml", "topology.json", "metrics.jsonl", "summary.json", "resumes.jsonl", "vocab_map.safetensors",
             "loss.png", "accuracy.png", "accept_len.png", "stopped.json",  # stopped.json: lib/launch/stopping.py
             "wandb_run_id")  # lib/trainer/metric_sinks.py
RUN_DIRS = ("checkpoints", "samples", "dry_run", "tensorboard", "wandb")
RUN_DIR_PREFIXES = ("draft",)  # draft/, draft_speculators/: the exports
# Keys that change the draft's shape or the data order: a resume must keep them, or the checkpoint
# would not load, or samples would be skipped or repeated. Every other key may change on resume.
RESUME_MUST_MATCH = (
    "target.name", "draft.name", "draft.draft_vocab_size", "draft.intermediate_size", "draft.num_attention_heads",
    "draft.num_key_value_heads", "draft.init_from", "train.ttt_length", "train.seed", "data.path",
    "data.heldout_path", "data.heldout_size", "data.template", "data.max_length", "data.overlong",
)
_PATH_KEYS = {"data.path", "data.heldout_path", "draft.init_from"}
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys whose change on resume says nothing about the run (the launch asks for the resume itself).
_NOT_A_CHANGE = {"checkpoint.resume", "run.overwrite"}


def held_run(run_dir: str) -> list[str]:
    """What in `run_dir` shows it already holds a run (config.yaml, metrics, checkpoints); [] if nothing."""
    found = [f for f in ("config.yaml", "metrics.jsonl") if os.path.isfile(os.path.join(run_dir, f))]
    ckpt = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt) and os.listdir(ckpt):
        found.append("checkpoints/")
    return found


def newest_checkpoint_name(run_dir: str) -> Optional[str]:
    """checkpoints/step-N of the highest complete step (meta.json written last), or None."""
    root = os.path.join(run_dir, "checkpoints")
    steps = [int(m.group(1)) for name in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := _STEP_DIR.match(name)) and os.path.isfile(os.path.join(root, name, "meta.json"))]
    return f"checkpoints/step-{max(steps)}" if steps else None


def saved_config(run_dir: str) -> Optional[dict]:
    """The resolved config a previous run recorded in run_dir/config.yaml, as plain data, or None."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "config.yaml")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if os.path.isfile(path) else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(tree):
        tree = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, enum.Enum):
        tree = tree.name
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _same(key: str, old: Any, new: Any) -> bool:
    if key in _PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(old) == os.path.abspath(new)
    return old == new


def config_changes(cfg: Config, saved: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, this launch's value)} for every key that differs from the saved config."""
    old, new = _flat(saved), _flat(cfg)
    new["target.name"] = target_name(cfg.target)  # as resolve() records it (a composed config may not be resolved)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in _NOT_A_CHANGE and not _same(k, old.get(k), new.get(k))}


def _check_run_dir(cfg: Config) -> None:
    """One run per directory: continue it only with checkpoint.resume=true (keeping the keys that shape
    the draft or order the data), or remove it first with run.overwrite=true; never mix two runs."""
    if cfg.run.overwrite and cfg.checkpoint.resume:
        _fail("run.overwrite", True, "removes the run that checkpoint.resume=true would continue; drop one of them")
    if cfg.run.dir == "auto":
        return
    run_dir = os.path.abspath(cfg.run.dir)
    found = held_run(run_dir)
    if not found or cfg.run.overwrite:
        return
    newest = newest_checkpoint_name(run_dir)
    if not cfg.checkpoint.resume:
        _fail("run.dir", run_dir, f"already holds a run ({', '.join(found)}; newest checkpoint: "
              f"{newest or 'none'}); continue it with checkpoint.resume=true, remove it first with "
              "run.overwrite=true, or pass another run.dir")
    saved = saved_config(run_dir)
    if saved is None:
        return
    changed = config_changes(cfg, saved)
    for key in RESUME_MUST_MATCH:
        if key in changed:
            old, new = changed[key]
            _fail(key, new, f"the run in {run_dir} was made with {key}={old!r}, which shapes the draft or orders "
                  f"the data, so a resume must keep it: set {key}={old!r}, or start a new run (another run.dir, "
                  "or run.overwrite=true without checkpoint.resume)")


def clear_run_dir(run_dir: str) -> list[str]:
    """run.overwrite=true: remove the previous run's files (RUN_FILES, RUN_DIRS, the draft* exports) from
    run_dir and nothing else; a symbolic link among them is unlinked, never followed. Returns the names."""
    removed = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        is_dir = os.path.isdir(path) and not os.path.islink(path)
        if not (name in RUN_FILES or name in RUN_DIRS or (name.startswith(RUN_DIR_PREFIXES) and is_dir)):
            continue
        if is_dir:
            shutil.rmtree(path)  # removes links inside the tree without following them
        else:
            os.unlink(path)
        removed.append(name)
    return removed


def prepare_run_dir(cfg: Config) -> list[str]:
    """Run once (rank 0) after validation, before the run writes anything: clear the directory under
    run.overwrite=true, or, under checkpoint.resume=true, record what changed since the saved config in
    resumes.jsonl. Returns lines for the log."""
    run_dir = cfg.run.dir
    if cfg.run.overwrite:
        removed = clear_run_dir(run_dir)
        return [f"run.overwrite=true: removed the previous run's {', '.join(removed)} from {run_dir}"] if removed else []
    saved = saved_config(run_dir) if cfg.checkpoint.resume else None
    if saved is None:
        return []
    changed = config_changes(cfg, saved)
    with open(os.path.join(run_dir, "resumes.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resume_from": newest_checkpoint_name(run_dir),
                            "changed": {k: list(v) for k, v in changed.items()}}, default=str) + "\n")
    if not changed:
        return ["resuming with the saved config unchanged"]
    return ["resuming with changed keys (recorded in resumes.jsonl): "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())]


# ---------------------------------------------------------------------------------------------
# python -m lib.config.check ...
# ---------------------------------------------------------------------------------------------


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lib.config.check", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    nproc = sub.add_parser("nproc", help="processes per node for a placement and GPU count")
    nproc.add_argument("--placement", required=True)
    nproc.add_argument("--gpus", type=_count, required=True, help="visible GPUs (0: CPU)")
    nproc.add_argument("--nproc", type=_count, default=None, help="the user's process count (NPROC), checked")
    check = sub.add_parser("check", help="compose and validate as every rank of train.py will")
    check.add_argument("--gpus", type=_count, required=True, help="visible GPUs per node (0: CPU)")
    check.add_argument("--nproc", type=_count, default=None, help="processes per node (default: the rule)")
    check.add_argument("--nnodes", type=_count, default=1)
    check.add_argument("overrides", nargs="*", help="Hydra overrides, as given to train.py")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "nproc":
            placement = _as_enum("placement", args.placement, Placement)
            if args.nproc is None:
                print(ProcessLayout.for_gpus(placement, args.gpus).nproc)
            else:
                print(ProcessLayout(placement, args.nproc, key="NPROC").nproc)
            return 0
        cfg = compose(args.overrides)
        nproc = args.nproc if args.nproc is not None else ProcessLayout.for_gpus(cfg.placement.name, args.gpus).nproc
        validate(cfg, LaunchShape(nproc * max(args.nnodes, 1), nproc, max(args.nnodes, 1), args.gpus))
        print(f"nproc={nproc}")
        return 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m lib.config.check check|nproc ... (launch.sh)
    sys.exit(main(sys.argv[1:]))
