"""Engine capture throughput: the hf backend's packed paths against plain per-sequence HF forwards.

    python bench/engine.py --out engine.json                      # Qwen3-8B shape on one GPU
    python bench/engine.py --shape tiny --device cpu --steps 2    # smoke test
    python bench/engine.py --shape qwen3-30b-a3b --moe-impl grouped,hf   # MoE: engine's grouped vs transformers'
    python bench/engine.py --shape qwen3-30b-a3b --paths varlen+compile --varlen-kernel flash,cudnn

Random bf16 weights of the target's shape; every batch holds exactly --tokens tokens made of
sequences of --min-len..--max-len tokens. FLOPs count 2 * (matmul parameters) per token, embeddings
excluded and no lm_head (the engine never runs it), plus causal attention 2 * n^2 * heads * head_dim
per layer per sequence. MoE shapes count ACTIVE parameters (routed experts + router,
bench/flops.py mlp_matmul_params) and gpt-oss's sliding-window layers only their window. MFU is
against the H100/H200 dense bf16 peak (989 TFLOP/s) and against the ~790 TFLOP/s a large bf16 matmul
reaches on the lent machines.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import sys
import time

import torch
import transformers
import yaml
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.data.batch import PackedBatch  # noqa: E402
from lib.config import EngineConfig, TargetConfig  # noqa: E402
from lib.engine import moe, qk_norm_rope  # noqa: E402
from lib.engine.hf import AuxWriter, HFBackend  # noqa: E402
from lib.engine.moe_fused import Tile  # noqa: E402
from bench.flops import _window_pairs, mlp_matmul_params  # noqa: E402
from bench.trainer import write_profile  # noqa: E402

PEAK_TFLOPS = 989.0
MEASURED_TFLOPS = 790.0
SHAPES = {
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     max_position_embeddings=40960, tie_word_embeddings=False),
    "tiny": dict(model_type="qwen3", hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=1000,
                 max_position_embeddings=4096, tie_word_embeddings=False),
}
_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "target")
for _name in ("qwen3_30b_a3b", "gpt_oss_20b", "tiny_moe", "tiny_gpt_oss"):  # MoE shapes, as conf/target has them
    with open(os.path.join(_CONF, f"{_name}.yaml")) as _f:
        SHAPES[_name.replace("_", "-")] = yaml.safe_load(_f)["hf_config"]
# path name -> (engine.attn_impl, engine.compile); "baseline" is plain per-sequence sdpa with hooks.
PATHS = {
    "varlen": ("varlen", False),
    "varlen+compile": ("varlen", True),
    "sdpa-mask": ("sdpa", False),
    "baseline": ("sdpa", False),
}


def make_batches(count: int, tokens: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[PackedBatch]:
    """Batches of exactly `tokens` tokens; every sequence length is in [min_len, max_len]."""
    if tokens < min_len:
        raise SystemExit(f"--tokens={tokens} is below --min-len={min_len}")
    rng = random.Random(seed)
    batches = []
    for b in range(count):
        lengths, left = [], tokens
        while left > max_len:
            n = rng.randint(min_len, min(max_len, left - min_len))
            lengths.append(n)
            left -= n
        lengths.append(left)
        g = torch.Generator().manual_seed(seed + b)
        samples = [(torch.randint(0, vocab, (n,), generator=g).tolist(), [True] * n) for n in lengths]
        batches.append(PackedBatch.from_samples(samples, list(range(len(lengths)))))
    return batches


def flops_per_batch(shape: dict, batch: PackedBatch) -> float:
    cfg = dict(shape)
    hf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads, kv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    linear = 2.0 * (layers * (h * (heads + 2 * kv) * d + heads * d * h) + mlp_matmul_params(hf)) * batch.num_tokens
    types = getattr(hf, "layer_types", None) or ["full_attention"] * layers
    attention = 0.0
    for t in types:
        if t == "sliding_attention" and hf.sliding_window:
            attention += 4.0 * heads * d * _window_pairs(batch.lengths, hf.sliding_window)
        else:
            attention += sum(2.0 * n * n * heads * d for n in batch.lengths)
    return linear + attention


def baseline_capture(backend: HFBackend, writer: AuxWriter, batch: PackedBatch, out: dict) -> None:
    """What a plain HF capture does: each sequence alone, causal sdpa (flash on GPU), hooks for aux."""
    cu = batch.cu_seqlens.tolist()
    with torch.inference_mode():
        for i in range(len(cu) - 1):
            ids = batch.input_ids[cu[i]:cu[i + 1]].to(backend.device, non_blocking=True)[None]
            writer.arm(out["aux_hidden"][cu[i]:cu[i + 1]], slice(None))
            hidden = backend.model(input_ids=ids, use_cache=False).last_hidden_state
            writer.disarm()
            out["final_hidden"][cu[i]:cu[i + 1]].copy_(hidden[0])


def path_label(name: str, backend: HFBackend, kernel: str, variant: str = "") -> str:
    """path[/moe_impl][/cudnn][/variant]: the varlen kernel named when it is not the default flash."""
    label = name if backend.moe_impl is None else f"{name}/{backend.moe_impl.value}"
    label += f"/{kernel}" if PATHS[name][0] == "varlen" and kernel != "flash" else ""
    return label + (f"/{variant}" if variant else "")


# Same-process A/Bs of the grouped MoE path (--variants): each sets engine switches away from their defaults.
VARIANTS = {
    "repeat": {},  # the default path again: the run-to-run spread within one process
    "unfused": {(moe, "FUSE_FIRST_PROJECTION"): False},  # gather + grouped GEMM + SwiGLU as three kernels
    "previous": {(qk_norm_rope, "FUSED_ATTENTION"): False},  # transformers' attention forward (Inductor's q/k norm)
    "full-tails": {(moe, "FUSED_SMALL_TAILS"): False},  # the fused first projection's last tiles at full size
    "triton-down": {(moe, "TRITON_DOWN_PROJECTION"): True},  # the down projection as moe_fused.grouped_down
    "four-stages": {(moe, "FIRST_PROJECTION_TILE"): Tile(128, 128, 64, 8, 4)},  # the first projection's old shape
    "separate-residual": {(moe, "FUSED_MOE_RESIDUAL"): False},  # the layer's residual add as its own kernel
    # The MoE path of the eighth session: full tails, four stages, a separate residual add.
    "previous-moe": {(moe, "FUSED_SMALL_TAILS"): False, (moe, "FIRST_PROJECTION_TILE"): Tile(128, 128, 64, 8, 4),
                     (moe, "FUSED_MOE_RESIDUAL"): False},
}


@contextlib.contextmanager
def switched(settings: dict):
    """The module switches set for the block, restored after it."""
    before = {(module, name): getattr(module, name) for module, name in settings}
    try:
        for (module, name), value in settings.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in before.items():
            setattr(module, name, value)


def measure(name: str, args, shape: dict, batches: list[PackedBatch], device: torch.device,
            moe_impl: str = "auto", kernel: str = "flash", variant: str = "") -> dict:
    attn, compile_ = PATHS[name]
    target = TargetConfig(random_init=True, hf_config=shape, dtype=args.dtype)
    counters.clear()
    backend = HFBackend()
    t0 = time.perf_counter()
    backend.load(target, EngineConfig(token_budget=args.tokens, attn_impl=attn, compile=compile_, moe_impl=moe_impl,
                                      varlen_kernel=kernel),
                 device, None)
    load_s = time.perf_counter() - t0
    rows, width = args.tokens, backend.hidden_size
    out = {
        "aux_hidden": torch.empty(rows, len(backend.aux_layers) * width, dtype=backend.dtype, device=device),
        "final_hidden": torch.empty(rows, width, dtype=backend.dtype, device=device),
    }
    if name == "baseline":
        # A second set of hooks writing per sequence; the backend's own stay disarmed outside capture().
        writer = AuxWriter(backend.model.layers, backend.aux_layers, width)

        def run(b):
            baseline_capture(backend, writer, b, out)
    else:
        def run(b):
            backend.capture(b, out=out)
    for b in batches[: args.warmup]:
        run(b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[args.warmup:]
    start = time.perf_counter()
    for b in timed:
        run(b)
    sync()
    seconds = time.perf_counter() - start
    host_ms, gpu_ms = host_and_gpu_ms(run, timed[:3]) if device.type == "cuda" else (float("nan"), float("nan"))
    if args.profile:  # after the timing, so the figures above are unprofiled
        os.makedirs(args.profile, exist_ok=True)
        label = path_label(name, backend, kernel, variant).replace("+", "_").replace("/", "_")
        write_profile(os.path.join(args.profile, f"{label}.txt"), timed[:3], run, device.type == "cuda")
    tokens = sum(b.num_tokens for b in timed)
    flops = sum(flops_per_batch(shape, b) for b in timed)
    tflops = flops / seconds / 1e12
    result = {
        "path": path_label(name, backend, kernel, variant),
        "attn_impl": backend.attn_impl,
        "varlen_kernel": kernel if attn == "varlen" else None,
        "compile": compile_,
        "tokens_per_s": tokens / seconds,
        "ms_per_batch": 1e3 * seconds / len(timed),
        "host_ms_per_batch": host_ms,
        "gpu_ms_per_batch": gpu_ms,
        "tflops": tflops,
        "mfu_peak": tflops / PEAK_TFLOPS,
        "mfu_measured": tflops / MEASURED_TFLOPS,
        "peak_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
        "load_s": load_s,
        # One graph serves every decoder layer and every batch length; more means recompiles.
        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
    }
    del backend, out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def host_and_gpu_ms(run, batches: list[PackedBatch]) -> tuple[float, float]:
    """Median over `batches` of the host's time to enqueue one batch from an idle GPU, and of the batch's GPU
    time when the host is already far ahead (the batch queued behind a GPU sleep longer than the host
    needs): ms/batch above the GPU time is the GPU waiting for the host's launches."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / start.elapsed_time(end)
    host, gpu = [], []
    for b in batches:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(b)
        host.append(1e3 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        torch.cuda._sleep(int(cycles_per_ms * max(300.0, 3 * host[-1])))
        start.record()
        run(b)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return sorted(host)[len(host) // 2], sorted(gpu)[len(gpu) // 2]


def apply_inductor_settings(spec: str) -> dict:
    """'key=value,...' onto torch._inductor.config (ints and booleans as written, others as strings)."""
    import torch._inductor.config as inductor_config

    settings = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor {item!r}: expected key=value with a torch._inductor.config key")
        current = getattr(inductor_config, key)
        if isinstance(current, bool):
            settings[key] = value.lower() in ("1", "true", "yes")
        else:
            settings[key] = int(value) if value.lstrip("-").isdigit() else value
        setattr(inductor_config, key, settings[key])
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto", help="target.dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch (engine.token_budget)")
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed batches per path")
    p.add_argument("--paths", default="varlen,varlen+compile,baseline",
                   help=f"comma-separated, from {', '.join(PATHS)}")
    p.add_argument("--moe-impl", default="auto",
                   help="MoE shapes: comma-separated engine.moe_impl values to measure each path with (grouped, hf, eager)")
    p.add_argument("--varlen-kernel", default="flash",
                   help="comma-separated engine.varlen_kernel values (flash, cudnn) for the varlen paths")
    p.add_argument("--variants", default="", help="MoE grouped paths: also measure them as each of these "
                   f"comma-separated variants, in the same process ({', '.join(VARIANTS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", help="a directory: after timing each path, profile 3 batches and write its top "
                                     "kernels' table there")
    p.add_argument("--inductor", default="", help="comma-separated torch._inductor.config settings for the "
                   "compiled paths, e.g. max_autotune_gemm=1 (recorded in the JSON)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    inductor = apply_inductor_settings(args.inductor)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("specdraft.engine").setLevel(logging.INFO)  # the engine's choices (kernels, plans)
    device = torch.device(args.device)
    if device.type == "cpu":
        args.min_len, args.max_len, args.tokens = min(args.min_len, 16), min(args.max_len, 64), min(args.tokens, 256)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"--paths has unknown {unknown}; choose from {', '.join(PATHS)}")
    if device.type == "cpu":
        names = ["sdpa-mask", "baseline"]  # the flash paths need a GPU
    shape = SHAPES[args.shape]
    batches = make_batches(args.warmup + args.steps, args.tokens, args.min_len, args.max_len,
                           shape["vocab_size"], args.seed)
    info = {
        "shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "tokens_per_batch": args.tokens,
        "steps": args.steps, "seq_len_range": [args.min_len, args.max_len], "inductor": inductor, "results": [],
    }
    print(f"{args.shape} on {info['device']}, {args.tokens} tokens/batch, {args.steps} timed batches", flush=True)
    print(f"{'path':<16}{'tokens/s':>12}{'ms/batch':>10}{'TFLOP/s':>9}{'MFU989':>8}{'MFU790':>8}{'peak GiB':>10}"
          f"{'load s':>8}{'graphs':>7}{'host ms':>8}{'GPU ms':>8}", flush=True)
    moe_impls = [m.strip() for m in args.moe_impl.split(",") if m.strip()]
    kernels = [k.strip() for k in args.varlen_kernel.split(",") if k.strip()]
    runs = [(n, m, k, "") for n in names for m in moe_impls for k in (kernels if PATHS[n][0] == "varlen" else ["flash"])]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants has unknown {unknown}; choose from {', '.join(VARIANTS)}")
    runs += [(n, m, k, v) for v in variants for n, m, k, _ in list(runs) if m in ("grouped", "auto")]
    for name, moe_impl, kernel, variant in runs:
        try:
            with switched(VARIANTS.get(variant, {})):
                r = measure(name, args, shape, batches, device, moe_impl, kernel, variant)
        except Exception as e:  # noqa: BLE001 - one path failing (a kernel this build lacks) leaves the others' figures
            label = f"{name}/{moe_impl}/{kernel}" + (f"/{variant}" if variant else "")
            print(f"{label}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            info["results"].append({"path": label, "error": f"{type(e).__name__}: {e}"[:2000]})
            gc.collect()
            continue
        info["results"].append(r)
        print(f"{r['path']:<16}{r['tokens_per_s']:>12,.0f}{r['ms_per_batch']:>10.1f}{r['tflops']:>9.1f}"
              f"{r['mfu_peak']:>8.1%}{r['mfu_measured']:>8.1%}{r['peak_alloc_gib']:>10.1f}{r['load_s']:>8.1f}{r['compiled_graphs']:>7}"
              f"{r['host_ms_per_batch']:>8.1f}{r['gpu_ms_per_batch']:>8.1f}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
