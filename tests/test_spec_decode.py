"""Speculative decoding: output equals plain greedy decoding, forced drafts give tau = 1 and k+1,
the batched draft chain equals a from-scratch draft forward, a trained draft is accepted, online
evaluation through the engine backend, and eval.py end to end.

Real small transformers Qwen3 targets (random weights, larger than the default init so greedy choices
are decisive) and real Eagle3Draft models; CPU, one thread.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lib.config import EngineConfig, TargetConfig
from lib.drafts.base import get_strategy
from lib.data.datasets import EvalPrompt
from lib.drafts.eagle3.export import export_draft
from lib.drafts.eagle3.loss import ttt_forward
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig
from lib.drafts.eagle3.target_head import TargetHead
from lib.engine import make_backend
from lib.eval.spec_decode import TargetRunner, evaluate_online, greedy_decode, speculative_decode
from lib.drafts.eagle3.drafter import EagleDrafter

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
AUX = [1, 2, 3]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: intra-op threads spin against other processes and slow tiny ops 100x.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_target(vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3", vocab_size=vocab, **SHAPE),
                                             attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def build_draft(target, draft_vocab: int = 200, seed: int = 1, std: float = 0.05) -> Eagle3Draft:
    torch.manual_seed(seed)
    config = Eagle3DraftConfig.from_target(target.config, draft_vocab, AUX)
    draft = Eagle3Draft(config)
    draft.reset_parameters(std)
    draft.load_embedding(target.get_input_embeddings().weight.detach())
    # A random subset of target ids, so d2t offsets are non-trivial.
    vocab = target.config.vocab_size
    chosen = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    draft.set_vocab_map(chosen - torch.arange(draft_vocab), t2d)
    return draft.eval()


def as_drafter(draft: Eagle3Draft):
    """The draft as decoding takes it: wrapped by its family's strategy (lib/eval names no family)."""
    return get_strategy("eagle3").drafter(draft)


@pytest.fixture(scope="module")
def target():
    return build_target()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 12, 1, 9)]


def frequent_token(outputs: list[list[int]]) -> int:
    """A token the target does emit mid-sequence, to act as the stop token."""
    tokens = torch.tensor([t for out in outputs for t in out[1:-1]])
    return int(tokens.bincount().argmax())


def test_greedy_decode_equals_transformers_generate(target, prompts):
    mine = greedy_decode(target, prompts, 16)
    for prompt, out in zip(prompts, mine):
        ref = target.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()
    stop = frequent_token(mine)
    stopped = greedy_decode(target, prompts, 16, stop_token_ids=[stop], batch_size=3)
    for full, out in zip(mine, stopped):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert out == full[:cut]
    assert any(len(out) < 16 for out in stopped)


@pytest.mark.parametrize("k", [1, 3])
def test_random_draft_output_equals_greedy(target, prompts, k):
    draft = build_draft(target)
    stop = frequent_token(greedy_decode(target, prompts, 16))
    result = speculative_decode(target, as_drafter(draft), prompts, k, 16, [stop], batch_size=3, progress=False)
    assert result.matches_greedy, result.mismatched_prompts
    assert result.outputs == greedy_decode(target, prompts, 16, [stop])
    stats = result.stats
    assert stats.verify_rows > 0 and 1.0 <= result.tau <= k + 1
    assert all(0.0 <= a <= 1.0 for a in result.accept_rates) and len(result.accept_rates) == k
    assert result.speedup_params is not None and result.speedup_params < result.tau


@pytest.mark.parametrize("k", [1, 3, 5])
def test_forced_drafts_give_tau_one_and_k_plus_one(target, prompts, k):
    stop = frequent_token(greedy_decode(target, prompts, 20))
    oracle = speculative_decode(target, None, prompts, k, 20, [stop], forced="oracle", progress=False)
    assert oracle.tau == k + 1
    assert oracle.accept_rates == [1.0] * k
    wrong = speculative_decode(target, None, prompts, k, 20, [stop], forced="wrong", progress=False)
    assert wrong.tau == 1.0
    assert wrong.accept_rates == [0.0] + [0.0] * (k - 1)
    assert wrong.stats.reached == [wrong.stats.verify_rows] + [0] * (k - 1)
    for result in (oracle, wrong):
        assert result.matches_greedy
        assert result.outputs == greedy_decode(target, prompts, 20, [stop])
    # the oracle needs about k+1 times fewer verify rounds than the always-wrong draft
    assert oracle.stats.verify_rows < wrong.stats.verify_rows


class RecordingDrafter(EagleDrafter):
    def __init__(self, draft):
        super().__init__(draft)
        self.records = []

    def propose(self, block, k, rows, generated):
        tokens = super().propose(block, k, rows, generated)
        self.records += [(r, n, t) for r, n, t in zip(rows, generated, tokens.tolist())]
        return tokens


