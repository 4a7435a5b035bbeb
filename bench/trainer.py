"""Benchmark one trainer step of any draft family: lib/trainer/loop.py's train_step, on one GPU.

The family comes from its DraftStrategy (`get_strategy(cfg.draft.name)`): `build` the bundle as a run
does (FSDP2 on a one-rank trainer group, bf16 compute with fp32 master weights on GPU, the frozen
target weights random), then the loop's own `train_step` (prepare, normaliser all-reduce, micro_loss,
backward, clipped fused AdamW, metric reduction) on synthetic captured states of a target shape (no
target forward): 8192 tokens per step from samples of 512-4096 tokens, random tokens, a loss mask over
the last 70% of each sample (a response after its prompt), and, for the EAGLE-3 line, final hidden
states whose target argmax lies in the draft vocabulary (so its valid rows, P-EAGLE's mask chains and
the rows its heads compute are what real data gives). `--data iid` gives the earlier benches' data
instead: a 70% random loss mask and random final hidden states (few valid rows for the EAGLE-3 line).

MFU: useful FLOPs per step from the family's count (lib/drafts/<family>/flops.py `step_flops`, the
rule in lib/drafts/flops.py: matmuls and visible attention pairs, the gradients that exist, only rows
the step computes), over the median step time, against 989 TFLOP/s (H100/H200 dense bf16). A family
without flops.py is timed with its FLOP columns empty. Against docs/benchmarks.md's earlier trainer
tables: those used `--data iid`, and EAGLE-3's earlier count (bench/flops.py) gave every row logits
at every unroll step, where the step computes them for valid rows only (15% of rows on iid data: the
same step is about 98 TFLOP under this count against 137 under that one, at the Qwen3-8B shape).

One family (the config as `train.py` composes it: `--draft` is the draft=<conf> group, any Hydra
override after it):
    python bench/trainer.py --out trainer.json [--draft eagle3] [--shape qwen3_8b|...|tiny]
        [--device cuda|cpu] [--tokens N] [--steps N] [--warmup N] [--no-compile] [--profile FILE]
        [train.loss=lk] [draft.options.loss_weights=dpace] ...
    (EAGLE-3's older flags still work: --ttt N, --draft-vocab N, --recompute.)
Every family and variant in one process, a markdown table (`bash bench/gpu_suite.sh family_steps`):
    python bench/trainer.py --variants all --out family_steps.json --table family_steps.md
    (--variants eagle3,peagle,... picks presets from VARIANTS; every family under lib/drafts/ is in `all`.)
CPU smoke check at a tiny shape:
    python bench/trainer.py --variants all --shape tiny --device cpu --tokens 512 --min-len 64 \\
        --max-len 256 --steps 1 --warmup 1 --out /tmp/fs.json --table /tmp/fs.md
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.flops import BF16_PEAK_TFLOPS  # noqa: E402
from bench.step_batches import BatchSource, make_batch, sample_lengths, write_vocab_map  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "assets", "tiny_target")
# Target shapes come from conf/target (random-init shapes); "tiny" is a CPU-sized stand-in.
SHAPES = ("qwen3_8b", "qwen3_14b", "qwen3_32b", "smollm2_135m", "tiny")
TINY = dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=4096, rope_theta=1e6,
            rms_norm_eps=1e-6)
# label -> (draft=<conf>, overrides): issues 33/34's table. Families on disk without a preset join `all`
# with their defaults.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "eagle3": ("eagle3", ()),
    "eagle3_1": ("eagle3_1", ()),
    "peagle": ("peagle", ()),
    "peagle_l4": ("peagle", ("draft.options.num_layers=4",)),
    "dflash": ("dflash", ("draft.options.loss_weights=decay",)),
    "dflash_dpace": ("dflash", ()),  # the default weighting since 2026-12-07
    "dspark": ("dspark", ()),
    "dflash2": ("dflash2", ()),
    **{f"eagle3_{loss}": ("eagle3", (f"train.loss={loss}",)) for loss in ("lk", "lk_hybrid", "tv", "jsd")},
}


def target_config(shape: str):
    """The transformers config of a target shape (conf/target/<shape>.yaml's hf_config, or TINY)."""
    from transformers import AutoConfig

    if shape == "tiny":
        spec = dict(TINY)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    from lib.config import compose
    from lib.target.shape import load_hf_config
    return load_hf_config(compose([f"target={shape}", "target.random_init=true"]).target)


def write_profile(path: str, batches: list, train_step, cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            train_step(batch)
        if cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
        if cuda:
            from bench.timeline import idle_summary

            with tempfile.TemporaryDirectory() as tmp:
                trace = os.path.join(tmp, "trace.json")
                prof.export_chrome_trace(trace)
                f.write("\n" + idle_summary(trace))


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The arguments every trainer-step benchmark takes (shape, device, batch make-up, timing, output)."""
    p.add_argument("--shape", choices=SHAPES, default="qwen3_8b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", required=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse the elementwise work (train.compile); default as in training: on for cuda")
    p.add_argument("--profile", help="after timing, profile 3 steps and write the top kernels' table here")
    p.add_argument("--data", choices=["chat", "iid"], default="chat",
                   help="chat: loss on each sample's last 70%%, target argmax in the draft vocabulary; "
                        "iid: the earlier benches' random 70%% mask and random final states")


def init_one_rank(device: torch.device) -> None:
    """A one-rank process group, so the step runs under FSDP2 as a trainer group of one."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)


def time_steps(step, batches: list, flops: list[Optional[float]], warmup: int, steps: int, cuda: bool
               ) -> tuple[float, Optional[float]]:
    """(median step seconds, median TFLOP/s or None) of `step(batch)` over the batches in turn, after warm-up."""
    times, done = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            done.append(flops[i % len(batches)])
    if any(f is None for f in done):
        return statistics.median(times), None
    return statistics.median(times), statistics.median(f / t for f, t in zip(done, times)) / 1e12


_GLOO = None


def bench_context(cfg, device: torch.device, run_dir: str) -> SimpleNamespace:
    """What DraftStrategy.build and the loop's train_step read of lib.launch.runtime.RunContext, for one
    process that is the whole trainer group (a gloo twin of the group for barriers, as runs have)."""
    global _GLOO
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return SimpleNamespace(cfg=cfg, device=device, run_dir=run_dir, is_trainer_leader=True,
                           groups=SimpleNamespace(trainer=dist.group.WORLD, trainer_gloo=_GLOO),
                           tokenizer_path=cfg.target.tokenizer or cfg.target.path)


def bench_config(draft: str, overrides, args, run_dir: str):
    """The resolved Config a run of `draft=<draft> overrides` would train with, at --shape on --device."""
    from lib.config import LaunchShape, compose, resolve
    from lib.config.check import validate

    shape = "qwen3_8b" if args.shape == "tiny" else args.shape
    # The shape from the conf's hf_config, never a checkpoint (smollm2_135m's conf names a GGUF path).
    base = [f"draft={draft}", f"target={shape}", "target.random_init=true", "target.path=null", f"target.tokenizer={TINY_TOKENIZER}",
            "placement=sequential", f"device={args.device}", f"run.dir={run_dir}", "eval.every=0"]
    if args.compile is not None:
        base.append(f"train.compile={str(args.compile).lower()}")
    cfg = compose(base + list(overrides))
    if args.shape == "tiny":
        cfg = replace(cfg, target=replace(cfg.target, name="tiny_shape", hf_config=dict(TINY)))
    launch = LaunchShape(1, 1, 1, torch.cuda.device_count() if args.device == "cuda" else 0)
    validate(cfg, launch)
    return resolve(cfg, launch)


def family_flops(family: str):
    """lib/drafts/<family>/flops.py's step_flops(bundle, batch, context), or None where the family has none."""
    name = f"lib.drafts.{family}.flops"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return None
    return getattr(module, "step_flops", None)


def measure(label: str, draft: str, overrides, args, device: torch.device) -> dict[str, Any]:
    """One variant's median step: build as a run does, time the loop's train_step, count its FLOPs."""
    from lib.drafts.base import get_strategy
    from lib.target.shape import load_hf_config
    from lib.trainer.loop import fresh_counters, train_step
    from lib.trainer.optim import build_optimizer

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config(draft, overrides, args, run_dir)
        hf = load_hf_config(cfg.target)
        write_vocab_map(run_dir, cfg.draft.draft_vocab_size, hf.vocab_size)
        ctx = bench_context(cfg, device, run_dir)
        strategy = get_strategy(cfg.draft.name)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        bundle = strategy.build(ctx)
        optimizer = build_optimizer(bundle.trainable_params(), cfg.train.lr, cfg.train.weight_decay, device)
        plan = strategy.capture_plan(hf, cfg)
        dtype = torch.bfloat16 if cuda else torch.float32
        rng, gen = random.Random(0), torch.Generator(device=device).manual_seed(0)
        head = getattr(bundle, "target_head", None)
        batches = [make_batch(sample_lengths(args.tokens, args.min_len, args.max_len, rng), plan, hf.vocab_size,
                              dtype, device, gen, args.data, head) for _ in range(4)]
        count = family_flops(cfg.draft.name)
        flops = []
        for batch in batches:
            contexts, _ = strategy.prepare(bundle, [batch])  # as train_step will: seeded by the batch's tokens
            flops.append(None if count is None else float(count(bundle, batch, contexts[0])))
        # The handoff's header: sample boundaries as a list (the loop makes cu_seqlens from it), sizes.
        payloads = [({"cu_seqlens": b["cu_seqlens"].tolist(), "num_rows": int(b["input_ids"].numel()),
                      "sample_ids": list(range(b["cu_seqlens"].numel() - 1))}, b) for b in batches]
        source, counters, rows = BatchSource(), fresh_counters(), []

        def step(payload) -> None:
            source.next = payload
            row, _ = train_step(ctx, strategy, bundle, optimizer, source, counters, len(rows) + 1)
            rows.append(row)

        step_s, tflops = time_steps(step, payloads, flops, args.warmup, args.steps, cuda)
        if args.profile:  # one table per variant under --variants
            write_profile(f"{args.profile}.{label}" if args.variants else args.profile, payloads[:3], step, cuda)
        result = {"label": label, "draft": draft, "family": cfg.draft.name, "overrides": list(overrides),
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                  "shape": args.shape, "tokens": args.tokens, "data": args.data, "compile": cfg.train.compile,
                  "capture_layers": list(plan.layers), "step_ms": step_s * 1e3, "tokens_per_s": args.tokens / step_s,
                  "flops_per_step": statistics.median(flops) if count is not None else None, "tflops": tflops,
                  "mfu": None if tflops is None else tflops / BF16_PEAK_TFLOPS,
                  "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  "last_loss": rows[-1]["loss"], "trainable_params": sum(p.numel() for p in bundle.trainable_params())}
    return result


def release_memory(device: torch.device) -> None:
    """Between variants: the last one's draft, optimizer state and batches back to the allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_result(r: dict) -> None:
    flops = (f", {r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of {BF16_PEAK_TFLOPS:.0f}"
             if r["tflops"] is not None else ", no FLOP count (lib/drafts/<family>/flops.py)")
    print(f"{r['label']} trainer step ({r['shape']}, {r['tokens']} tok): {r['step_ms']:.1f} ms, "
          f"{r['tokens_per_s']:.0f} tok/s{flops}, loss {r['last_loss']:.3f}", flush=True)


def markdown_table(results: list[dict]) -> str:
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| variant | draft | overrides | step ms | tokens/s | TFLOP/s | MFU (989) | GFLOP/step | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['draft']} | {' '.join(r['overrides']) or '-'} | error: "
                         f"{r['error'][:120]} | | | | | |")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        gflop = None if r["flops_per_step"] is None else r["flops_per_step"] / 1e9
        lines.append(f"| {r['label']} | {r['draft']} | {' '.join(r['overrides']) or '-'} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {cell(r['tflops'], '.1f')} | {cell(mfu, '.1f')}% | "
                     f"{cell(gflop, ',.1f')} | {cell(r['peak_alloc_gib'], '.1f')} |")
    return "\n".join(lines) + "\n"


def chosen_variants(spec: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """--variants: `all` (the presets plus every family on disk without one) or a comma list of presets."""
    from lib.config.choices import draft_families

    if spec == "all":
        covered = {VARIANTS[k][0] for k in VARIANTS} | {"eagle3"}
        extra = {name: (name, ()) for name in sorted(draft_families()) if name not in covered}
        table = {**VARIANTS, **extra}
        return [(label, *table[label]) for label in table]
    unknown = [v for v in spec.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; use all or some of {', '.join(VARIANTS)}")
    return [(v, *VARIANTS[v]) for v in spec.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(p)
    p.add_argument("--draft", default="eagle3", help="the draft=<conf> group: eagle3, eagle3_1, peagle, dflash, ...")
    p.add_argument("--variants", help="all, or presets a,b,... of VARIANTS: every one in this process")
    p.add_argument("--table", help="with --variants: the markdown table's path (default: --out with .md)")
    p.add_argument("--ttt", type=int, help="train.ttt_length (EAGLE-3)")
    p.add_argument("--draft-vocab", type=int, help="draft.draft_vocab_size")
    p.add_argument("--recompute", action="store_true", help="train.recompute=true (EAGLE-3)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as train.py takes them (train.loss=lk ...)")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.ttt, "train.ttt_length"), (args.draft_vocab, "draft.draft_vocab_size")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.recompute:
        overrides.append("train.recompute=true")
    device = torch.device(args.device)
    init_one_rank(device)
    try:
        if not args.variants:
            r = measure(" ".join([args.draft, *overrides]), args.draft, overrides, args, device)
            print_result(r)
            with open(args.out, "w") as f:
                json.dump(r, f, indent=2)
            return 0
        # Compiled ops recompile per family and loss; keep them compiled rather than falling back to eager.
        torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        table = args.table or os.path.splitext(args.out)[0] + ".md"
        results = []
        for label, draft, preset in chosen_variants(args.variants):
            try:
                r = measure(label, draft, [*preset, *overrides], args, device)
                print_result(r)
            except Exception as err:  # one family's failure must not hide the others' figures
                r = {"label": label, "draft": draft, "overrides": [*preset, *overrides],
                     "error": f"{type(err).__name__}: {err}"}
                print(f"{label}: {r['error']}", flush=True)
            release_memory(device)
            results.append(r)
            with open(args.out, "w") as f:  # after every variant: a time limit still leaves the rows done
                json.dump(results, f, indent=2)
            with open(table, "w") as f:
                f.write(markdown_table(results))
        print(markdown_table(results))
        return 1 if any("error" in r for r in results) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
