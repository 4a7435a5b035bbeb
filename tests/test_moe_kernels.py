"""The grouped MoE path's small kernels and routers (lib/engine/moe_kernels.py, lib/engine/moe_router.py).

On CPU the routers' formulas are held equal to transformers' own router modules (the top-k falls back to
torch.topk there); on a GPU the Triton top-k and SwiGLU kernels are held to torch's results.
"""
from __future__ import annotations

import pytest
import torch

from lib.engine.moe_router import install_fast_routers, routers
from tests.test_moe import FAMILIES, build

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_routers_route_exactly_as_transformers(name, dtype):
    """Logits, weights and chosen experts of every router equal transformers' forward bit for bit."""
    model = build(name).to(dtype)
    layers = model.model.layers
    found = routers(layers)
    assert len(found) == len(layers)  # one router per MoE layer of the tiny targets
    g = torch.Generator().manual_seed(1)
    x = torch.randn(57, model.config.hidden_size, generator=g).to(dtype)
    with torch.no_grad():
        want = [r(x) for r in found]
        assert install_fast_routers(layers) == len(layers)
        assert all(type(r).__name__.startswith("Fast") for r in found)
        assert len({type(r) for r in found}) == 1  # one class for all layers: one compiled graph
        got = [r(x) for r in found]
    for w, o in zip(want, got):
        assert len(w) == len(o) == 3
        for a, b in zip(w, o):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert install_fast_routers(layers) == len(layers)  # installing twice keeps the classes


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    return torch.device("cuda")


def _distinct(rows: int, width: int, dtype, device, generator) -> torch.Tensor:
    """Rows of distinct values in the dtype (no ties: torch leaves the order of equal values open)."""
    step = 1.0 / 64 if dtype == torch.bfloat16 else 1e-3  # distinct in bf16 for widths up to ~256
    keys = torch.rand(rows, width, device=device, generator=generator).argsort(dim=-1).to(torch.float32)
    return ((keys - width / 2) * step).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,k,dtype", [
    (8192, 128, 8, torch.float32),  # Qwen3-30B-A3B / 235B-A22B routing
    (333, 32, 4, torch.bfloat16),  # gpt-oss-20b: top-4 of 32 biased bf16 logits
    (17, 60, 6, torch.float32), (5, 7, 7, torch.float32), (1, 200, 1, torch.bfloat16),
])
def test_gpu_topk_kernel_equals_torch_topk(rows, width, k, dtype):
    from lib.engine.moe_kernels import _TOPK_MAX_WIDTH, topk_rows

    device = _gpu()
    assert width <= _TOPK_MAX_WIDTH
    g = torch.Generator(device=device).manual_seed(rows)
    x = _distinct(rows, width, dtype, device, g)
    want_v, want_i = torch.topk(x, k, dim=-1)
    for values, indices in (topk_rows(x, k), torch.compile(topk_rows, fullgraph=True, dynamic=True)(x, k)):
        assert values.dtype == dtype and indices.dtype == torch.int64
        assert torch.equal(values, want_v) and torch.equal(indices, want_i)


@pytest.mark.gpu
def test_gpu_topk_kernel_breaks_ties_to_the_lowest_expert_and_ranks_nan_first():
    from lib.engine.moe_kernels import topk_rows

    device = _gpu()
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, float("nan"), -1.0, float("-inf"), float("-inf")]],
                     device=device)
    values, indices = topk_rows(x, 4)
    assert indices.tolist() == [[1, 2, 4, 3], [1, 0, 2, 3]]
    assert values[0].tolist() == [3.0, 3.0, 3.0, 2.0]
    assert values[1, 0].isnan() and values[1, 1:].tolist() == [0.0, -1.0, float("-inf")]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,features,dtype", [(65536, 768, torch.bfloat16), (333, 100, torch.float32),
                                                 (1, 1536, torch.bfloat16)])
def test_gpu_swiglu_kernel_is_within_one_rounding_of_fp32(rows, features, dtype):
    from lib.engine.moe_kernels import silu_mul_scaled, silu_mul_scaled_reference

    device = _gpu()
    g = torch.Generator(device=device).manual_seed(features)
    gate_up = (2 * torch.randn(rows, 2 * features, device=device, generator=g)).to(dtype)
    weight = torch.rand(rows, device=device, generator=g)
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = (gate.double() * torch.sigmoid(gate.double()) * up.double() * weight.double()[:, None])
    ours = silu_mul_scaled(gate_up, weight)
    compiled = torch.compile(silu_mul_scaled, fullgraph=True, dynamic=True)(gate_up, weight)
    assert ours.dtype == dtype and ours.shape == (rows, features)
    torch.testing.assert_close(ours, compiled, rtol=0, atol=0)
    # One rounding to the dtype plus fp32 arithmetic's few ulps, like the torch formula's own error.
    bound = exact.abs() * torch.finfo(dtype).eps + 1e-6
    reference_err = (silu_mul_scaled_reference(gate_up, weight).double() - exact).abs()
    assert ((ours.double() - exact).abs() <= bound).all()
    assert (reference_err <= bound).all()