def from_scratch_proposals(target, draft, sequence: list[int], k: int) -> list[int]:
    """The docs' single-sequence recipe: target forward over x[0..n-1], draft prefill x[1..n] with
    aux[0..n-1], then a k-step chain with forward_infer and its own cache."""
    n = len(sequence) - 1
    with torch.no_grad():
        states = target(torch.tensor([sequence[:-1]]), output_hidden_states=True).hidden_states
        aux = torch.cat([states[i + 1] for i in AUX], dim=-1)
        logits, hidden, cache = draft.forward_infer(torch.tensor([sequence[1:]]), aux, False, torch.arange(n)[None])
        tokens = []
        for step in range(k):
            token = draft.draft_to_target_ids(logits[:, -1].argmax(-1))
            tokens.append(int(token))
            logits, hidden, cache = draft.forward_infer(token[:, None], hidden[:, -1:], True,
                                                        torch.tensor([[n + step]]), cache)
    return tokens


def test_batched_chain_equals_a_from_scratch_draft_forward(target, prompts):
    draft = build_draft(target, std=0.2)
    drafter = RecordingDrafter(draft)
    result = speculative_decode(target, drafter, prompts, 3, 10, check_greedy=False, progress=False)
    assert len(drafter.records) == result.stats.verify_rows
    for row, generated, proposed in drafter.records:
        sequence = prompts[row] + result.outputs[row][:generated]
        assert proposed == from_scratch_proposals(target, draft, sequence, 3), (row, generated)


