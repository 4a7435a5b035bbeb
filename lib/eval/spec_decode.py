"""Greedy speculative decoding with a transformers target and any family's drafter: the draft's real
acceptance length, offline (eval.py) and during training (evaluate_online).

A round: the drafter (lib/drafts/drafting.py; a family's comes from its DraftStrategy.drafter)
proposes k tokens; the target verifies [newest token, d1..dk] in one forward and keeps the longest
prefix equal to its own greedy choices plus its bonus token. The output is therefore the target's
greedy decoding whatever the draft does; the draft only changes how many target forwards it takes.
Reported: tau = mean tokens per verify forward = mean(accepted + 1), per-position acceptance rates
and speedup proxies (docs/evaluation.md has the formulas). The counts are also kept per prompt
(lib/eval/acceptance.py), so groups of prompts (categories) get their own numbers from the same
batched decoding.

Batching: rows accept different counts per round, so no KV cache (target or draft) is cropped.
Every round appends k+1 slots to every row; slots a row rejected stay as holes hidden by an explicit
[B, S, L] mask, and positions follow each row's own sequence, not the slot index. Every kept token
thus attends exactly its row's earlier tokens at their positions, as when the row decodes alone.
Finished rows leave the batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

import torch
from torch.nn.attention import sdpa_kernel
from tqdm import tqdm  # a dependency of transformers, so always present

from lib.drafts.drafting import Drafter, VerifiedBlock, visible_keys
from lib.eval.acceptance import AcceptanceCounts, AcceptanceStats
from lib.eval.compiled_decode import DECODE_BACKENDS
from lib.eval.drafters import FORCED_MODES, ForcedDrafter
from lib.eval.target import TargetRunner, as_target_runner  # noqa: F401 (re-exported)


def _extend(out: list[int], tokens: list[int], max_new_tokens: int, stop_ids: frozenset) -> bool:
    """Append up to the budget and through the first stop token; True when the row is finished."""
    for token in tokens:
        if len(out) >= max_new_tokens:
            return True
        out.append(token)
        if token in stop_ids:
            return True
    return len(out) >= max_new_tokens


def _emit(out: list[int], tokens: list[int], max_new_tokens: int, stop_ids: frozenset, bar) -> bool:
    """_extend, and move the progress bar by the tokens added (by the whole rest of the budget when
    the row finishes, so the bar ends full)."""
    before = len(out)
    done = _extend(out, tokens, max_new_tokens, stop_ids)
    bar.update((max_new_tokens if done else len(out)) - before)
    return done


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _decode_batch(target: TargetRunner, drafter: Optional[Drafter], prompts: list[list[int]], first: int, k: int,
                  max_new_tokens: int, stop_ids: frozenset, stats: AcceptanceStats, bar) -> list[list[int]]:
    """Decode one batch (prompts first.. of the whole list); k=0 without a drafter is plain greedy
    decoding on the same machinery. The drafter and the stats see each row as its index in the whole
    list, so per-prompt state (a forced drafter's reference, per-prompt counts) survives batching."""
    device, n = target.device, len(prompts)
    aux_layers = drafter.aux_layers if drafter is not None else []
    width = max(len(p) for p in prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    slot_valid = torch.zeros(n, width, dtype=torch.bool)
    for b, prompt in enumerate(prompts):  # left padding: every row's newest token is in the last slot
        ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        slot_valid[b, width - len(prompt):] = True
    ids, slot_valid = ids.to(device), slot_valid.to(device)
    positions = (slot_valid.long().cumsum(1) - 1).clamp_min(0)
    greedy, aux, cache = target.forward(ids, positions, visible_keys(slot_valid, width), None, aux_layers)
    newest = greedy[:, -1]
    block = VerifiedBlock(torch.cat([ids[:, 1:], newest[:, None]], 1), aux, positions, slot_valid,
                          torch.full((n,), width - 1, dtype=torch.long, device=device))
    next_position = positions[:, -1] + 1
    outputs: list[list[int]] = [[] for _ in prompts]
    rows = list(range(n))
    done = [_emit(outputs[b], [t], max_new_tokens, stop_ids, bar) for b, t in enumerate(newest.tolist())]
    if drafter is not None:
        drafter.start()
    offsets = torch.arange(k + 1, device=device)
    while not all(done):
        if any(done):
            live = [i for i, d in enumerate(done) if not d]
            index = torch.tensor(live, device=device)
            cache.batch_select_indices(index)
            slot_valid, next_position, newest = slot_valid[index], next_position[index], newest[index]
            block = block.select(index)
            if drafter is not None:
                drafter.keep(index)
            rows, done = [rows[i] for i in live], [False] * len(live)
        starts = [len(outputs[r]) for r in rows]  # answer tokens so far: where in the answer this round is
        t0 = _clock(device)
        if drafter is not None:
            # A drafter's masked attention grows one cache width per round, as the decode step's does: off
            # cuDNN, whose per-shape graph setup would run on every draft forward (EAGLE-3 on SmolLM2, H100:
            # 48 s of drafting against 4 s of verifying, 72 prompts at k=7).
            with sdpa_kernel(DECODE_BACKENDS):
                proposals = drafter.propose(block, k, [first + r for r in rows], starts)
        else:
            proposals = torch.empty(len(rows), 0, dtype=torch.long, device=device)
        t1 = _clock(device)
        positions = next_position[:, None] + offsets
        slot_valid = torch.cat([slot_valid, torch.ones(len(rows), k + 1, dtype=torch.bool, device=device)], 1)
        sent = proposals.clamp_min(0)  # NOT_PROPOSED slots run as token 0; the comparison below rejects them
        greedy, aux, cache = target.forward(torch.cat([newest[:, None], sent], 1), positions,
                                            visible_keys(slot_valid, k + 1), cache, aux_layers)
        t2 = _clock(device)
        accepted = (proposals == greedy[:, :k]).long().cumprod(1).sum(1)
        pick = torch.arange(len(rows), device=device)
        newest = greedy[pick, accepted]  # the bonus token: the target's choice after the accepted prefix
        kept = offsets[None] <= accepted[:, None]
        slot_valid[:, -(k + 1):] = kept
        next_ids = torch.cat([sent, greedy[:, k:]], 1)
        next_ids[pick, accepted] = newest
        block = VerifiedBlock(next_ids, aux, positions, kept, accepted)
        next_position = next_position + accepted + 1
        stats.record(accepted, t1 - t0, t2 - t1, [first + r for r in rows], starts)
        for i, (r, m, props, bonus) in enumerate(zip(rows, accepted.tolist(), proposals.tolist(), newest.tolist())):
            done[i] = _emit(outputs[r], props[:m] + [bonus], max_new_tokens, stop_ids, bar)
    return outputs


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    checked = [list(map(int, p)) for p in prompts]
    if not checked:
        raise ValueError("no prompts to decode: pass at least one list of token ids")
    for i, p in enumerate(checked):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}) (e.g. {bad[:5]}): tokenise with "
                             f"the target's tokenizer")
    return checked


