"""Any checkpoint as the target: an HF directory with no per-model conf, or a GGUF file.

`prepare_target(cfg)` runs on every rank (and in eval.py / tools) after the config is resolved and
before any process group or model load. It

- turns a `.gguf` target (a file, or a directory holding one) into an HF directory once: the file is
  dequantized to `target.dtype` by transformers (needs the `gguf` package) and saved, with its
  tokenizer and chat template, under a cache directory named by the file's hash and the dtype, so
  every rank and every later run reuses it (ranks wait on a file lock while one converts);
- reads the checkpoint's own config.json and records its shape in `target.hf_config` (config.yaml then
  says what was trained against);
- refuses a named target group (`target=qwen3_8b`) whose shape disagrees with the checkpoint it is
  pointed at, naming each differing key with both values.

Nothing here reaches the network: a GGUF shipped by a package is found through that package's
installed files (`lib.config.package_file`, the `${package_file:...}` of conf/target/smollm2_135m.yaml).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import replace
from typing import Any, Optional

from lib.config import Config, ConfigError, TargetConfig, resolve_target_dtype

log = logging.getLogger(__name__)

# Keys of a target group's hf_config that describe the checkpoint's shape: a group and the checkpoint
# it points at must agree on each (others, like max_position_embeddings, may differ harmlessly).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "num_experts",
              "num_local_experts", "num_experts_per_tok", "moe_intermediate_size")
# What config.yaml records of the checkpoint's config.json (shape, rope, norms, tokens).
RECORDED_KEYS = SHAPE_KEYS + ("max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
                              "rms_norm_eps", "sliding_window", "layer_types", "bos_token_id", "eos_token_id")
# The architectures the engine, the drafts and the evaluation are tested on (docs/real_model.md).
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "qwen3_moe", "qwen2", "mistral", "gpt_oss")
CACHE_ENV = "SPECDRAFT_CACHE"  # where converted GGUF checkpoints live (default ~/.cache/specdraft)
GGUF_FORMAT = 1  # bump when the conversion's output changes, so old caches are not reused


def locate_gguf(path: str) -> Optional[str]:
    """The GGUF file `path` names (the file, or the only *.gguf of a directory without config.json);
    None when `path` is an HF checkpoint directory or does not exist."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(files) > 1:
        raise ConfigError(f"target.path={path!r} holds {len(files)} GGUF files ({', '.join(files)}); point "
                          "target.path at the one to use")
    return os.path.join(path, files[0]) if files else None


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "specdraft")


def converted_dir(gguf: str, dtype: str) -> str:
    """Where the HF copy of `gguf` in `dtype` lives: named by content, so a moved file is still found."""
    return os.path.join(cache_root(), "gguf", f"{_file_hash(gguf)[:24]}-{dtype}-v{GGUF_FORMAT}")


def convert_gguf(gguf: str, dtype: str) -> str:
    """The HF checkpoint directory of `gguf` dequantized to `dtype` (float32|bfloat16|float16): made once,
    atomically, under a lock; later calls (other ranks, later runs) return the cached directory."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"target.path={gguf!r} is a GGUF file, which transformers reads with the gguf "
                          "package; fix: pip install gguf")
    out = converted_dir(gguf, dtype)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(out, "config.json")):
            return out
        log.info("dequantizing %s to %s (once; cached in %s)", gguf, dtype, out)
        tmp = f"{out}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _dequantize(gguf, dtype, tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"gguf": os.path.abspath(gguf), "dtype": dtype}, f)
        os.replace(tmp, out)  # config.json appears only with the whole checkpoint
    return out


def _dequantize(gguf: str, dtype: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": getattr(torch, dtype)}
    try:  # transformers 5 keeps GGUF blocks packed unless asked; older releases always dequantized
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    # save_pretrained may still write the GGUF quantization block; the copy is plain dense weights.
    config_file = os.path.join(out, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)


def checkpoint_config(path: str) -> dict:
    """The checkpoint's config.json as data (a multimodal wrapper's text_config merged on top)."""
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


def _rope_theta(config: dict) -> Any:
    params = config.get("rope_parameters")
    return config.get("rope_theta", params.get("rope_theta") if isinstance(params, dict) else None)


def shape_mismatches(group: dict, checkpoint: dict) -> list[str]:
    """'key: group X, checkpoint Y' for each shape key both set and disagree on."""
    out = []
    for key in SHAPE_KEYS + ("rope_theta",):
        mine = group.get(key)
        theirs = _rope_theta(checkpoint) if key == "rope_theta" else checkpoint.get(key)
        if mine is None or theirs is None:
            continue
        if isinstance(mine, float) or isinstance(theirs, float):
            same = abs(float(mine) - float(theirs)) <= 1e-6 * max(1.0, abs(float(theirs)))
        else:
            same = mine == theirs
        if not same:
            out.append(f"{key}: target={group.get('_name', '?')} says {mine!r}, the checkpoint {theirs!r}")
    return out


def _recorded(checkpoint: dict) -> dict:
    return {k: checkpoint[k] for k in RECORDED_KEYS if k in checkpoint}


def prepare_target(cfg: Config) -> Config:
    """cfg with target.path an HF checkpoint directory and target.hf_config its recorded shape.

    Random-init targets pass through unchanged. Raises ConfigError (one line, key and fix) for a
    missing package, an unsupported architecture or a target group that disagrees with the checkpoint.
    """
    t = cfg.target
    if t.random_init or t.path is None:
        return cfg
    source, path = t.source or t.path, t.path
    gguf = locate_gguf(path)
    if gguf is not None:
        dtype = resolve_target_dtype(t.dtype, cfg.device.value if hasattr(cfg.device, "value") else str(cfg.device))
        path = convert_gguf(gguf, dtype.value)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"target.path={t.path!r}: no config.json and no .gguf there; point it at a local HF "
                          "checkpoint directory or a GGUF file")
    checkpoint = checkpoint_config(path)
    model_type = checkpoint.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"target.path={source!r}: model_type {model_type!r} is not one this project runs "
                          f"({', '.join(SUPPORTED_MODEL_TYPES)}); docs/real_model.md lists what is supported")
    if t.hf_config:
        bad = shape_mismatches({**t.hf_config, "_name": t.name}, checkpoint)
        if bad:
            raise ConfigError(f"target={t.name} target.path={source!r}: the checkpoint is not a {t.name}: "
                              + "; ".join(bad) + f". Fix: drop target={t.name} (any checkpoint works with "
                              "target.path alone) or point target.path at the right checkpoint")
    target = replace(t, path=path, source=source if gguf else t.source, hf_config=_recorded(checkpoint))
    return replace(cfg, target=target)
