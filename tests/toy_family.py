"""The source of a toy draft family, which tests/test_family_seam.py writes as ROOT/lib/drafts/<name>/
(with ROOT/conf/draft/<name>.yaml) to show that a family needs nothing else.

The draft is one linear map from one captured target layer at position t to the token at t+2: the
token after the one the target itself picks from t (which decoding already holds). It proposes that
token k times over. It learns little, but it runs the whole path: capture plan -> handoff -> FSDP2
training -> export -> family read from the export -> load -> drafter.
"""
from __future__ import annotations

TOY_CONF = """\
# A toy draft family written by tests/test_family_seam.py (lib/drafts/{name}/).
name: {name}
options:
  layer: 1  # the target layer whose output the draft reads
"""

TOY_INIT = '''\
"""A toy draft family (tests/test_family_seam.py). Importing the package registers it."""
from . import strategy  # noqa: F401
'''

TOY_STRATEGY = '''\
"""Toy strategy: a linear map from one captured layer at t to the token at t+2."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lib.drafts.base import AUX_HIDDEN, CapturePlan, DraftBundle, DraftStrategy, register_strategy

NAME = __name__.split(".")[-2]  # the package's folder name is the family's name
ARCHITECTURE = NAME + "Draft"  # what the export says it is


class Toy(nn.Module):
    def __init__(self, layer: int, hidden_size: int, vocab_size: int):
        super().__init__()
        self.config = {"layer": layer, "hidden_size": hidden_size, "vocab_size": vocab_size}
        self.proj = nn.Linear(hidden_size, vocab_size, bias=False)
        # The tiny target's hidden states are large: a random map starts at a loss of ~40, zeros at log(vocab).
        nn.init.zeros_(self.proj.weight)

    def forward(self, batch, normaliser, grad_scale=1.0):
        ids, aux = batch["input_ids"], batch[AUX_HIDDEN]
        valid = two_ahead(batch)
        logits = self.proj(aux[:-2].to(self.proj.weight.dtype))
        ce = F.cross_entropy(logits.float(), ids[2:], reduction="none") * valid
        correct = ((logits.argmax(-1) == ids[2:]) & valid.bool()).sum()
        sums = torch.stack([ce.sum().detach(), correct.float(), valid.sum()]).float()
        return ce.sum() / normaliser.clamp_min(1) * grad_scale, sums


def two_ahead(batch) -> torch.Tensor:
    """1.0 where the token at t+2 is in t's own sample and trained on."""
    n = batch["input_ids"].shape[0]
    sample = torch.zeros(n, dtype=torch.long, device=batch["input_ids"].device)
    sample[batch["cu_seqlens"][1:-1].long()] = 1
    sample = sample.cumsum(0)
    return ((sample[2:] == sample[:-2]) & batch["loss_mask"][2:].bool()).float()


@dataclass
class ToyBundle(DraftBundle):
    config: dict

    def config_dict(self):
        return dict(self.config)


class ToyDrafter:
    def __init__(self, model: Toy):
        self.model = model
        self.aux_layers = [model.config["layer"]]

    def start(self):
        pass

    def keep(self, rows):
        pass

    def propose(self, block, k, rows, generated):
        last = block.aux[torch.arange(block.aux.shape[0], device=block.aux.device), block.last]
        token = self.model.proj(last.to(self.model.proj.weight.dtype)).argmax(-1)
        return token[:, None].expand(-1, k).contiguous()


@register_strategy
class ToyStrategy(DraftStrategy):
    name = NAME
    headline_metrics = ("acc_0",)

    def capture_plan(self, hf_config, cfg):
        layer = int((cfg.draft.options or {}).get("layer", 1))
        return CapturePlan((layer,), int(hf_config.hidden_size), final_hidden=False)

    def build(self, ctx):
        from lib.launch.sharding import shard
        from lib.target.shape import load_hf_config

        hf = load_hf_config(ctx.cfg.target)
        torch.manual_seed(ctx.cfg.train.seed)
        module = Toy(self.capture_plan(hf, ctx.cfg).layers[0], int(hf.hidden_size), int(hf.vocab_size))
        config = dict(module.config)
        return ToyBundle(shard(module.to(ctx.device), ctx.groups.trainer, ctx.device), config=config)

    def prepare(self, bundle, micro):
        return [None] * len(micro), sum(two_ahead(b).sum() for b in micro)

    def micro_loss(self, bundle, batch, context, normaliser, grad_scale):
        return bundle.model(batch, normaliser, grad_scale)

    def summarize(self, sums):
        count = max(float(sums[2]), 1.0)
        return {"loss": float(sums[0]) / count, "acc_0": float(sums[1]) / count}

    def export(self, bundle, state, out_dir, dtype, verifier_path=None):
        out = os.path.join(out_dir, "draft")
        os.makedirs(out, exist_ok=True)
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"architectures": [ARCHITECTURE], **bundle.config}, f)
        return [out]

    def eval_weights(self, state):
        return dict(state)

    def eval_model(self, config, target, device, dtype):
        return Toy(**config).to(device=device, dtype=dtype)

    def load_export(self, directory, device, dtype, target):
        with open(os.path.join(directory, "config.json")) as f:
            config = {k: v for k, v in json.load(f).items() if k != "architectures"}
        model = Toy(**config)
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return model.to(device=device, dtype=dtype)

    def drafter(self, model):
        return ToyDrafter(model.eval())

    def recognizes(self, config_json: dict[str, Any]) -> bool:
        return ARCHITECTURE in (config_json.get("architectures") or [])
'''


def write_family(root: str, name: str) -> list[str]:
    """ROOT/lib/drafts/<name>/ and ROOT/conf/draft/<name>.yaml; returns the files written, relative to root."""
    import os

    files = {os.path.join("lib", "drafts", name, "__init__.py"): TOY_INIT,
             os.path.join("lib", "drafts", name, "strategy.py"): TOY_STRATEGY,
             os.path.join("conf", "draft", f"{name}.yaml"): TOY_CONF.format(name=name)}
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    return sorted(files)