def test_briefly_trained_draft_is_accepted_and_output_stays_greedy(target, prompts):
    continuations = greedy_decode(target, prompts, 24)
    sequences = [p + c for p, c in zip(prompts, continuations)]
    ids = torch.tensor([t for s in sequences for t in s])
    cu = torch.tensor([0] + [len(s) for s in sequences]).cumsum(0).to(torch.int32)
    with torch.no_grad():
        states = [target(torch.tensor([s]), output_hidden_states=True).hidden_states for s in sequences]
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool),
             "position_ids": torch.cat([torch.arange(len(s)) for s in sequences]), "cu_seqlens": cu,
             "aux_hidden": torch.cat([torch.cat([h[i + 1][0] for i in AUX], -1) for h in states]),
             "final_hidden": torch.cat([h[-1][0] for h in states])}
    draft = build_draft(target, draft_vocab=VOCAB)
    head = TargetHead(target.get_output_embeddings().weight.detach(), draft.d2t)
    optimizer = torch.optim.AdamW(draft.trainable_parameters(), lr=3e-3)
    draft.train()
    for _ in range(150):
        loss, _ = ttt_forward(draft, head, batch, 3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    untrained = speculative_decode(target, as_drafter(build_draft(target, draft_vocab=VOCAB)), prompts, 3, 24,
                                   check_greedy=False, progress=False)
    trained = speculative_decode(target, as_drafter(draft), prompts, 3, 24, progress=False)
    assert trained.matches_greedy
    assert trained.tau > 1.5 and trained.tau > untrained.tau + 0.5
    assert trained.accept_rates[0] > 0.5


def test_evaluate_online_through_the_engine_backend(target, prompts, tmp_path):
    target.save_pretrained(tmp_path)
    backend = make_backend("hf")
    backend.load(TargetConfig(path=str(tmp_path)), EngineConfig(token_budget=64), torch.device("cpu"), None)
    # The engine may run an attention that needs packed-batch arguments; decoding switches it to sdpa
    # for the duration (this one cannot even run on CPU) and restores it. Its compiled layers run
    # eagerly: decoding shapes must not compile anything.
    backend.model.set_attn_implementation("engine_varlen")
    compiled = []
    for layer in backend.model.layers:
        layer.forward = torch.compile(layer.forward, backend=lambda gm, inputs: compiled.append(gm) or gm.forward)
    runner = TargetRunner.from_backend(backend, target.get_output_embeddings().weight)
    draft = build_draft(target, std=0.2)
    evals = [EvalPrompt(str(i), p, []) for i, p in enumerate(prompts)]
    row = evaluate_online(runner, as_drafter(draft), evals, [3, 2], 8, step=7)
    assert backend.model.config._attn_implementation == "engine_varlen" and not compiled
    assert row["step"] == 7
    direct = {k: speculative_decode(target, as_drafter(draft), prompts, k, 8, check_greedy=False, progress=False)
              for k in (3, 2)}
    assert row["accept_len"] == row["accept_len_k3"] == direct[3].tau
    assert row["accept_len_k2"] == direct[2].tau
    assert [row[f"accept_rate_{i}"] for i in range(3)] == direct[3].accept_rates
    assert "accept_rate_3" not in row
    # the engine's own capture still works on the same model afterwards (hooks were removed)
    assert all(len(layer._forward_hooks) == 1 for i, layer in enumerate(backend.model.layers) if i in backend.aux_layers)


@pytest.mark.gpu
def test_cuda_decoding_equals_greedy_and_forced_taus(prompts):
    cpu_target = build_target()
    draft = build_draft(cpu_target, std=0.2).cuda()
    target = cpu_target.cuda()
    result = speculative_decode(target, as_drafter(draft), prompts, 3, 16, progress=False)
    assert result.matches_greedy, result.mismatched_prompts
    assert speculative_decode(target, None, prompts, 3, 16, forced="oracle", progress=False).tau == 4
    assert speculative_decode(target, None, prompts, 3, 16, forced="wrong", progress=False).tau == 1


def test_bad_inputs_name_the_problem(target, prompts):
    with pytest.raises(TypeError, match=r"Eagle3Draft, not a Drafter: .*get_strategy\(name\)\.drafter\(model\)"):
        speculative_decode(target, build_draft(target), prompts, 2, 8)
    draft = as_drafter(build_draft(target))
    with pytest.raises(ValueError, match="k=0"):
        speculative_decode(target, draft, prompts, 0, 8)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        speculative_decode(target, draft, [[1], []], 2, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        speculative_decode(target, draft, [[1, 300]], 2, 8)
    with pytest.raises(ValueError, match="evaluate it with its own target"):
        speculative_decode(build_target(vocab=400), draft, [[1, 2]], 2, 8)
    with pytest.raises(TypeError, match="AutoModelForCausalLM"):
        greedy_decode(object(), [[1]], 4)
    with pytest.raises(ValueError, match="forced="):
        speculative_decode(target, None, prompts, 2, 8, forced="perfect")


@pytest.mark.integration
def test_eval_cli_end_to_end(tmp_path):
    target_dir, draft_dir = tmp_path / "target", tmp_path / "draft"
    target_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(REPO, "assets", "tiny_target", name), target_dir / name)
    model = build_target(vocab=len(AutoTokenizer.from_pretrained(target_dir)))
    model.save_pretrained(target_dir)
    draft = build_draft(model, draft_vocab=500)
    export_draft(draft.state_dict(), draft.config, str(draft_dir), dtype=torch.float32)
    out = tmp_path / "eval.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "eval.py"), "--draft", str(draft_dir), "--out", str(out), "--no-progress",
         f"target.path={target_dir}", "data=tiny", f"data.cache_dir={tmp_path / 'cache'}", "eval.num_prompts=3",
         "eval.max_new_tokens=6", "eval.draft_tokens=[1,2]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [r["k"] for r in report["results"]] == [1, 2]
    assert report["num_prompts"] == 3
    assert report["stop_token_ids"] == [AutoTokenizer.from_pretrained(target_dir).eos_token_id]
    for r in report["results"]:
        assert r["matches_greedy"] is True and 1.0 <= r["tau"] <= r["k"] + 1
    assert "tau" in proc.stdout and "speedup_params" in proc.stdout
    bad = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--draft", str(draft_dir),
                          "eval.bogus=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "eval.bogus" in bad.stderr


def test_drafters_propose_with_cudnn_attention_off(target, prompts):
    """Drafting runs under the decode step's sdpa backends: a masked attention whose key width grows
    each round must not take cuDNN, whose per-shape graph setup would run on every draft forward."""
    class Recording(EagleDrafter):
        def propose(self, *args):
            flags.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
            return super().propose(*args)

    flags: list[tuple[bool, bool]] = []
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the process default, restored after decoding
    result = speculative_decode(target, Recording(build_draft(target)), prompts, 3, 6, check_greedy=True)
    assert flags and set(flags) == {(False, True)}
    assert result.matches_greedy and torch.backends.cuda.cudnn_sdp_enabled()


def test_a_difference_from_greedy_is_measured_by_the_targets_logit_margin(target, prompts):
    """divergence_margins: at the first token where an output leaves greedy decoding, the target's own
    logits (transformers' forward) of greedy's token minus the output's; a prefix-only difference (an
    earlier stop) has no token pair; equal outputs have no entry."""
    from lib.eval.spec_decode import as_target_runner, divergence_margins

    greedy = greedy_decode(target, prompts, 6)
    outputs = [list(g) for g in greedy]
    outputs[0][2] = (greedy[0][2] + 1) % VOCAB  # leaves greedy at token 2
    outputs[3] = greedy[3][:4]  # stops early: no token pair
    margins = divergence_margins(as_target_runner(target), prompts, outputs, greedy)
    assert set(margins) == {0}
    with torch.no_grad():
        logits = target(torch.tensor([prompts[0] + greedy[0][:2]])).logits[0, -1]
    expected = float(logits[greedy[0][2]] - logits[outputs[0][2]])
    assert expected > 0 and margins[0] == pytest.approx(expected, abs=1e-4)
    # A real decode of a fitting draft equals greedy in fp32: no margins at all.
    assert speculative_decode(target, as_drafter(build_draft(target)), prompts, 3, 6).greedy_margins == {}