def _run(target: TargetRunner, drafter: Optional[Drafter], prompts: list[list[int]], k: int, max_new_tokens: int,
         stop_ids: frozenset, batch_size: Optional[int], desc: str, progress: bool):
    stats = AcceptanceStats(k, num_prompts=len(prompts))
    size = batch_size or len(prompts)
    bar = tqdm(total=len(prompts) * max_new_tokens, desc=desc, unit="tok", mininterval=1.0, disable=not progress)
    outputs: list[list[int]] = []
    start = _clock(target.device)
    try:
        with target.decoding():
            for first in range(0, len(prompts), size):
                outputs += _decode_batch(target, drafter, prompts[first:first + size], first, k, max_new_tokens,
                                         stop_ids, stats, bar)
    finally:
        bar.close()
    return outputs, stats, _clock(target.device) - start


def greedy_decode(target: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  stop_token_ids: Sequence[int] = (), batch_size: Optional[int] = None,
                  progress: bool = False) -> list[list[int]]:
    """Plain greedy decoding (one target forward per token): the reference speculative decoding must equal."""
    runner = as_target_runner(target)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    checked = _check_prompts(prompts, runner.vocab_size)
    outputs, _, _ = _run(runner, None, checked, 0, max_new_tokens, frozenset(stop_token_ids), batch_size,
                         "greedy", progress)
    return outputs


