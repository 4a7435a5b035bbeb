"""The DraftStrategy seam: registry, capture plan -> payload sizes, an engine capturing another family's
plan, the EAGLE-3 strategy's loss step and export, and no draft family named in the generic modules."""
from __future__ import annotations

import os
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lib.config import Config, ConfigError, DraftConfig, EngineConfig, TargetConfig, TINY_TARGET_DIR
from lib.data.batch import PackedBatch
from lib.drafts.base import (AUX_HIDDEN, FINAL_HIDDEN, CapturePlan, DraftStrategy, get_strategy, known_strategies,
                             register_strategy)
from lib.drafts.eagle3.strategy import Eagle3Strategy
from lib.engine import make_backend

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules that serve every draft family: none of them may name one (issue 15).
GENERIC_MODULES = ["lib/engine/worker.py", "lib/trainer/loop.py", "lib/trainer/sources.py", "lib/eval/online.py",
                   "lib/eval/spec_decode.py"] + [
    os.path.join("lib/handoff", f) for f in sorted(os.listdir(os.path.join(REPO, "lib/handoff"))) if f.endswith(".py")]
QWEN3 = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256)


def hf_config(**overrides):
    spec = {**QWEN3, **overrides}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def test_registry_selects_eagle3_by_the_configs_draft_name():
    assert DraftConfig().name == "eagle3"
    strategy = get_strategy(Config().draft.name)
    assert isinstance(strategy, Eagle3Strategy) and strategy is get_strategy("eagle3")
    assert "eagle3" in known_strategies()


def test_unknown_strategy_is_a_config_error_naming_the_key_and_the_known_names():
    with pytest.raises(ConfigError, match=r"draft.name='medusa' is not a known draft strategy; use one of .*eagle3"):
        get_strategy("medusa")


class _WideStrategy(DraftStrategy):
    """A stand-in for a family that captures more layers and no final hidden state (as DFlash will)."""

    name = "test_wide"

    def capture_plan(self, hf_config, cfg):
        # Every other layer below the last (transformers' reference reports the last one after the norm).
        return CapturePlan(tuple(range(0, hf_config.num_hidden_layers - 1, 2)), hf_config.hidden_size,
                           final_hidden=False)

    build = prepare = micro_loss = summarize = export = eval_weights = eval_model = load_export = drafter = None

    def recognizes(self, config_json):
        return False  # writes no exports (family_of_export asks every registered family)


def test_a_registered_strategy_is_selectable_and_names_are_unique():
    register_strategy(_WideStrategy)
    assert isinstance(get_strategy("test_wide"), _WideStrategy)
    assert "test_wide" in known_strategies()
    clash = type("Clash", (_WideStrategy,), {})
    with pytest.raises(ValueError, match="'test_wide' is already registered"):
        register_strategy(clash)
    with pytest.raises(TypeError, match="class attribute `name`"):
        register_strategy(type("Nameless", (_WideStrategy,), {"name": ""}))


