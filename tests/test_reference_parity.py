"""Our EAGLE-3 training unroll against the reference implementations it must agree with.

The draft is exported (lib/drafts/eagle3/export.py for SpecForge, which reads the research format;
lib/drafts/eagle3/speculators_format.py for speculators, vLLM's native format), loaded into
SpecForge's `LlamaForCausalLMEagle3` and speculators' `Eagle3DraftModel`, and each reference runs
its own training-time-test unroll on the same packed batch. Our logits at every depth
(`Eagle3Draft.forward`, the path `ttt_forward` takes) must equal theirs, in fp32, with and without
llama3 rope scaling. Every parameter is drawn (norm gains too), so no term can hide behind a
weight of one or zero. EAGLE-3.1 (`fc_norm`: one RMSNorm per aux layer before fc) is checked the
same way against both classes, which build it from the `fc_norm` key of the config, on aux states
whose magnitudes differ by layer.

How each reference runs depth i (read from their sources, SpecForge 0.2.0 and speculators 0.9.0):
  - SpecForge (specforge/algorithms/eagle3/model.py + modeling/draft/llama3_eagle.py,
    LlamaAttention with `cache_hidden`): one sample per row of a padded batch; input ids shifted
    left once more per step; the hidden is the previous step's pre-norm output; step i rotates
    query and new key at position_ids + len(cache) = position_ids + i and appends the key to the
    cache, then attends causally to step-0 keys plus the same-position keys of steps 1..i.
  - speculators (models/eagle3/core.py): one packed row with document ids; the same shift;
    position_ids + 1 after every step; keys appended to a DynamicCache, masked by a
    document-causal block plus a diagonal block per step. We run its dense-mask ("eager")
    attention, which its own code supports next to flex attention, because flex's block masks
    need 128-token blocks.
Only the rows whose step-i input token lies inside their sample are compared: the others read a
filler (each implementation its own) and carry no loss anywhere.

The references run in their own virtual environment (specforge and speculators pin other torch
and transformers versions than the project); without them the tests skip.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lib.drafts.eagle3.attention import TTTAttention
from lib.drafts.eagle3.export import export_draft
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.rope import rope_inverse_frequencies
from lib.drafts.eagle3.speculators_format import export_speculators
from tests.eagle3_draws import (AUX_SCALES, LENGTHS, LLAMA3_ROPE, YARN_ROPE, YARN_UNTRUNCATED_ROPE, drawn_draft,
                                packed_inputs)

pytestmark = pytest.mark.unit

TTT_LENGTH = 4
RTOL, ATOL = 1e-5, 1e-4
ROPES = [pytest.param(None, id="rope-default"), pytest.param(LLAMA3_ROPE, id="rope-llama3"),
         pytest.param(YARN_ROPE, id="rope-yarn")]
VERIFIER_LAYERS = 6


def compared_rows(cu: torch.Tensor) -> list[torch.Tensor]:
    """Per depth i, the packed rows t whose input token x[t+1+i] lies in their own sample."""
    total = int(cu[-1])
    end = torch.repeat_interleave(cu[1:].long(), torch.tensor(LENGTHS))
    t = torch.arange(total)
    return [torch.nonzero(t + 1 + i < end).squeeze(1) for i in range(TTT_LENGTH)]


def packed_rows(cu: torch.Tensor) -> list[torch.Tensor]:
    """Per depth i, every packed row t whose input token x[t+1+i] exists in the packed batch (only the
    last i+1 rows read a filler: 0 in speculators, the last token in ours). Rows whose token lies in
    the next sample are computed the same way by both (same shifted ids, document-causal keys)."""
    total = int(cu[-1])
    return [torch.arange(max(total - 1 - i, 0)) for i in range(TTT_LENGTH)]


def our_logits(draft: Eagle3Draft, ids, aux, positions, cu, rows=compared_rows) -> list[torch.Tensor]:
    """Training's logits of the compared rows at every depth (Eagle3Draft.forward, as ttt_forward calls it)."""
    attention = TTTAttention(cu, ids.shape[0], draft.midlayer.self_attn.scale, "reference",
                             head_dim=draft.config.head_dim)
    with torch.no_grad():
        return draft(ids, aux, positions, attention, rows(cu))


def inverse_frequencies(draft: Eagle3Draft) -> torch.Tensor:
    c = draft.config
    return rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling).float()


def max_diffs(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[float]:
    return [float((a - b).abs().max()) for a, b in zip(ours, theirs)]


def assert_same_logits(ours: list[torch.Tensor], theirs: list[torch.Tensor], reference: str) -> None:
    diffs = max_diffs(ours, theirs)
    print(f"{reference}: max |d logit| per depth {['%.3g' % d for d in diffs]}")
    for depth, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"{reference} depth {depth}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.allclose(a, b, rtol=RTOL, atol=ATOL), (
            f"{reference} disagrees with our training unroll at depth {depth}: max |d logit| per depth {diffs}")


# ---- SpecForge ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def specforge_eagle3():
    return pytest.importorskip("specforge.modeling.draft.llama3_eagle", reason="SpecForge is not installed")


