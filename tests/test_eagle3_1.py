"""EAGLE-3.1 (`draft=eagle3_1`, draft.options.fc_norm): one RMSNorm per captured aux layer before fc.

The option, the model (the norm's definition, that it trains), both exports written and read back to
the bit, the servers' loaders replayed on the names (vLLM fills fc_norm, sglang's EAGLE-3 draft has no
parameter for it), and evaluation's loaders. Training = serving at every depth is
tests/test_train_serve_consistency.py; agreement with speculators' and SpecForge's classes is
tests/test_reference_parity.py (their own environment).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lib.config import compose
from lib.drafts.eagle3.drafter import EagleDrafter
from lib.drafts.eagle3.export import config_from_export, export_draft, load_draft
from lib.drafts.eagle3.loss import ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft
from lib.drafts.eagle3.speculators_format import export_speculators
from lib.drafts.eagle3.strategy import Eagle3Strategy
from lib.drafts.eagle3.target_head import TargetHead
from lib.drafts.eagle3.trainer import Eagle3Options, warm_start
from tests.eagle3_draws import AUX_SCALES, LENGTHS, drawn_draft, packed_inputs
from tests.test_export_schema import OPTIONAL, allocated_params, route

pytestmark = pytest.mark.unit


def reference_fc_input(draft: Eagle3Draft, aux: torch.Tensor) -> torch.Tensor:
    """fc's input by the definition: aux split into its layers' blocks, each RMS-normalised on its own
    (in fp64) and scaled by its own gain, concatenated back."""
    c = draft.config
    blocks = aux.double().split(c.target_hidden_size, dim=-1)
    normed = [g.double() * b * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
              for g, b in zip((n.weight for n in draft.fc_norm), blocks)]
    return torch.cat(normed, dim=-1)


# ---- option and conf ---------------------------------------------------------------------------

def test_options_are_checked_and_name_the_key():
    assert Eagle3Options.from_mapping({}).fc_norm is False
    assert Eagle3Options.from_mapping({"fc_norm": True}).fc_norm is True
    with pytest.raises(ValueError, match=r"draft.options.fc_norm='yes' must be true or false"):
        Eagle3Options.from_mapping({"fc_norm": "yes"})
    with pytest.raises(ValueError, match=r"unknown keys \['fc_nrom'\]"):
        Eagle3Options.from_mapping({"fc_nrom": True})
    # speculators' other pre-fc norm is not implemented; the message names both keys.
    with pytest.raises(ValueError, match=r"draft.options.norm_before_fc=True .*draft.options.fc_norm=True.*exclusive"):
        Eagle3Options.from_mapping({"fc_norm": True, "norm_before_fc": True})


def test_draft_eagle3_1_is_eagle3_with_fc_norm():
    strategy = Eagle3Strategy()
    cfg = compose(["draft=eagle3_1"])
    assert cfg.draft.name == "eagle3" and cfg.draft.options == {"fc_norm": True}
    assert strategy.options(cfg).fc_norm is True
    assert strategy.options(compose(["draft=eagle3"])).fc_norm is False
    assert strategy.options(compose(["draft=eagle3", "+draft.options.fc_norm=true"])).fc_norm is True
    # The capture is EAGLE-3's; a bad option stops capture_plan, which both roles run at start-up.
    hf = type("HF", (), {"num_hidden_layers": 8, "hidden_size": 16})()
    assert strategy.capture_plan(hf, cfg) == strategy.capture_plan(hf, compose(["draft=eagle3"]))
    cfg.draft.options = {"fc_norm": 1}
    with pytest.raises(ValueError, match="draft.options.fc_norm=1"):
        strategy.capture_plan(hf, cfg)


# ---- model -------------------------------------------------------------------------------------

def test_fc_norm_is_one_rmsnorm_per_aux_layer_before_fc():
    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True)
    c = draft.config
    names = {k: tuple(v.shape) for k, v in draft.state_dict().items() if k.startswith("fc_norm.")}
    assert names == {f"fc_norm.{j}.weight": (c.target_hidden_size,) for j in range(c.num_aux)}
    assert not any(k.startswith("fc_norm.") for k in drawn_draft(None).state_dict())  # plain EAGLE-3: none
    _, aux, _, _ = packed_inputs(c, aux_scales=AUX_SCALES)
    with torch.no_grad():
        expected = reference_fc_input(draft, aux) @ draft.fc.weight.double().T
        got = draft.project_hidden(aux)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
        # Each layer's magnitude is gone: scaling one layer's block leaves fc's output (nearly) unchanged.
        rescaled = aux.clone()
        rescaled[:, c.target_hidden_size:2 * c.target_hidden_size] *= 1000.0
        assert torch.allclose(draft.project_hidden(rescaled), got, rtol=1e-4, atol=1e-4)


def make_batch(draft: Eagle3Draft, seed: int = 3):
    ids, aux, positions, cu = packed_inputs(draft.config, seed=seed, aux_scales=AUX_SCALES)
    gen = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, loss_mask=torch.ones_like(ids, dtype=torch.bool), position_ids=positions,
                cu_seqlens=cu, aux_hidden=aux, final_hidden=torch.randn(ids.shape[0], 32, generator=gen))


def test_fc_norm_draft_trains_on_cpu():
    """A few Adam steps of the TTT loss on one packed batch: the loss falls and the gains learn."""
    torch.manual_seed(0)
    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True).train()
    gen = torch.Generator().manual_seed(4)
    head = TargetHead(torch.randn(draft.config.vocab_size, 32, generator=gen), draft.d2t)
    batch = make_batch(draft)
    target = head.target_probs(batch["final_hidden"])
    gains = [n.weight for n in draft.fc_norm]
    start = [g.detach().clone() for g in gains]
    optimizer = torch.optim.Adam(draft.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = ttt_forward(draft, head, batch, 3, target=target)
        optimizer.zero_grad()
        loss.backward()
        assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gains)
        optimizer.step()
        losses.append(float(loss.detach()))
    print("EAGLE-3.1 TTT loss per step", ["%.3f" % x for x in losses])
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(not torch.equal(g, s) for g, s in zip(gains, start))


def test_compiled_ops_give_the_eager_step_with_fc_norm():
    """train.compile=true (on by default on GPU) routes fc_norm through the compiled RMSNorm with an
    extra [n_aux] axis; loss, metrics and gradients must not change (two batch sizes: dynamic shapes)."""
    from lib.drafts.eagle3 import fused
    from tests.helpers import assert_same_steps, compiled_against_eager

    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True)
    head = TargetHead(torch.randn(draft.config.vocab_size, 32, generator=torch.Generator().manual_seed(6)), draft.d2t)
    batches = [make_batch(draft, seed=3), make_batch(draft, seed=4)]
    batches[1] = {k: (v[:LENGTHS[0]] if k != "cu_seqlens" else v[:2]) for k, v in batches[1].items()}
    params = draft.trainable_parameters()

    def run():
        out = []
        for batch in batches:
            loss, metrics = ttt_forward(draft, head, batch, 3)
            out.append((loss.detach(), metrics["sums"], torch.autograd.grad(loss, params)))
        return out

    eager, compiled = compiled_against_eager(fused, run)
    assert_same_steps(compiled, eager)


# ---- exports -----------------------------------------------------------------------------------

def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("fc_norm", [True, False], ids=["eagle3_1", "eagle3"])
def test_both_exports_round_trip_bit_exactly(tmp_path, fc_norm):
    draft = drawn_draft(None, target_hidden_size=32, fc_norm=fc_norm)
    state = draft.state_dict()
    research = export_draft(state, draft.config, str(tmp_path / "draft"), dtype=torch.float32)
    spec = export_speculators(state, draft.config, str(tmp_path / "draft_speculators"), torch.float32, None)
    for out in (research, spec):
        loaded = load_draft(out)
        assert loaded.config == draft.config
        assert_same_tensors(loaded.state_dict(), state)
    # bf16 exports read back as exactly the bf16 rounding of the trained weights.
    export_draft(state, draft.config, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    export_speculators(state, draft.config, str(tmp_path / "bf16_speculators"), torch.bfloat16, None)
    rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    for out in ("bf16", "bf16_speculators"):
        assert_same_tensors(load_draft(str(tmp_path / out), dtype=torch.bfloat16).state_dict(), rounded)


def test_export_keys_for_fc_norm(tmp_path):
    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), dtype=torch.bfloat16)
    export_speculators(draft.state_dict(), draft.config, str(tmp_path / "s"), torch.bfloat16, None)
    research = json.loads((tmp_path / "draft" / "config.json").read_text())
    spec = json.loads((tmp_path / "s" / "config.json").read_text())
    assert research["fc_norm"] is True
    assert (spec["fc_norm"], spec["norm_before_fc"], spec["norm_output"]) == (True, False, False)
    assert "norm_output" not in research  # SpecForge reads a missing norm_output as "norm before lm_head"
    names = [f"fc_norm.{j}.weight" for j in range(3)]
    for path in (tmp_path / "draft", tmp_path / "s"):
        tensors = load_file(str(path / "model.safetensors"))
        assert all(tensors[n].shape == (24,) and tensors[n].dtype == torch.bfloat16 for n in names)
    # A plain draft writes fc_norm false in both.
    plain = drawn_draft(None)
    export_draft(plain.state_dict(), plain.config, str(tmp_path / "p"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["fc_norm"] is False


def vllm_fc_norm_params(c: dict) -> dict[str, tuple[int, ...]]:
    """vLLM's Eagle3 Llama draft with `fc_norm` in its config (vllm/model_executor/models/llama_eagle3.py
    of a version that has it): model.fc_norm = ModuleList of num_aux RMSNorm(target_hidden_size)."""
    return {f"model.fc_norm.{j}.weight": (c["target_hidden_size"],) for j in range(3)}


def filled(server: str, weights: str) -> dict[str, list[tuple[int, ...]]]:
    out: dict[str, list[tuple[int, ...]]] = {}
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            target = route(server, name)
            if target is not None:
                out.setdefault(target, []).append(tuple(f.get_slice(name).get_shape()))
    return out


def test_server_loaders_replayed_on_fc_norm_names(tmp_path):
    """vLLM fills every parameter it allocates (fc_norm included) from either export; sglang's
    EAGLE-3 Llama draft allocates no fc_norm, and its load_weights skips a name it has no parameter
    for, so it would serve the export without the norms (docs/draft_format.md)."""
    from tests.test_speculators_format import vllm_draft_config

    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), dtype=torch.bfloat16)
    export_speculators(draft.state_dict(), draft.config, str(tmp_path / "s"), torch.bfloat16, None)
    research = json.loads((tmp_path / "draft" / "config.json").read_text())
    views = {"draft": research, "s": vllm_draft_config(json.loads((tmp_path / "s" / "config.json").read_text()))}
    for directory, view in views.items():
        assert view["fc_norm"] is True  # what vLLM's draft reads (getattr(config, "fc_norm"))
        expected = {**allocated_params("vllm", view), **vllm_fc_norm_params(view)}
        got = filled("vllm", str(tmp_path / directory / "model.safetensors"))
        assert set(got) <= set(expected) and set(expected) - set(got) <= OPTIONAL, directory
        for name, shapes in got.items():
            assert (sum(s[0] for s in shapes),) + shapes[0][1:] == expected[name], (directory, name)
    sglang = allocated_params("sglang", research)
    unknown = set(filled("sglang", str(tmp_path / "draft" / "model.safetensors"))) - set(sglang)
    assert unknown == {f"model.fc_norm.{j}.weight" for j in range(3)}


def test_loading_refuses_variants_it_cannot_run(tmp_path):
    draft = drawn_draft(None, target_hidden_size=32, fc_norm=True)
    out = tmp_path / "s"
    export_speculators(draft.state_dict(), draft.config, str(out), torch.float32, None)
    data = json.loads((out / "config.json").read_text())
    with pytest.raises(ValueError, match="norm_before_fc=true .*fc_norm=True.*exclusive"):
        config_from_export({**data, "norm_before_fc": True})
    for key in ("norm_output", "norm_before_residual"):
        with pytest.raises(ValueError, match=key):
            config_from_export({**data, key: True})
    with pytest.raises(ValueError, match="model_type='qwen3'"):
        config_from_export({**data, "transformer_layer_config": {**data["transformer_layer_config"],
                                                                 "model_type": "qwen3"}})


# ---- evaluation's loaders and warm start --------------------------------------------------------

class TinyTarget(nn.Module):
    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embedding)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed


def test_evaluation_loads_and_runs_fc_norm(tmp_path):
    strategy = Eagle3Strategy()
    draft = drawn_draft(None, target_hidden_size=24, fc_norm=True)
    state = draft.state_dict()
    target = TinyTarget(state["embed_tokens.weight"])
    export_draft(state, draft.config, str(tmp_path / "draft"), dtype=torch.float32)
    export_speculators(state, draft.config, str(tmp_path / "s"), torch.float32, None)
    bundle_state = {"draft." + k: v for k, v in state.items()}
    online = strategy.eval_model(draft.config.to_dict(), target, torch.device("cpu"), torch.float32)
    online.load_state_dict(strategy.eval_weights(bundle_state), strict=False)
    models = [strategy.load_export(str(tmp_path / d), torch.device("cpu"), torch.float32, target)
              for d in ("draft", "s")] + [online]
    ids, aux, positions, _ = packed_inputs(draft.config, aux_scales=AUX_SCALES)
    n = LENGTHS[0]
    with torch.no_grad():
        want, _, _ = draft.forward_infer(ids[1:n + 1][None], aux[:n][None], False, positions[:n][None])
        for model in models:
            assert model.fc_norm is not None
            assert_same_tensors(model.state_dict(), state)
            got, _, _ = model.forward_infer(ids[1:n + 1][None], aux[:n][None], False, positions[:n][None])
            assert torch.equal(got, want)
            assert isinstance(strategy.drafter(model), EagleDrafter)


def test_warm_start_keeps_or_refuses_fc_norm(tmp_path):
    plain, eagle3_1 = drawn_draft(None, seed=1), drawn_draft(None, seed=2, fc_norm=True)
    export_draft(plain.state_dict(), plain.config, str(tmp_path / "plain"), dtype=torch.float32)
    export_draft(eagle3_1.state_dict(), eagle3_1.config, str(tmp_path / "e31"), dtype=torch.float32)
    fresh = Eagle3Draft(eagle3_1.config)
    warm_start(fresh, str(tmp_path / "e31"))
    assert_same_tensors(fresh.state_dict(), eagle3_1.state_dict())
    fresh = Eagle3Draft(eagle3_1.config)
    warm_start(fresh, str(tmp_path / "plain"))  # plain -> 3.1: the gains start at one
    assert torch.equal(fresh.fc.weight, plain.fc.weight)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in fresh.fc_norm)
    with pytest.raises(ValueError, match="draft.options.fc_norm=true"):
        warm_start(Eagle3Draft(plain.config), str(tmp_path / "e31"))
