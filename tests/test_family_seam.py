"""A draft family is a package and a conf file: lib/drafts/<name>/ registering its DraftStrategy and
conf/draft/<name>.yaml. Nothing else names it: draft.name is checked against the packages found on
disk, eval.py reads the family from the export's config.json (a draft= that disagrees fails naming
both), and evaluation, the engine, the handoff and the trainer loop reach it only through the seam.

The toy family (tests/toy_family.py) lives under a temporary root named by $SPECDRAFT_DRAFT_ROOTS,
laid out like the repository, so the checkout itself is never written to.
"""
from __future__ import annotations

import json
import os
import sys
import uuid

import pytest
import torch

from lib.config import DRAFT_ROOTS_ENV, TINY_TARGET_DIR, ConfigError, compose
from lib.drafts.base import family_of_export, get_strategy, known_strategies
from tests.helpers import REPO, eval_main, launch, metric_rows
from tests.toy_family import write_family


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """(family name, root): the toy family under tmp_path/root, visible through $SPECDRAFT_DRAFT_ROOTS."""
    import lib.drafts
    from lib.drafts import base

    name = f"toy_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "root"
    written = write_family(str(root), name)
    assert written == [os.path.join("conf", "draft", f"{name}.yaml"),
                       os.path.join("lib", "drafts", name, "__init__.py"),
                       os.path.join("lib", "drafts", name, "strategy.py")]
    monkeypatch.setenv(DRAFT_ROOTS_ENV, str(root))
    yield name, root
    # This process forgets the family again (its registration, modules and package path entry).
    base._STRATEGIES.pop(name, None)
    for module in [m for m in sys.modules if m == f"lib.drafts.{name}" or m.startswith(f"lib.drafts.{name}.")]:
        del sys.modules[module]
    extra = str(root / "lib" / "drafts")
    if extra in lib.drafts.__path__:
        lib.drafts.__path__.remove(extra)


def eagle3_export(directory) -> str:
    from transformers import AutoConfig

    from lib.drafts.eagle3.export import export_draft
    from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig

    config = Eagle3DraftConfig.from_target(AutoConfig.from_pretrained(TINY_TARGET_DIR), 100, [1, 2, 3])
    export_draft(Eagle3Draft(config).state_dict(), config, str(directory), dtype=torch.float32)
    return str(directory)


def dflash_export(directory) -> str:
    from lib.drafts.dflash.export import export_draft
    from lib.drafts.dflash.model import DFlashConfig, DFlashDraft

    config = DFlashConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=10000.0,
                          max_position_embeddings=256, vocab_size=50, target_hidden_size=32, num_target_layers=6,
                          target_layer_ids=[1, 3], block_size=4, mask_token_id=1)
    export_draft(DFlashDraft(config).state_dict(), config, str(directory), torch.float32)
    return str(directory)


@pytest.mark.unit
def test_each_family_recognizes_only_its_own_exports(tmp_path):
    eagle3, dflash = eagle3_export(tmp_path / "eagle3"), dflash_export(tmp_path / "dflash")
    assert family_of_export(eagle3) == "eagle3" and family_of_export(dflash) == "dflash"
    assert family_of_export(eagle3, "eagle3") == "eagle3"
    with pytest.raises(ConfigError, match=r"draft=eagle3 disagrees with the export: .*is the dflash family's; "
                                          r"pass draft=dflash, or an export of the eagle3 family"):
        family_of_export(dflash, "eagle3")
    # A config no family claims (a third-party export without its family's keys): draft= decides.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    assert family_of_export(str(bare), "dflash") == "dflash"
    with pytest.raises(ConfigError, match=r"is no known draft family's export \(known: .*dflash.*eagle3.*\); "
                                          r"pass draft="):
        family_of_export(str(bare))
    with pytest.raises(ConfigError, match="cannot read the draft export's config"):
        family_of_export(str(tmp_path))