def load_specforge(path: str):
    """The draft as SpecForge builds it (AutoDraftModel.from_config, the class named by the config's
    architectures) with the exported weights loaded strictly, as its warm start does. (transformers'
    from_pretrained leaves SpecForge's non-persistent rotary buffers uninitialised.)"""
    from safetensors.torch import load_file
    from specforge.modeling.auto import AutoDraftModel
    from transformers import AutoConfig
    model = AutoDraftModel.from_config(AutoConfig.from_pretrained(path), torch_dtype=torch.float32)
    model.load_state_dict(load_file(f"{path}/model.safetensors"), strict=True)
    return model.eval()


def specforge_logits(model, ids, aux, positions, cu) -> list[torch.Tensor]:
    """SpecForge's TTT unroll (OnlineEagle3Model.forward, sdpa backend) one sample at a time."""
    per_depth: list[list[torch.Tensor]] = [[] for _ in range(TTT_LENGTH)]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        sample_ids = ids[start:end]
        hidden = model.project_hidden_states(aux[start:end].unsqueeze(0))
        mask = model.prepare_decoder_attention_mask(torch.ones(1, n, dtype=torch.bool), hidden, 1, n, 0)
        pos = positions[start:end].unsqueeze(0)
        cache_hidden = [[], []]
        for i in range(TTT_LENGTH):
            # Their data shifts the ids once; each later step shifts left again and pads with 0.
            step_ids = torch.cat([sample_ids[1 + i:], sample_ids.new_zeros(min(1 + i, n))])[:n].unsqueeze(0)
            embeds = model.embed_input_ids(step_ids).to(hidden.dtype)
            hidden = model.backbone(embeds, hidden, cache_hidden, mask, pos, None, True)
            logits = model.compute_logits(hidden)[0]
            per_depth[i].append(logits[: max(n - 1 - i, 0)])
    return [torch.cat(rows) for rows in per_depth]


@pytest.mark.parametrize("rope_scaling", ROPES)
def test_specforge_matches_our_unroll(specforge_eagle3, rope_scaling, tmp_path):
    draft = drawn_draft(rope_scaling, target_hidden_size=32)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), dtype=torch.float32)
    model = load_specforge(str(tmp_path / "draft"))
    # The rotary frequencies it read from our config.json are ours (llama3 scaling included).
    assert torch.allclose(model.midlayer.self_attn.rotary_emb.inv_freq, inverse_frequencies(draft))
    inputs = packed_inputs(draft.config)
    # SpecForge compiles its rotary and norm functions; eager gives the same numbers without a compiler.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        theirs = specforge_logits(model, *inputs)
    assert_same_logits(our_logits(draft, *inputs), theirs, "SpecForge")


@pytest.mark.parametrize("rope_scaling", ROPES[:2])
def test_specforge_matches_our_eagle3_1_unroll(specforge_eagle3, rope_scaling, tmp_path):
    """EAGLE-3.1 from the research format: SpecForge builds fc_norm from the config's `fc_norm` key,
    three RMSNorms over target_hidden_size (24 here, narrower than the draft's 32)."""
    draft = drawn_draft(rope_scaling, target_hidden_size=24, fc_norm=True)
    export_draft(draft.state_dict(), draft.config, str(tmp_path / "draft"), dtype=torch.float32)
    model = load_specforge(str(tmp_path / "draft"))
    assert model.fc_norm is not None and len(model.fc_norm) == 3
    for theirs, ours in zip(model.fc_norm, draft.fc_norm):
        assert torch.equal(theirs.weight, ours.weight) and theirs.variance_epsilon == draft.config.rms_norm_eps
    inputs = packed_inputs(draft.config, aux_scales=AUX_SCALES)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        theirs = specforge_logits(model, *inputs)
    assert_same_logits(our_logits(draft, *inputs), theirs, "SpecForge, EAGLE-3.1")


# ---- speculators -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speculators_eagle3():
    return pytest.importorskip("speculators.models.eagle3", reason="speculators is not installed")


def tiny_verifier(path, cfg: Eagle3DraftConfig) -> str:
    """A tiny Llama target saved to disk: on load speculators checks the aux layers against its
    config and reads its embedding, lm_head and final norm (for its own loss; the draft's exported
    embedding and lm_head must win)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=VERIFIER_LAYERS,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size, tie_word_embeddings=False)).save_pretrained(str(path))
    return str(path)


def load_speculators(module, path: str):
    """speculators' Eagle3DraftModel from an export, with its dense-mask attention."""
    config = module.Eagle3SpeculatorConfig.from_pretrained(path)
    config.transformer_layer_config._attn_implementation = "eager"
    model = module.Eagle3DraftModel.from_pretrained(path, config=config, dtype=torch.float32)
    return model.eval()