@pytest.mark.gpu
# The second shape: widths that are not multiples of the tiles (104 = 13 x 8 keeps torch._grouped_mm's
# 16-byte strides), ragged tiles and experts without rows.
@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [(1000, 2048, 768, 128, 8), (37, 104, 56, 5, 2)])
@pytest.mark.parametrize("small_tails", [False, True])
def test_gpu_fused_first_projection_equals_the_three_kernels(tokens, hidden, inter, experts, k, small_tails):
    """lib/engine/moe_fused.py against gather + torch._grouped_mm + the SwiGLU kernel: the same rows within
    bf16 rounding (the fused kernel applies SwiGLU to the fp32 accumulators, not to bf16-rounded gate and
    up)."""
    from lib.engine.moe_fused import gathered_swiglu
    from lib.engine.moe_kernels import gather_rows, silu_mul_scaled

    device = _gpu()
    g = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, generator=g).bfloat16()
    w = (torch.randn(experts, 2 * inter, hidden, device=device, generator=g) * hidden ** -0.5).bfloat16()
    chosen = torch.randint(0, max(experts - 2, 1), (tokens * k,), device=device, generator=g)  # the last experts empty
    order = torch.argsort(chosen, stable=True)
    ends = torch.searchsorted(chosen[order], torch.arange(1, experts + 1, device=device), out_int32=True)
    weight = torch.rand(tokens * k, device=device, generator=g)
    token = order // k
    want = silu_mul_scaled(torch._grouped_mm(gather_rows(x, token), w.transpose(1, 2), offs=ends), weight)
    exact = torch.cat([torch.nn.functional.silu(x[token[s:e]].float() @ w[i, :inter].float().T)
                       * (x[token[s:e]].float() @ w[i, inter:].float().T)
                       for i, (s, e) in enumerate(zip([0] + ends[:-1].tolist(), ends.tolist()))]) * weight[:, None]
    class Projection(torch.nn.Module):  # the weights as parameters, as the compiled decoder layer holds them
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w, requires_grad=False)

        def forward(self, x, token, weight, ends):
            return gathered_swiglu(x, self.w, token, weight, ends, small_tails=small_tails)

    for run in (Projection(), torch.compile(Projection(), fullgraph=True, dynamic=True)):
        got = run(x, token, weight, ends)
        assert got.shape == (tokens * k, inter) and got.dtype == torch.bfloat16
        # At least as close to the fp32 product as the three-kernel path (which rounds gate and up first).
        fused_err = (got.float() - exact).abs().mean()
        assert fused_err <= 1.05 * (want.float() - exact).abs().mean() + 1e-6
        assert (got.float() - exact).abs().max() <= 2e-2 * exact.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_expert,hidden,inter", [
    ((700, 513, 1, 0, 129, 64), 2048, 768),  # full tiles, tails of 1, 64 and 1 rows, an empty expert
    ((37, 0, 20), 104, 56),  # widths that are not multiples of the tiles
])
@pytest.mark.parametrize("small_tails", [False, True])
def test_gpu_grouped_down_projection_equals_torch_grouped_mm(rows_per_expert, hidden, inter, small_tails):
    """lib/engine/moe_fused.grouped_down against torch._grouped_mm on the same rows: as close to the fp32
    product (both accumulate in fp32 and round once), eager and compiled."""
    from lib.engine.moe_fused import grouped_down

    device = _gpu()
    g = torch.Generator(device=device).manual_seed(len(rows_per_expert))
    experts = len(rows_per_expert)
    ends = torch.tensor(rows_per_expert, device=device).cumsum(0).to(torch.int32)
    h = torch.randn(int(ends[-1]), inter, device=device, generator=g).bfloat16()
    down = (torch.randn(experts, hidden, inter, device=device, generator=g) * inter ** -0.5).bfloat16()
    want = torch._grouped_mm(h, down.transpose(1, 2), offs=ends)
    starts = [0] + ends[:-1].tolist()
    exact = torch.cat([h[s:e].float() @ down[i].float().T for i, (s, e) in enumerate(zip(starts, ends.tolist()))])

    class Down(torch.nn.Module):  # the weights as parameters, as the compiled decoder layer holds them
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(down, requires_grad=False)

        def forward(self, h, ends):
            return grouped_down(h, self.w, ends, small_tails=small_tails)

    for run in (Down(), torch.compile(Down(), fullgraph=True, dynamic=True)):
        got = run(h, ends)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert (got.float() - exact).abs().mean() <= 1.05 * (want.float() - exact).abs().mean() + 1e-6
        assert (got.float() - exact).abs().max() <= 1e-2 * exact.abs().max()
