"""Compile the engine's Triton kernels for sm_90 on a machine without a GPU, and report what they became.

Device time is scarce; a kernel that does not compile, or compiles without its software pipeline, is
better found here. Triton compiles ahead of time for a named target with its bundled ptxas, so this
needs only a Triton wheel (the CPU venv has none: install one to a scratch folder, e.g.
`pip install --no-deps --target /tmp/tri triton==3.6.0`, then `PYTHONPATH=/tmp/tri`):

    PYTHONPATH=/tmp/tri python tools/triton_sm90_check.py

Each line: the kernel and its constants, shared memory, cp.async count (the pipelined loads), wgmma
count, and registers and spilled stack bytes per thread (cuobjdump). Other tiles than the engine's:
--first-projection-tile / --down-projection-tile BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES. Pointer and width
arguments are marked 16-divisible, as Triton's launcher marks them for aligned tensors; without that hint
loads stay scalar and no kernel pipelines, so the report would say nothing about the real launch.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    raise SystemExit("triton is not importable: install a wheel to a scratch folder and put it on PYTHONPATH "
                     "(see this file's docstring)") from None

from lib.engine import moe_fused, qk_norm_rope  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def registers(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    # A stack frame is registers spilled to local memory: the tile does not fit the register file.
    return f"{regs.group(1) if regs else '?'} stack {stack.group(1) if stack else '?'}"


def compile_and_report(name: str, fn, signature: dict, constants: dict, divisible: list[int], num_warps: int,
                       num_stages: int) -> None:
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    shown = ",".join(f"{k}={v}" for k, v in constants.items())
    copies = len(re.findall(r"cp[.]async[.]", ptx))
    print(f"{name:<16} {shown:<90} shared {kernel.metadata.shared:>7}  cp.async {copies:>4}"
          f"  wgmma {ptx.count('wgmma.mma_async'):>3}  regs {registers(kernel.asm['cubin'])}", flush=True)


def parse_tile(text: str) -> "moe_fused.Tile":
    values = [int(v) for v in text.split(",")]
    if len(values) != 5:
        raise argparse.ArgumentTypeError(f"{text!r}: give BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES, e.g. 128,128,64,8,3")
    return moe_fused.Tile(*values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first-projection-tile", type=parse_tile, default=moe_fused.FIRST_PROJECTION_TILE,
                   help="BLOCK_M,BLOCK_N,BLOCK_K,WARPS,STAGES for gathered_swiglu (default: the engine's)")
    p.add_argument("--down-projection-tile", type=parse_tile, default=moe_fused.DOWN_PROJECTION_TILE,
                   help="the same for grouped_down")
    args = p.parse_args()
    print(f"triton {triton.__version__}, target sm_90")
    grouped = {"x_ptr": "*bf16", "w_ptr": "*bf16", "row_index_ptr": "*i64", "weight_ptr": "*fp32", "ends_ptr": "*i32",
               "tile_ends_ptr": "*i32", "expert_of_tile_ptr": "*i32", "out_ptr": "*bf16", "K": "i32", "N": "i32",
               "E": "i32", "NUM_N": "i32"}
    constexprs = ["GATHER", "GATED", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EVEN", "SMALL_TAILS"]
    for gated in (True, False):
        for tails in (False, True):
            signature = dict(grouped, **{c: "constexpr" for c in constexprs})
            if not gated:  # grouped_down passes the activations in the unused index and weight slots
                signature.update(row_index_ptr="*bf16", weight_ptr="*bf16")
            tile = args.first_projection_tile if gated else args.down_projection_tile
            constants = {"GATHER": gated, "GATED": gated, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n,
                         "BLOCK_K": tile.block_k, "EVEN": True, "SMALL_TAILS": tails}
            compile_and_report("gathered_swiglu" if gated else "grouped_down", moe_fused._grouped_kernel, signature,
                               constants, list(range(11)), num_warps=tile.num_warps, num_stages=tile.num_stages)
    qk = {"q_ptr": "*bf16", "k_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cos_ptr": "*bf16",
          "sin_ptr": "*bf16", "q_out_ptr": "*bf16", "k_out_ptr": "*bf16", "tokens": "i32", "q_stride": "i32",
          "k_stride": "i32", "cos_stride": "i32", "sin_stride": "i32", "q_blocks": "i32"}
    qk_constants = {"EPS": 1e-6, "Q_HEADS": 32, "K_HEADS": 4, "D": 128, "HALF": 64, "BLOCK_ROWS": 32}
    compile_and_report("qk_norm_rope", qk_norm_rope._qk_norm_rope_kernel,
                       dict(qk, **{c: "constexpr" for c in qk_constants}), qk_constants,
                       list(range(8)) + [9, 10, 11, 12], num_warps=4, num_stages=1)


if __name__ == "__main__":
    main()