def test_eagle3_plan_is_the_default_aux_trio_or_target_aux_layers():
    plan = get_strategy("eagle3").capture_plan(hf_config(), Config())
    assert plan == CapturePlan((1, 3, 4), 64, final_hidden=True)  # [1, L/2-1, L-4] for L = 8
    explicit = Config(target=TargetConfig(aux_layers=[0, 7, 7]))
    assert get_strategy("eagle3").capture_plan(hf_config(), explicit).layers == (0, 7, 7)
    with pytest.raises(ValueError, match=r"target.aux_layers=\[0, 8\]"):
        get_strategy("eagle3").capture_plan(hf_config(), Config(target=TargetConfig(aux_layers=[0, 8])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_payload_specs_are_sized_from_the_plan(dtype):
    budget, hidden = 96, 64
    specs = get_strategy("eagle3").payload_specs(CapturePlan((1, 3, 4), hidden), budget, dtype)
    assert [s.name for s in specs] == ["input_ids", "loss_mask", "position_ids", AUX_HIDDEN, FINAL_HIDDEN]
    assert all(s.max_rows == budget for s in specs)
    size = torch.empty((), dtype=dtype).element_size()
    by_name = {s.name: s for s in specs}
    assert by_name[AUX_HIDDEN].row_shape == (3 * hidden,) and by_name[AUX_HIDDEN].max_bytes == budget * 3 * hidden * size
    assert by_name[FINAL_HIDDEN].row_shape == (hidden,) and by_name[FINAL_HIDDEN].dtype == dtype
    assert by_name["input_ids"].max_bytes == budget * 8 and by_name["loss_mask"].max_bytes == budget

    wide = _WideStrategy().capture_plan(hf_config(), Config())
    names = [s.name for s in get_strategy("eagle3").payload_specs(wide, budget, dtype)]
    assert names == ["input_ids", "loss_mask", "position_ids", AUX_HIDDEN]
    assert wide.widths == {AUX_HIDDEN: 4 * hidden}


def test_capture_plan_validation_names_the_problem():
    with pytest.raises(ValueError, match="negative"):
        CapturePlan((1, -2), 64)
    with pytest.raises(ValueError, match="captures nothing"):
        CapturePlan((), 64, final_hidden=False)
    plan = CapturePlan((1, 9), 64)
    with pytest.raises(ValueError, match=r"include \[9\], outside the target's 8 layers"):
        plan.check_target(8, 64)
    with pytest.raises(ValueError, match="hidden size 64, the target has 32"):
        CapturePlan((1,), 64).check_target(8, 32)
    with pytest.raises(ValueError, match="extra tensors"):
        CapturePlan((1,), 64, extras=("logits",)).check_target(8, 64)


def test_engine_captures_what_another_familys_plan_says(tmp_path):
    """A real tiny target: the hf backend captures the wide plan's four layers and no final hidden state."""
    torch.manual_seed(0)
    spec = dict(QWEN3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    model.save_pretrained(tmp_path)
    plan = _WideStrategy().capture_plan(model.config, Config())
    backend = make_backend("hf")
    backend.load(TargetConfig(path=str(tmp_path)), EngineConfig(token_budget=64), torch.device("cpu"), None, plan=plan)
    assert backend.aux_layers == [0, 2, 4, 6]
    ids = torch.randint(0, 300, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    states = backend.capture(PackedBatch.from_samples([(ids, [True] * 21)], [0]))
    assert set(states) == {AUX_HIDDEN}
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[i + 1][0] for i in plan.layers], dim=-1)
    torch.testing.assert_close(states[AUX_HIDDEN], expected, rtol=1e-5, atol=1e-5)
    # A slot sized for another plan is refused, naming the strategy's payload_specs.
    with pytest.raises(ValueError, match="payload_specs"):
        backend.capture(PackedBatch.from_samples([(ids, [True] * 21)], [0]),
                        out={AUX_HIDDEN: torch.empty(64, 3 * 64)})


def test_eagle3_summarize_gives_per_depth_metrics():
    ttt = 3
    sums = torch.tensor([6.0, 4.0, 2.0, 3.0, 1.0, 0.0, 3.0, 2.0, 0.0])  # ploss sums, correct, counts
    row = get_strategy("eagle3").summarize(sums)
    assert row["ploss_0"] == 2.0 and row["ploss_1"] == 2.0 and row["ploss_2"] == 2.0  # empty depth: /1
    assert row["acc_0"] == 1.0 and row["acc_1"] == 0.5 and row["acc_2"] == 0.0
    assert row["loss"] == pytest.approx(2.0 * (1 + 0.8 + 0.64))
    assert row["sim_accept_len"] == pytest.approx(1.0 + 0.5)
    assert sorted(k for k in row if k.startswith("acc_")) == [f"acc_{i}" for i in range(ttt)]


def test_ttt_module_takes_its_head_by_constructor_or_setter():
    from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
    from lib.drafts.eagle3.target_head import TargetHead
    from lib.drafts.eagle3.trainer import TTTModule

    draft = Eagle3Draft(Eagle3DraftConfig.from_target(hf_config(), 100, [1, 3, 4]))
    head = TargetHead(torch.randn(300, 64), torch.zeros(100, dtype=torch.long))
    assert TTTModule(draft, 2, head=head).head is head
    module = TTTModule(draft, 2)
    with pytest.raises(RuntimeError, match="set_head"):
        module.head
    module.set_head(head)
    assert module.head is head and "head" not in dict(module.named_children())
    with pytest.raises(TypeError, match="TargetHead"):
        module.set_head(torch.zeros(1))


def test_no_private_head_is_set_from_outside():
    offenders = []
    for root in ("lib", "bench", "tests"):
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(folder, f)) as handle:
                        if re.search(r"\b(?!self\b)\w+\._head\s*=", handle.read()):
                            offenders.append(os.path.relpath(os.path.join(folder, f), REPO))
    assert offenders == [], f"{offenders} assign TTTModule._head; use TTTModule(head=...) or set_head"


def test_eagle3_export_writes_the_research_layout_and_speculators_beside_it(tmp_path):
    from lib.drafts.eagle3.export import load_draft
    from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
    from lib.drafts.eagle3.trainer import Eagle3Bundle, TTTModule

    torch.manual_seed(0)
    cfg = Eagle3DraftConfig.from_target(hf_config(), 100, [1, 3, 4])
    module = TTTModule(Eagle3Draft(cfg), 2)
    bundle = Eagle3Bundle(module, draft_config=cfg, target_head=None, ttt_length=2)
    written = get_strategy("eagle3").export(bundle, module.state_dict(), str(tmp_path), torch.float32,
                                            verifier_path=TINY_TARGET_DIR)
    assert written[0] == str(tmp_path / "draft")
    loaded = load_draft(written[0])
    assert torch.equal(loaded.fc.weight, module.draft.fc.weight)
    has_speculators = os.path.isfile(os.path.join(REPO, "lib/drafts/eagle3/speculators_format.py"))
    assert (str(tmp_path / "draft_speculators") in written) == has_speculators
    if has_speculators:
        assert os.path.isfile(tmp_path / "draft_speculators" / "config.json")
    assert bundle.config_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", GENERIC_MODULES)
def test_generic_modules_name_no_draft_family(path):
    with open(os.path.join(REPO, path)) as f:
        text = f.read()
    names = sorted(set(known_strategies()) - {"test_wide"})
    hits = [m.group(0) for m in re.finditer("|".join(re.escape(n) for n in names), text, flags=re.IGNORECASE)]
    assert hits == [], f"{path} names draft families {hits}: ask the DraftStrategy (lib/drafts/base.py) instead"
