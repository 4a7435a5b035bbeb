"""The speculators-format export (lib/drafts/eagle3/speculators_format.py) without speculators installed.

What vLLM does with such a directory is replayed from its source (vllm/transformers_utils/configs/
speculators/base.py and algos.py `update_eagle3`): its draft config is the transformer_layer_config
plus the EAGLE-3 keys, and its draft loader (the vLLM rules of tests/test_export_schema.py) must fill
every parameter it allocates. tests/test_reference_parity.py loads the same export with speculators'
own model class where it is installed.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaConfig

from lib.drafts.eagle3.export import export_draft
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.speculators_format import export_speculators, speculators_name
from lib.drafts.eagle3.vocab import build_vocab_map
from tests.test_export_schema import OPTIONAL, allocated_params, route

pytestmark = pytest.mark.unit

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def make_draft(target_hidden_size: int = 48) -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=128,
                            vocab_size=70, draft_vocab_size=20, target_hidden_size=target_hidden_size,
                            aux_layer_ids=[1, 3, 6], rope_scaling=LLAMA3_ROPE)
    draft = Eagle3Draft(cfg)
    with torch.no_grad():
        for param in draft.parameters():
            param.normal_()
    draft.set_vocab_map(*build_vocab_map(torch.randint(0, 50, (70,)), 20))
    return draft


def vllm_draft_config(c: dict) -> dict:
    """The dict vLLM builds its draft's PretrainedConfig from (SpeculatorsConfig.
    extract_transformers_pre_trained_config): the layer config, then update_eagle3's keys."""
    view = dict(c["transformer_layer_config"])
    view["draft_vocab_size"] = c.get("draft_vocab_size")
    if c.get("target_hidden_size") is not None:
        view["target_hidden_size"] = c["target_hidden_size"]
    view["norm_before_residual"] = c.get("norm_before_residual", True)  # vLLM's default when absent
    for key in ("norm_before_fc", "fc_norm", "norm_output"):
        view[key] = c.get(key, False)
    view["architectures"] = {"llama": ["Eagle3LlamaForCausalLM"], "qwen3": ["Eagle3Qwen3ForCausalLM"]}[view["model_type"]]
    if c.get("eagle_aux_hidden_state_layer_ids"):
        view["eagle_aux_hidden_state_layer_ids"] = c["eagle_aux_hidden_state_layer_ids"]
    return view


