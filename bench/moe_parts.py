"""The grouped MoE block's parts, timed alone at one MoE layer of a target shape (GPU).

    python bench/moe_parts.py --shape qwen3-30b-a3b --out moe_parts.json

Each row times a part the old way and the way lib/engine/moe.py runs it now, in the same process:
the router (transformers' forward vs the kernel top-k), the expert sort (4-byte vs 1-byte keys), the
attention's q/k norm + rope (Inductor vs lib/engine/qk_norm_rope.py), the SwiGLU (Inductor's fused
kernel vs lib/engine/moe_kernels.py's), and the first projection (gather + torch._grouped_mm + SwiGLU
kernel vs lib/engine/moe_fused.py at several tile shapes), the down projection (torch._grouped_mm vs
lib/engine/moe_fused.grouped_down); then the whole MoE block compiled, and with
--autotune also under Inductor's max_autotune_gemm. GPU times are CUDA-graph replays (no host launch
time). Random bf16 weights and hidden states; routing of a random router is near uniform.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.engine import SHAPES  # noqa: E402
from lib.engine.moe import install_moe_impl  # noqa: E402
from lib.engine.moe_fused import DOWN_PROJECTION_TILE, FIRST_PROJECTION_TILE, Tile, gathered_swiglu, grouped_down  # noqa: E402,E501
from lib.engine.moe_kernels import silu_mul_scaled, silu_mul_scaled_reference  # noqa: E402
from lib.engine.moe_router import install_fast_routers  # noqa: E402


def cuda_ms(fn, iters: int = 30, warmup: int = 5) -> float:
    """GPU time per call: the calls replayed from a CUDA graph, so the host's launch time is left out
    (the parts are small kernels; timed from the host they measure Python, not the GPU)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def tile_label(tile: Tile, small_tails: bool) -> str:
    return (f"{tile.block_m}x{tile.block_n}x{tile.block_k}/{tile.num_warps}w{tile.num_stages}s"
            + ("+tails" if small_tails else ""))