def speculators_logits(model, ids, aux, positions, cu, rows=compared_rows) -> list[torch.Tensor]:
    """speculators' TTT unroll (Eagle3DraftModel.forward) on the packed batch; the logits of each
    step are read off its lm_head."""
    captured: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: captured.append(out[0]))
    document_ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    # Their data pairs the hidden at t with the token x[t+1] (speculators.models.eagle3.data.shift_batch).
    shifted = torch.cat([ids[1:], ids.new_zeros(1)])
    try:
        with torch.no_grad():
            model(hidden_states=aux.unsqueeze(0), input_ids=shifted.unsqueeze(0),
                  document_ids=document_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), ttt_steps=TTT_LENGTH)
    finally:
        hook.remove()
    assert len(captured) == TTT_LENGTH
    return [logits[depth_rows] for logits, depth_rows in zip(captured, rows(cu))]


@pytest.mark.parametrize("rope_scaling", [*ROPES, pytest.param(YARN_UNTRUNCATED_ROPE, id="rope-yarn-untruncated")])
def test_speculators_matches_our_unroll(speculators_eagle3, rope_scaling, tmp_path):
    draft = drawn_draft(rope_scaling, target_hidden_size=32)
    verifier = tiny_verifier(tmp_path / "target", draft.config)
    out = export_speculators(draft.state_dict(), draft.config, str(tmp_path / "draft_speculators"), torch.float32,
                             verifier)
    model = load_speculators(speculators_eagle3, out)
    # Loaded as written: the aux ids in vLLM's convention, our norm_before_residual, the vocab map.
    assert model.config.eagle_aux_hidden_state_layer_ids == [i + 1 for i in draft.config.aux_layer_ids]
    assert model.config.norm_before_residual is False
    assert model.config.speculators_config.verifier.name_or_path == verifier
    assert torch.equal(model.d2t, draft.d2t) and torch.equal(model.t2d, draft.t2d)
    assert torch.allclose(model.rotary_emb.inv_freq, inverse_frequencies(draft))
    inputs = packed_inputs(draft.config)
    assert_same_logits(our_logits(draft, *inputs), speculators_logits(model, *inputs), "speculators")


@pytest.mark.parametrize("rope_scaling", ROPES[:2])
def test_speculators_matches_our_eagle3_1_unroll(speculators_eagle3, rope_scaling, tmp_path):
    """EAGLE-3.1 from the speculators format, every packed row that reads a real token at every depth."""
    draft = drawn_draft(rope_scaling, target_hidden_size=32, fc_norm=True)
    verifier = tiny_verifier(tmp_path / "target", draft.config)
    out = export_speculators(draft.state_dict(), draft.config, str(tmp_path / "draft_speculators"), torch.float32,
                             verifier)
    model = load_speculators(speculators_eagle3, out)
    assert model.config.fc_norm is True and model.config.norm_before_fc is False and model.input_norm is None
    assert model.fc_norm is not None and len(model.fc_norm) == 3
    for theirs, ours in zip(model.fc_norm, draft.fc_norm):
        assert torch.equal(theirs.weight, ours.weight) and theirs.variance_epsilon == draft.config.rms_norm_eps
    inputs = packed_inputs(draft.config, aux_scales=AUX_SCALES)
    ours = our_logits(draft, *inputs, rows=packed_rows)
    assert_same_logits(ours, speculators_logits(model, *inputs, rows=packed_rows), "speculators, EAGLE-3.1")
    # The norm is what makes the layers' magnitudes irrelevant: the plain draft with the same weights differs.
    plain = Eagle3Draft(dataclasses.replace(draft.config, fc_norm=False))
    plain.load_state_dict({k: v for k, v in draft.state_dict().items() if not k.startswith("fc_norm.")})
    assert max(max_diffs(our_logits(plain, *inputs, rows=packed_rows), ours)) > 1.0


def test_speculators_config_round_trips_through_their_schema(speculators_eagle3, tmp_path):
    """Their pydantic config accepts ours and writes back the fields vLLM reads, unchanged."""
    draft = drawn_draft(None, target_hidden_size=32)
    out = export_speculators(draft.state_dict(), draft.config, str(tmp_path / "s"), torch.bfloat16, None,
                             speculative_tokens=5)
    config = speculators_eagle3.Eagle3SpeculatorConfig.from_pretrained(out)
    written = json.loads((tmp_path / "s" / "config.json").read_text())
    dumped = config.to_dict()
    for key in ("speculators_model_type", "draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                "norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):
        assert dumped[key] == written[key], key
    methods = dumped["speculators_config"]["proposal_methods"]
    assert methods[0]["speculative_tokens"] == 5
    assert dumped["speculators_config"]["verifier"]["name_or_path"] is None
    layer = config.transformer_layer_config
    assert (layer.model_type, layer.hidden_size, layer.head_dim, layer.vocab_size) == (
        "llama", draft.config.hidden_size, draft.config.head_dim, draft.config.vocab_size)
    # EAGLE-3.1: their schema takes fc_norm with norm_before_fc false (it refuses both true).
    eagle3_1 = drawn_draft(None, target_hidden_size=32, fc_norm=True)
    out = export_speculators(eagle3_1.state_dict(), eagle3_1.config, str(tmp_path / "s31"), torch.bfloat16, None)
    eagle3_1_dumped = speculators_eagle3.Eagle3SpeculatorConfig.from_pretrained(out).to_dict()
    assert [eagle3_1_dumped[k] for k in ("fc_norm", "norm_before_fc", "norm_output")] == [True, False, False]