def test_config_has_what_vllm_and_speculators_read(tmp_path):
    draft = make_draft()
    verifier = tmp_path / "target"
    LlamaConfig(hidden_size=48, num_attention_heads=4, num_hidden_layers=8, vocab_size=70,
                architectures=["LlamaForCausalLM"]).save_pretrained(
        str(verifier))
    export_speculators(draft.state_dict(), draft.config, str(tmp_path / "s"), torch.bfloat16, str(verifier),
                       speculative_tokens=4)
    c = json.loads((tmp_path / "s" / "config.json").read_text())
    # vLLM takes speculators_config without a top-level model_type as this format (else: a plain Llama).
    assert c["speculators_model_type"] == "eagle3" and "model_type" not in c
    spec = c["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    # vLLM: num_speculative_tokens defaults to the first proposal method's speculative_tokens.
    assert spec["proposal_methods"][0] == {"proposal_type": "greedy", "speculative_tokens": 4, "verifier_accept_k": 1,
                                           "accept_tolerance": 0.0}
    # `vllm serve <dir>` serves this target; its architectures come from its own config.json.
    assert spec["verifier"] == {"name_or_path": str(verifier), "architectures": ["LlamaForCausalLM"]}
    assert c["draft_vocab_size"] == 20 and c["target_hidden_size"] == 48
    # Ours are "output of layer i"; vLLM and speculators capture the input of layer k = output of k - 1.
    assert c["eagle_aux_hidden_state_layer_ids"] == [2, 4, 7]
    # Our residual is the un-normed hidden: False, written out because vLLM would default to True.
    assert c["norm_before_residual"] is False
    assert (c["norm_before_fc"], c["fc_norm"], c["norm_output"]) == (False, False, False)

    view = vllm_draft_config(c)
    assert view["norm_before_residual"] is False and view["architectures"] == ["Eagle3LlamaForCausalLM"]
    layer = LlamaConfig(**c["transformer_layer_config"])  # what vLLM instantiates from it
    assert (layer.hidden_size, layer.intermediate_size, layer.num_attention_heads, layer.num_key_value_heads,
            layer.head_dim, layer.num_hidden_layers, layer.vocab_size, layer.rms_norm_eps) == (
        32, 56, 4, 2, 16, 1, 70, 1e-5)
    assert layer.rope_parameters["rope_type"] == "llama3" and layer.rope_parameters["rope_theta"] == 5e5
    assert layer.rope_parameters["factor"] == 4.0 and layer.tie_word_embeddings is False
    assert c["transformer_layer_config"]["dtype"] == "bfloat16"


def test_no_verifier_and_a_hub_name(tmp_path):
    draft = make_draft()
    export_speculators(draft.state_dict(), draft.config, str(tmp_path / "a"), torch.bfloat16, None)
    export_speculators(draft.state_dict(), draft.config, str(tmp_path / "b"), torch.bfloat16, "org/some-target")
    a = json.loads((tmp_path / "a" / "config.json").read_text())["speculators_config"]
    b = json.loads((tmp_path / "b" / "config.json").read_text())["speculators_config"]
    # vLLM requires the key to exist (validate_speculators_config); its value may be None.
    assert a["verifier"] == {"name_or_path": None, "architectures": []}
    assert a["proposal_methods"][0]["speculative_tokens"] == 3
    assert b["verifier"] == {"name_or_path": "org/some-target", "architectures": []}  # no network at export


def test_weights_fill_vllms_draft_under_speculators_names(tmp_path):
    # vLLM sizes fc from target_hidden_size: a draft narrower than its target loads too.
    draft = make_draft(target_hidden_size=48)
    export_speculators(draft.state_dict(), draft.config, str(tmp_path), torch.bfloat16, None)
    c = vllm_draft_config(json.loads((tmp_path / "config.json").read_text()))
    expected = allocated_params("vllm", c)
    filled: dict[str, list[tuple[int, ...]]] = {}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name in names:
            target = route("vllm", name)
            if target is not None:
                assert target in expected, f"vLLM has no parameter for checkpoint tensor {name} ({target})"
                filled.setdefault(target, []).append(tuple(f.get_slice(name).get_shape()))
    assert set(expected) - set(filled) <= OPTIONAL
    for target, shapes in filled.items():
        assert (sum(s[0] for s in shapes),) + shapes[0][1:] == expected[target], (target, shapes)
    # speculators' Eagle3DraftModel state-dict names: the decoder layer is layers.0, the rest as ours.
    assert not any(n.startswith("midlayer.") for n in names)
    assert {"layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.mlp.down_proj.weight", "embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight",
            "d2t", "t2d"} <= names


def test_same_tensors_as_the_research_export(tmp_path):
    draft = make_draft()
    state = {"_orig_mod." + k: v for k, v in draft.state_dict().items()}  # a torch.compile'd draft's names
    export_draft(state, draft.config, str(tmp_path / "draft"), dtype=torch.bfloat16)
    export_speculators(state, draft.config, str(tmp_path / "draft_speculators"), torch.bfloat16, None)
    research = load_file(str(tmp_path / "draft" / "model.safetensors"))
    spec = load_file(str(tmp_path / "draft_speculators" / "model.safetensors"))
    assert set(spec) == {speculators_name(n) for n in research}
    for name, t in research.items():
        assert torch.equal(spec[speculators_name(name)], t), name
    assert spec["d2t"].dtype == torch.int64 and spec["t2d"].dtype == torch.bool
    assert spec["fc.weight"].dtype == torch.bfloat16


def test_rejects_partial_state_and_bad_token_count(tmp_path):
    draft = make_draft()
    state = draft.state_dict()
    with pytest.raises(KeyError, match="midlayer.hidden_norm.weight"):
        export_speculators({k: v for k, v in state.items() if k != "midlayer.hidden_norm.weight"}, draft.config,
                           str(tmp_path / "x"), torch.bfloat16, None)
    with pytest.raises(ValueError, match="lm_head.weight"):
        export_speculators({**state, "lm_head.weight": state["lm_head.weight"][:3]}, draft.config, str(tmp_path / "x"),
                           torch.bfloat16, None)
    with pytest.raises(ValueError, match="speculative_tokens=0"):
        export_speculators(state, draft.config, str(tmp_path / "x"), torch.bfloat16, None, speculative_tokens=0)
    assert not (tmp_path / "x").exists()