def one_layer_model(shape: dict):
    cfg = dict(shape, num_hidden_layers=1)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=[s for s in SHAPES if "a3b" in s or "oss" in s])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--autotune", action="store_true", help="also the MoE block under max_autotune_gemm (~1 min)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = one_layer_model(SHAPES[args.shape])
    block = model.model.layers[0].mlp
    router = getattr(block, "gate", None) or block.router
    x = torch.randn(args.tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    rows = []

    def row(part: str, old: float, new: float, note: str = "") -> None:
        rows.append({"part": part, "old_ms": old, "new_ms": new, "ratio": old / new, "note": note})
        print(f"{part:<28}{old:>9.3f}{new:>9.3f}{old / new:>8.2f}x  {note}", flush=True)

    print(f"{args.shape}, {args.tokens} tokens, one MoE layer on {torch.cuda.get_device_name()}")
    print(f"{'part (ms per layer)':<28}{'old':>9}{'new':>9}{'ratio':>9}")
    with torch.inference_mode():
        old_router = torch.compile(router.forward, dynamic=True)
        t_old = cuda_ms(lambda: old_router(x))
        install_fast_routers(model.model.layers)
        torch._dynamo.reset()
        new_router = torch.compile(router.forward, dynamic=True)
        row("router (softmax + top-k)", t_old, cuda_ms(lambda: new_router(x)), "compiled, transformers' vs kernel top-k")

        _, _, experts = router(x)
        flat = experts.reshape(-1)
        experts_count = block.experts.gate_up_proj.shape[0]
        row("expert sort (argsort)", cuda_ms(lambda: torch.argsort(flat.to(torch.int32), stable=True)),
            cuda_ms(lambda: torch.argsort(flat.to(torch.uint8), stable=True)), "4-byte vs 1-byte keys")

        # Attention's q/k RMSNorm + rope (Qwen3 families): Inductor's kernels for the torch formula vs one
        # Triton kernel.
        if hasattr(model.model.layers[0].self_attn, "q_norm"):
            from lib.engine.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

            attn = model.model.layers[0].self_attn
            d = attn.head_dim
            q = torch.randn(1, args.tokens, attn.q_proj.out_features, device="cuda", dtype=x.dtype)
            kk = torch.randn(1, args.tokens, attn.k_proj.out_features, device="cuda", dtype=x.dtype)
            angle = torch.arange(args.tokens, device="cuda")[:, None] * torch.rand(d, device="cuda")[None, :]
            cos, sin = angle.cos()[None].to(x.dtype), angle.sin()[None].to(x.dtype)
            norm_args = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon, cos, sin)
            inductor_qk = torch.compile(qk_norm_rope_reference, dynamic=True)
            got, want = qk_norm_rope(q, kk, *norm_args), inductor_qk(q, kk, *norm_args)
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, want))
            row("q/k norm + rope", cuda_ms(lambda: inductor_qk(q, kk, *norm_args)),
                cuda_ms(lambda: qk_norm_rope(q, kk, *norm_args)),
                f"Inductor vs Triton kernel (max diff {err:.2g} of max)")

        inter = block.experts.gate_up_proj.shape[1] // 2
        gate_up = torch.randn(flat.numel(), 2 * inter, device="cuda", dtype=torch.bfloat16)
        weight = torch.rand(flat.numel(), device="cuda")
        inductor_swiglu = torch.compile(silu_mul_scaled_reference, dynamic=True)
        row("SwiGLU x weight", cuda_ms(lambda: inductor_swiglu(gate_up, weight)),
            cuda_ms(lambda: silu_mul_scaled(gate_up, weight)), "Inductor vs Triton kernel")

        # The first projection: gather + torch._grouped_mm + SwiGLU kernel (the grouped path) against one
        # fused Triton kernel (lib/engine/moe_fused.py) at several tile shapes.
        from lib.engine.moe_kernels import gather_rows

        k = experts.shape[-1]
        order = torch.argsort(flat.to(torch.uint8), stable=True)
        token = order // k
        sorted_expert = flat[order]
        ends = torch.searchsorted(sorted_expert, torch.arange(1, experts_count + 1, device="cuda", dtype=flat.dtype),
                                  out_int32=True)
        w_gate_up = block.experts.gate_up_proj

        def separate():
            gu = torch._grouped_mm(gather_rows(x, token), w_gate_up.transpose(1, 2), offs=ends)
            return silu_mul_scaled(gu, weight)

        want = separate().float()
        t_old = cuda_ms(separate)
        # "+tails": an expert's last tile at a quarter or half of the rows when they fit (small_tails).
        for tile, tails in ((Tile(128, 128, 64, 8, 4), False), (Tile(128, 128, 64, 8, 3), False),
                            (FIRST_PROJECTION_TILE, True), (Tile(128, 128, 64, 8, 2), True),
                            (Tile(128, 128, 32, 8, 4), True)):
            label = tile_label(tile, tails)
            try:
                def fused(tile=tile, tails=tails):
                    return gathered_swiglu(x, w_gate_up, token, weight, ends, tile, tails)

                err = ((fused().float() - want).abs().max() / want.abs().max()).item()
                row(f"gather+gate_up+SwiGLU {label}", t_old, cuda_ms(fused),
                    f"3 kernels vs fused (max diff {err:.2g} of max)")
            except Exception as e:  # noqa: BLE001 - a tile shape that does not fit the GPU's shared memory
                print(f"fused {label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

        # The down projection: torch._grouped_mm vs lib/engine/moe_fused.grouped_down with small last tiles.

        h_rows = torch.randn(flat.numel(), inter, device="cuda", dtype=x.dtype)
        w_down = block.experts.down_proj
        want_down = torch._grouped_mm(h_rows, w_down.transpose(1, 2), offs=ends).float()
        t_old = cuda_ms(lambda: torch._grouped_mm(h_rows, w_down.transpose(1, 2), offs=ends))
        # Offline sm_90 compiles (tools/triton_sm90_check.py): 128x256x64 at 3 stages holds 144 KB of shared memory.
        for tile, tails in ((DOWN_PROJECTION_TILE, False), (DOWN_PROJECTION_TILE, True),
                            (Tile(128, 256, 64, 8, 4), True), (Tile(256, 128, 64, 8, 3), True),
                            (Tile(128, 256, 32, 8, 4), True)):
            label = tile_label(tile, tails)
            try:
                def down(tile=tile, tails=tails):
                    return grouped_down(h_rows, w_down, ends, tile, tails)

                err = ((down().float() - want_down).abs().max() / want_down.abs().max()).item()
                row(f"down projection {label}", t_old, cuda_ms(down),
                    f"torch._grouped_mm vs Triton (max diff {err:.2g} of max)")
            except Exception as e:  # noqa: BLE001 - a tile shape that does not fit the GPU's shared memory
                print(f"down {label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)

        install_moe_impl(model.model.layers, "grouped")
        torch._dynamo.reset()
        default_block = torch.compile(block.forward, dynamic=True)
        t_default = cuda_ms(lambda: default_block(x[None]))
        if args.autotune:
            torch._dynamo.reset()
            import torch._inductor.config as inductor_config

            with inductor_config.patch(max_autotune_gemm=True):
                tuned_block = torch.compile(block.forward, dynamic=True)
                t_tuned = cuda_ms(lambda: tuned_block(x[None]))
            row("MoE block (compiled)", t_default, t_tuned, "Inductor default vs max_autotune_gemm")
        else:
            print(f"MoE block (compiled): {t_default:.3f} ms", flush=True)
            rows.append({"part": "MoE block (compiled)", "new_ms": t_default})
        # Host time per block call, launches included (what a launch-bound capture pays per layer).
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            default_block(x[None])
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        print(f"MoE block host time per call (no sync): {host_ms:.3f} ms", flush=True)
        rows.append({"part": "MoE block host ms per call", "new_ms": host_ms})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "tokens": args.tokens, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
