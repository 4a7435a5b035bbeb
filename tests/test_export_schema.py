"""Our draft export against the schema sglang's and vLLM's EAGLE-3 Llama draft loaders read.

The schema below is data transcribed from their source (paths cited per entry); each loader's
renaming of checkpoint names is replayed and every parameter it allocates must be filled with the
shape it allocates.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig

from lib.drafts.eagle3.export import config_from_export, export_draft, load_draft
from lib.drafts.eagle3.loss import ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import TargetHead
from lib.drafts.eagle3.vocab import build_vocab_map

pytestmark = pytest.mark.unit

# Checkpoint-name rewrites applied in order by each loader's load_weights.
STACKED = [(".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")]
LOADERS = {
    # sglang python/sglang/srt/models/llama_eagle3.py, LlamaForCausalLMEagle3.load_weights: "d2t" becomes
    # hot_token_id (d2t + arange), "t2d" is skipped, q/k/v and gate/up are stacked, and a name not found
    # as-is gets the "model." prefix.
    "sglang": dict(skip=("t2d",), special={"d2t": "hot_token_id"}, rename=(), prefix="model.",
                   unprefixed=("lm_head.",)),
    # vllm vllm/model_executor/models/llama_eagle3.py, Eagle3LlamaForCausalLM.load_weights + LlamaModel.load_weights:
    # "t2d" skipped, "d2t" -> draft_id_to_target_id, "model." prefix unless lm_head, "midlayer." -> "layers.0.".
    "vllm": dict(skip=("t2d",), special={"d2t": "draft_id_to_target_id"}, rename=(("midlayer.", "layers.0."),),
                 prefix="model.", unprefixed=("lm_head.",)),
}


def allocated_params(server: str, c: dict) -> dict[str, tuple[int, ...]]:
    """Parameters each server allocates for a draft config.json `c` (name -> shape)."""
    h, d, heads, kv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    layer = "model.midlayer." if server == "sglang" else "model.layers.0."
    params = {
        # Both build embed_tokens over the full target vocab (VocabParallelEmbedding(vocab_size, hidden_size)).
        "model.embed_tokens.weight": (c["vocab_size"], h),
        # fc: nn.Linear(target_hidden_size * 3, hidden_size) (sglang LlamaModel / vLLM ReplicatedLinear).
        "model.fc.weight": (h, 3 * c["target_hidden_size"]),
        # QKVParallelLinear(2 * hidden_size, head_dim, num_heads, num_kv_heads) for the first layer.
        layer + "self_attn.qkv_proj.weight": ((heads + 2 * kv) * d, 2 * h),
        layer + "self_attn.o_proj.weight": (h, heads * d),
        layer + "mlp.gate_up_proj.weight": (2 * c["intermediate_size"], h),
        layer + "mlp.down_proj.weight": (h, c["intermediate_size"]),
        layer + "input_layernorm.weight": (h,),
        layer + "hidden_norm.weight": (h,),
        layer + "post_attention_layernorm.weight": (h,),
        "model.norm.weight": (h,),
        # ParallelLMHead(draft_vocab_size, hidden_size) since tie_word_embeddings is false.
        "lm_head.weight": (c["draft_vocab_size"], h),
    }
    params[LOADERS[server]["special"]["d2t"]] = (c["draft_vocab_size"],)
    return params


# Optional for both: vLLM skips "embed_tokens" when absent and shares the target's; sglang sets it from the target.
OPTIONAL = {"model.embed_tokens.weight"}


def route(server: str, name: str) -> str | None:
    rules = LOADERS[server]
    if any(s in name for s in rules["skip"]):
        return None
    for key, target in rules["special"].items():
        if key in name:
            return target
    for old, new in rules["rename"]:
        name = name.replace(old, new)
    for old, new in STACKED:
        if old in name:
            name = name.replace(old, new)
            break
    return name if name.startswith(rules["unprefixed"]) else rules["prefix"] + name


def make_draft(num_kv_heads: int = 2) -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig(hidden_size=32, intermediate_size=56, num_attention_heads=4,
                            num_key_value_heads=num_kv_heads, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                            max_position_embeddings=128, vocab_size=70, draft_vocab_size=20, target_hidden_size=32,
                            aux_layer_ids=[1, 3, 6],
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    draft = Eagle3Draft(cfg)
    draft.load_embedding(torch.randn(70, 32))
    draft.set_vocab_map(*build_vocab_map(torch.randint(0, 50, (70,)), 20))
    return draft


@pytest.mark.parametrize("server", sorted(LOADERS))
def test_export_fills_every_parameter_the_server_allocates(tmp_path, server):
    draft = make_draft()
    export_draft(draft.state_dict(), draft.config, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    expected = allocated_params(server, config)
    filled: dict[str, list[tuple[int, ...]]] = {}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            target = route(server, name)
            if target is not None:
                assert target in expected, f"{server} has no parameter for checkpoint tensor {name} ({target})"
                filled.setdefault(target, []).append(tuple(f.get_slice(name).get_shape()))
            if name == "d2t":
                assert f.get_tensor(name).dtype == torch.int64  # vLLM: nn.Parameter(torch.long); sglang adds arange
    assert set(expected) - set(filled) <= OPTIONAL
    for target, shapes in filled.items():
        want = expected[target]
        # Stacked shards concatenate along the output dimension.
        assert (sum(s[0] for s in shapes),) + shapes[0][1:] == want, (target, shapes, want)


def test_config_fields_the_servers_read(tmp_path):
    draft = make_draft()
    export_draft(draft.state_dict(), draft.config, str(tmp_path))
    c = json.loads((tmp_path / "config.json").read_text())
    # sglang/vLLM model registries dispatch on this architecture name.
    assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["model_type"] == "llama"
    # LlamaForCausalLMEagle3: tie_word_embeddings true would make lm_head the embedding.
    assert c["tie_word_embeddings"] is False and c["num_hidden_layers"] == 1
    # sglang model_runner: eagle_config["eagle_aux_hidden_state_layer_ids"], +1 added in set_eagle3_layers_to_capture.
    assert c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
    # vLLM eagle3_utils.get_eagle3_aux_layers_from_config reads the top level and captures layer *inputs*.
    assert c["eagle_aux_hidden_state_layer_ids"] == [2, 4, 7]
    assert c["eagle_config"]["use_aux_hidden_state"] is True  # vLLM LlamaModel: keeps fc
    # sglang LlamaDecoderLayer: getattr(config, "rope_theta", 10000), getattr(config, "rope_scaling", None).
    assert c["rope_theta"] == 1e6 and c["rope_scaling"]["rope_type"] == "llama3"
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "max_position_embeddings", "vocab_size", "draft_vocab_size", "target_hidden_size",
                "hidden_act", "torch_dtype"):
        assert key in c, key
    loaded = AutoConfig.from_pretrained(str(tmp_path))  # what both servers call first
    assert isinstance(loaded, LlamaConfig)
    assert (loaded.draft_vocab_size, loaded.target_hidden_size, loaded.head_dim) == (20, 32, 16)
    assert loaded.rope_parameters["rope_theta"] == 1e6 and loaded.rope_parameters["rope_type"] == "llama3"
    assert config_from_export(c) == draft.config


def test_round_trip_gives_the_same_draft(tmp_path):
    draft = make_draft(num_kv_heads=1)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "fp32"), dtype=torch.float32)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "bf16"))
    exact, rounded = load_draft(str(tmp_path / "fp32")), load_draft(str(tmp_path / "bf16"))
    for name, t in draft.state_dict().items():
        assert torch.equal(exact.state_dict()[name], t), name
    ids, aux = torch.randint(0, 70, (1, 7)), torch.randn(1, 7, 96)
    pos = torch.arange(7)[None]
    logits = draft.forward_infer(ids, aux, False, pos)[0]
    assert torch.equal(exact.forward_infer(ids, aux, False, pos)[0], logits)
    torch.testing.assert_close(rounded.forward_infer(ids, aux, False, pos)[0], logits, rtol=0.1, atol=0.1)
    head = TargetHead(torch.randn(70, 32), draft.d2t)
    batch = dict(input_ids=ids[0], loss_mask=torch.ones(7, dtype=torch.bool), position_ids=pos[0], aux_hidden=aux[0],
                 final_hidden=torch.randn(7, 32), cu_seqlens=torch.tensor([0, 7], dtype=torch.int32))
    assert torch.equal(ttt_forward(exact, head, batch, 2)[0], ttt_forward(draft, head, batch, 2)[0])


def test_export_rejects_partial_state_and_load_needs_an_embedding_when_absent(tmp_path):
    draft = make_draft()
    state = draft.state_dict()
    with pytest.raises(KeyError, match="lm_head.weight"):
        export_draft({k: v for k, v in state.items() if k != "lm_head.weight"}, draft.config, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="fc.weight"):
        export_draft({**state, "fc.weight": state["fc.weight"][:4]}, draft.config, str(tmp_path / "x"))
    compiled_names = {"_orig_mod." + k: v for k, v in state.items()}
    export_draft(compiled_names, draft.config, str(tmp_path / "ok"), dtype=torch.float32)
    # A third-party style export: no embedding, no t2d.
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in ("embed_tokens.weight", "t2d")},
              str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(KeyError, match="embed_tokens"):
        load_draft(str(tmp_path / "ok"))
    rebuilt = load_draft(str(tmp_path / "ok"), embedding=draft.embed_tokens.weight)
    assert torch.equal(rebuilt.t2d, draft.t2d) and torch.equal(rebuilt.embed_tokens.weight, draft.embed_tokens.weight)
