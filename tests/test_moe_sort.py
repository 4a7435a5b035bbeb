"""The routed rows grouped by expert (lib/engine/moe_sort.py).

On CPU the torch path is held to a plain Python stable sort; on a GPU the counting-sort kernels are held
to the torch path, output by output and exactly (positions are integers; no tolerance applies).
"""
from __future__ import annotations

import pytest
import torch

from lib.engine.moe_sort import ExpertGroups, group_by_expert, group_by_expert_reference

pytestmark = pytest.mark.unit


def _routing(tokens: int, k: int, experts: int, device, seed: int, skew: bool = False):
    """[tokens, k] distinct experts per token (as a router's top-k gives) and their weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(tokens, experts, device=device, generator=g)
    if skew:  # most rows on a few experts, many experts empty: the ragged case
        scores = scores ** 8 * torch.linspace(1, 50, experts, device=device)
    index = scores.topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, device=device, generator=g).to(torch.bfloat16)
    return index, weights


def _check_against_python_sort(groups: ExpertGroups, index: torch.Tensor, weights: torch.Tensor, experts: int):
    flat, k = index.reshape(-1).tolist(), index.shape[-1]
    want_order = sorted(range(len(flat)), key=lambda j: (flat[j], j))
    assert groups.order.tolist() == want_order
    assert groups.inverse[groups.order].tolist() == list(range(len(flat)))
    assert groups.ends.dtype == torch.int32
    assert groups.ends.tolist() == [sum(1 for e in flat if e <= x) for x in range(experts)]
    assert groups.token.tolist() == [j // k for j in want_order]
    assert groups.weight.dtype == torch.float32
    assert groups.weight.tolist() == [float(weights.reshape(-1)[j]) for j in want_order]


@pytest.mark.parametrize("tokens,k,experts,skew", [(50, 4, 16, False), (33, 2, 5, True), (1, 1, 3, False)])
def test_rows_grouped_by_expert_in_token_order(tokens, k, experts, skew):
    """order is the stable sort by expert, inverse its inverse, ends the group ends, token and weight
    each sorted row's own; on CPU this is the torch path."""
    index, weights = _routing(tokens, k, experts, torch.device("cpu"), seed=tokens, skew=skew)
    _check_against_python_sort(group_by_expert(index, weights, experts), index, weights, experts)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,k,experts,skew", [
    (8192, 8, 128, False),  # Qwen3-30B-A3B: 256 blocks of 256 keys, one scan chunk
    (8192, 8, 128, True),
    (20000, 8, 128, False),  # more blocks than one scan chunk holds
    (3001, 4, 32, False),  # gpt-oss-20b's 32 experts, a partial last block
    (1000, 8, 512, True),  # wider one-hot: smaller blocks
    (257, 2, 2048, False),  # the widest the kernels take
    (1, 1, 3, False),
])
def test_gpu_counting_sort_equals_the_torch_path(tokens, k, experts, skew):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    index, weights = _routing(tokens, k, experts, torch.device("cuda"), seed=tokens + experts, skew=skew)
    want = group_by_expert_reference(index, weights, experts)
    for run in (group_by_expert, torch.compile(group_by_expert, fullgraph=True, dynamic=True)):
        got = run(index, weights, experts)
        for name, a, b in zip(ExpertGroups._fields, got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert torch.equal(a, b), name
    if tokens < 200:
        _check_against_python_sort(group_by_expert(index, weights, experts), index.cpu(), weights.cpu(), experts)