@pytest.mark.unit
def test_eval_py_refuses_a_draft_override_that_disagrees_with_the_export(tmp_path, capsys):
    import eval as eval_script

    export = eagle3_export(tmp_path / "draft")
    assert eval_script.main(["--draft", export, "draft=dflash"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("eval.py: draft=dflash disagrees with the export") and "is the eagle3 family's" in err, err
    assert "drop draft= (eval.py reads the family from the export), or pass draft=eagle3" in err
    # draft.name=... is the same request, spelled as a key
    assert eval_script.main(["--draft", export, "draft.name=dflash"]) == 2
    assert "draft=dflash disagrees" in capsys.readouterr().err


@pytest.mark.unit
def test_eval_py_adds_the_exports_family_to_the_overrides(tmp_path):
    import eval as eval_script

    dflash = dflash_export(tmp_path / "dflash")
    assert eval_script.with_export_family(dflash, ["eval.num_prompts=2"]) == ["draft=dflash", "eval.num_prompts=2"]
    assert eval_script.with_export_family(dflash, ["+draft=dflash"]) == ["+draft=dflash"]


@pytest.mark.unit
def test_eval_py_takes_a_conf_choice_naming_another_familys_strategy(tmp_path):
    # draft=eagle3_1 is conf/draft/eagle3_1.yaml, whose draft.name is eagle3 (with fc_norm): eval.py
    # must compare the family it selects, not the file name (it refused EAGLE-3.1 runs on the GPU).
    import eval as eval_script

    export = eagle3_export(tmp_path / "eagle3")
    assert eval_script.requested_family(["draft=eagle3_1"]) == "eagle3"
    assert eval_script.with_export_family(export, ["draft=eagle3_1", "eval.num_prompts=2"]) == [
        "draft=eagle3_1", "eval.num_prompts=2"]
    with pytest.raises(ConfigError, match="draft=eagle3 disagrees with the export"):
        eval_script.with_export_family(dflash_export(tmp_path / "dflash"), ["draft=eagle3_1"])


@pytest.mark.unit
def test_a_family_under_an_extra_root_is_found_composed_and_registered(toy):
    name, _ = toy
    assert name in known_strategies()
    cfg = compose([f"draft={name}"])
    assert cfg.draft.name == name and cfg.draft.options == {"layer": 1}
    strategy = get_strategy(name)
    assert strategy.name == name and strategy.recognizes({"architectures": [f"{name}Draft"]})
    assert not strategy.recognizes({"architectures": ["LlamaForCausalLMEagle3"]})
    with pytest.raises(ConfigError, match=rf"draft.name='nosuch': not one of .*eagle3, (.*, )?{name}"):
        compose(["draft.name=nosuch"])


@pytest.mark.unit
def test_a_package_that_registers_nothing_is_named(toy):
    _, root = toy
    empty = root / "lib" / "drafts" / "toy_silent"
    empty.mkdir()
    (empty / "__init__.py").write_text('"""registers nothing"""\n')
    try:
        with pytest.raises(ConfigError, match=r"toy_silent registers no DraftStrategy named 'toy_silent'"):
            get_strategy("toy_silent")
    finally:
        sys.modules.pop("lib.drafts.toy_silent", None)


@pytest.mark.integration
def test_a_toy_family_trains_exports_and_evaluates_with_no_draft_override(toy, tmp_path):
    """launch.sh trains it (engine capture -> handoff -> FSDP2 trainer), exports it, and eval.py finds
    the family in the export and decodes exactly as greedy decoding does."""
    name, _ = toy
    assert not os.path.exists(os.path.join(REPO, "lib", "drafts", name))  # the checkout is not touched
    run_dir = tmp_path / "run"
    proc = launch([f"draft={name}", f"run.dir={run_dir}", "train.max_steps=3", "engine.token_budget=256",
                   "data.max_length=256", "train.log_every=1"], env_extra={"PYTHON": sys.executable})
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    rows = metric_rows(str(run_dir))
    assert [r["step"] for r in rows] == [1, 2, 3] and all("acc_0" in r for r in rows)
    with open(run_dir / "draft" / "config.json") as f:
        assert json.load(f)["architectures"] == [f"{name}Draft"]
    result = tmp_path / "eval.json"
    # eval.py's main() in this process (the family is found through $SPECDRAFT_DRAFT_ROOTS here as well);
    # its command line as a program is tests/test_spec_decode.py's test_eval_cli_end_to_end.
    assert eval_main(["--draft", str(run_dir), "--out", str(result), "--no-progress", "eval.num_prompts=2",
                      "eval.max_new_tokens=8", "eval.draft_tokens=[2]"]) == 0
    (k2,) = json.loads(result.read_text())["results"]
    assert k2["k"] == 2 and k2["matches_greedy"] is True and 1.0 <= k2["tau"] <= 3.0