@dataclass
class SpecDecodeResult:
    k: int
    outputs: list[list[int]]  # generated ids per prompt (prompt excluded)
    greedy_outputs: Optional[list[list[int]]]  # plain greedy decoding, when checked
    stats: AcceptanceStats
    draft_params: Optional[int]  # None for drafters that do not report num_parameters() (forced)
    target_params: int
    spec_s: float
    greedy_s: Optional[float]
    draft_forwards: Optional[int] = None  # draft forwards per round (None: k, one per token of a chain)
    # Per prompt that differs from greedy: the target's logit margin between the two tokens at the first
    # difference (divergence_margins); a near-tie is below NEAR_TIE.
    greedy_margins: dict[int, float] = field(default_factory=dict)

    @property
    def tau(self) -> float:
        return self.stats.tau

    @property
    def accept_rates(self) -> list[float]:
        return self.stats.accept_rates

    def by_answer_position(self, span: int) -> dict[str, AcceptanceCounts]:
        """Acceptance of the rounds grouped by where in the answer they start, `span` tokens a group."""
        return self.stats.by_answer_position(span)

    def by_label(self, labels: Sequence[Hashable]) -> dict[Hashable, AcceptanceCounts]:
        """Acceptance per group of prompts (labels[i]: prompt i's group, e.g. its category), from the
        same decoding: the groups' counts sum to the pooled ones exactly."""
        return self.stats.by_label(labels)

    @property
    def mismatched_prompts(self) -> list[int]:
        if self.greedy_outputs is None:
            return []
        return [i for i, (a, b) in enumerate(zip(self.outputs, self.greedy_outputs)) if a != b]

    @property
    def matches_greedy(self) -> Optional[bool]:
        return None if self.greedy_outputs is None else not self.mismatched_prompts

    @property
    def speedup_params(self) -> Optional[float]:
        """tau / (1 + f * c), c = draft / target parameters a token's forward multiplies by, f = draft
        forwards per round (k for a chain; a drafter proposing all k in one forward says 1)."""
        if self.draft_params is None:
            return None
        forwards = self.k if self.draft_forwards is None else self.draft_forwards
        return self.tau / (1.0 + forwards * self.draft_params / self.target_params)

    @property
    def speedup_measured(self) -> float:
        """tau / (1 + k * c), c = measured time of one draft forward / one verify forward."""
        return self.tau / (1.0 + self.stats.draft_s / max(self.stats.verify_s, 1e-12))

    @property
    def wall_speedup(self) -> Optional[float]:
        return None if self.greedy_s is None else self.greedy_s / self.spec_s

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no token lists)."""
        return {"k": self.k, "tau": self.tau, "accept_rates": self.accept_rates,
                "speedup_params": self.speedup_params, "draft_forwards": self.draft_forwards or self.k,
                "speedup_measured": self.speedup_measured,
                "wall_speedup": self.wall_speedup, "matches_greedy": self.matches_greedy,
                "mismatched_prompts": self.mismatched_prompts, "greedy_margins": self.greedy_margins,
                "max_greedy_margin": max(self.greedy_margins.values(), default=None),
                "verify_rows": self.stats.verify_rows,
                "rounds": self.stats.rounds, "tokens": sum(len(o) for o in self.outputs),
                "spec_s": self.spec_s, "greedy_s": self.greedy_s, "draft_s": self.stats.draft_s,
                "verify_s": self.stats.verify_s}


# Logits (float32, from a bf16 or fp32 forward) closer than this are a near-tie: a k+1-token verify and a
# one-token greedy step round differently and may pick either token. A wider margin at a difference is
# no rounding: the speculative output left greedy decoding for a reason to look for.
NEAR_TIE = 1.0


def divergence_margins(target: TargetRunner, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                       greedy: Sequence[Sequence[int]]) -> dict[int, float]:
    """For each prompt whose output differs from its greedy output: logit(greedy's token) - logit(the
    output's token) at the first difference, from one plain forward over the prompt and the common prefix.
    A difference where one output merely stops earlier has no token pair and is left out."""
    margins = {}
    with target.decoding():  # as the decoding itself ran: no autograd, an attention that takes the mask
        for i, (prompt, out, ref) in enumerate(zip(prompts, outputs, greedy)):
            at = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)
            if at is None:
                continue
            ids = torch.tensor([list(prompt) + list(ref[:at])], dtype=torch.long, device=target.device)
            width = ids.shape[1]
            visible = visible_keys(torch.ones(1, width, dtype=torch.bool, device=target.device), width)
            logits, _ = target.last_logits(ids, torch.arange(width, device=target.device)[None], visible, None)
            margins[i] = float(logits[0, ref[at]] - logits[0, out[at]])
    return margins


def speculative_decode(target: Any, draft: Optional[Drafter], prompts: Sequence[Sequence[int]], k: int,
                       max_new_tokens: int, stop_token_ids: Sequence[int] = (), *, forced: Optional[str] = None,
                       check_greedy: bool = True, batch_size: Optional[int] = None,
                       progress: bool = True) -> SpecDecodeResult:
    """Greedy speculative decoding of `prompts` (token id lists) with k-token drafts.

    target: TargetRunner or transformers causal LM. draft: a Drafter on the target's device (a family's
    model wrapped by its strategy: get_strategy(name).drafter(model)). forced="oracle"|"wrong" replaces
    the draft by proposals from the target's own greedy continuation (tests: tau = k+1 and tau = 1).
    check_greedy also runs plain greedy decoding and compares (result.matches_greedy).
    """
    runner = as_target_runner(target)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"draft tokens k={k!r} must be an int >= 1 (eval.draft_tokens)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (eval.max_new_tokens)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 or None (all prompts at once)")
    if forced is not None and forced not in FORCED_MODES:
        raise ValueError(f"forced={forced!r}: use one of {list(FORCED_MODES)} or None (the draft)")
    checked = _check_prompts(prompts, runner.vocab_size)
    stop_ids = frozenset(int(t) for t in stop_token_ids)
    greedy, greedy_s = None, None
    if forced is not None:
        reference, _, _ = _run(runner, None, checked, 0, max_new_tokens + k, frozenset(), batch_size, "reference", False)
        greedy = [[] for _ in reference]
        for out, ref in zip(greedy, reference):
            _extend(out, ref, max_new_tokens, stop_ids)
        drafter: Drafter = ForcedDrafter(reference, forced, runner.vocab_size)
        draft_params = forwards = None
    else:
        if not callable(getattr(draft, "propose", None)):
            # Decoding knows no family: wrapping a model in its drafter is the family's business.
            raise TypeError(f"draft is {type(draft).__name__}, not a Drafter: wrap a draft model with its family's "
                            f"get_strategy(name).drafter(model) (lib/drafts/base.py), or pass forced='oracle'|'wrong'")
        drafter = draft
        if callable(getattr(drafter, "check_target", None)):
            drafter.check_target(runner)
        draft_params = drafter.num_parameters() if callable(getattr(drafter, "num_parameters", None)) else None
        forwards = drafter.draft_forwards(k) if callable(getattr(drafter, "draft_forwards", None)) else None
        if check_greedy:
            greedy, _, greedy_s = _run(runner, None, checked, 0, max_new_tokens, stop_ids, batch_size, "greedy", progress)
    outputs, stats, spec_s = _run(runner, drafter, checked, k, max_new_tokens, stop_ids, batch_size,
                                  f"speculative k={k}", progress)
    margins = divergence_margins(runner, checked, outputs, greedy) if greedy is not None and forced is None else {}
    return SpecDecodeResult(k, outputs, greedy, stats, draft_params, runner.cost_parameters(), spec_s, greedy_s,
                            forwards, margins)


def evaluate_online(target: Any, draft: Drafter, prompts: Sequence[Any], draft_tokens: Sequence[int],
                    max_new_tokens: int, step: Optional[int] = None, stop_token_ids: Sequence[int] = (),
                    lm_head: Optional[torch.Tensor] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
    """One metrics row for the engine to call between batches: accept_len (first k), accept_len_k{K}
    per k, accept_rate_{i} (0-based draft position, from the largest k), step, eval_s.

    target: TargetRunner, causal LM, or engine backend with lm_head. prompts: EvalPrompt or id lists.
    Greedy checking is skipped: the output equals greedy decoding by construction.
    """
    if not draft_tokens:
        raise ValueError("draft_tokens is empty: set eval.draft_tokens, e.g. [3, 7]")
    runner = as_target_runner(target, lm_head)
    ids = [getattr(p, "prompt_ids", p) for p in prompts]
    start = time.perf_counter()
    row: dict[str, Any] = {"step": step}
    results = {}
    for k in draft_tokens:
        results[k] = speculative_decode(runner, draft, ids, int(k), max_new_tokens, stop_token_ids,
                                        check_greedy=False, batch_size=batch_size, progress=False)
        row[f"accept_len_k{k}"] = results[k].tau
    row["accept_len"] = results[draft_tokens[0]].tau
    for i, rate in enumerate(results[max(draft_tokens)].accept_rates):
        row[f"accept_rate_{i}"] = rate
    row["eval_s"] = time.perf_counter() - start
    return row
