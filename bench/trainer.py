"""Benchmark the trainer's draft step: EAGLE-3 TTT forward + backward + AdamW on one GPU.

Same code path as training (TTTModule under FSDP2 on a one-rank trainer group, bf16 compute with
fp32 master weights, the frozen target head), on random captured states of a Qwen3-8B-shaped
target: 8192 tokens per step from samples of 512-4096 tokens, ttt_length 7.

    python bench/trainer.py --out trainer.json [--shape qwen3_8b|tiny] [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.flops import BF16_PEAK_TFLOPS, draft_step_flops  # noqa: E402
from lib.drafts.eagle3.trainer import TTTModule  # noqa: E402
from lib.drafts.eagle3.fused import use_compiled  # noqa: E402
from lib.drafts.eagle3.loss import count_valid_positions  # noqa: E402
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig  # noqa: E402
from lib.drafts.eagle3.target_head import TargetHead  # noqa: E402
from lib.trainer.optim import build_optimizer, clipped_step  # noqa: E402

# Target shapes come from conf/target (random-init shapes); "tiny" is a CPU-sized stand-in.
SHAPES = ("qwen3_8b", "qwen3_14b", "qwen3_32b", "tiny")
TINY = dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, vocab_size=2048, max_position_embeddings=4096, rope_theta=1e6,
            rms_norm_eps=1e-6)


def target_config(shape: str):
    from transformers import AutoConfig

    if shape == "tiny":
        spec = dict(TINY)
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    from lib.config import compose
    from lib.target.shape import load_hf_config
    return load_hf_config(compose([f"target={shape}", "target.random_init=true"]).target)


def sample_lengths(tokens: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(lo, hi), tokens - sum(lengths)))
    return lengths


def make_batch(lengths, hf, n_aux, dtype, device, gen):
    t = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return {
        "input_ids": torch.randint(0, hf.vocab_size, (t,), device=device, generator=gen),
        "loss_mask": torch.rand(t, device=device, generator=gen) < 0.7,
        "position_ids": torch.cat([torch.arange(n, device=device) for n in lengths]),
        "cu_seqlens": cu,
        "aux_hidden": torch.randn(t, n_aux * hf.hidden_size, device=device, generator=gen).to(dtype),
        "final_hidden": torch.randn(t, hf.hidden_size, device=device, generator=gen).to(dtype),
    }


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


def parse_step_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse add_step_args' arguments (and the benchmark's own); --compile defaults as training's does."""
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = args.device == "cuda"
    return args


def init_one_rank(device: torch.device) -> None:
    """A one-rank process group, so the step runs under FSDP2 as a trainer group of one."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)


def time_steps(step, batches: list, flops: list[float], warmup: int, steps: int, cuda: bool
               ) -> tuple[float, float]:
    """(median step seconds, median TFLOP/s) of `step(batch)` over the batches in turn, after warm-up."""
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
    return statistics.median(times), statistics.median(f / t for f, t in zip(done, times)) / 1e12


def report_step(title: str, args, step_s: float, tflops: float, cuda: bool, **fields) -> None:
    """Print the step's figures, write them (with `fields`) to args.out and leave the one-rank group."""
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "shape": args.shape, "tokens": args.tokens, **fields,
              "step_ms": step_s * 1e3, "tokens_per_s": args.tokens / step_s, "tflops": tflops,
              "mfu": tflops / BF16_PEAK_TFLOPS,
              "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(f"{title}: {step_s * 1e3:.1f} ms, {result['tokens_per_s']:.0f} tok/s, {tflops:.1f} TFLOP/s, "
          f"MFU {100 * result['mfu']:.1f}% of {BF16_PEAK_TFLOPS:.0f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_step_args(p)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--recompute", action="store_true",
                   help="train.recompute: rerun each step's layer and logits in backward")
    args = parse_step_args(p, argv)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    init_one_rank(device)
    hf = target_config(args.shape)
    use_compiled(args.compile)
    aux = [1, hf.num_hidden_layers // 2 - 1, hf.num_hidden_layers - 4]
    dv = min(args.draft_vocab, hf.vocab_size)
    dc = Eagle3DraftConfig.from_target(hf, dv, aux, {})
    torch.manual_seed(0)
    with torch.device(device):
        draft = Eagle3Draft(dc)
    d2t = torch.zeros(dv, dtype=torch.long)
    t2d = torch.zeros(hf.vocab_size, dtype=torch.bool)
    t2d[:dv] = True
    draft.set_vocab_map(d2t.to(device), t2d.to(device))
    module = TTTModule(draft, args.ttt, recompute=args.recompute)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    fully_shard(module, mesh=DeviceMesh.from_group(dist.group.WORLD, device_type=device.type), mp_policy=mp,
                reshard_after_forward=False)
    dtype = torch.bfloat16 if cuda else torch.float32
    head = TargetHead(torch.randn(hf.vocab_size, hf.hidden_size, device=device, dtype=dtype) * 0.02, draft.d2t)
    module.set_head(head)
    params = [q for q in module.parameters() if q.requires_grad]
    opt = build_optimizer(params, 1e-4, 0.0, device)  # as training builds it
    rng = random.Random(0)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(l, make_batch(l, hf, len(aux), dtype, device, gen))
               for l in (sample_lengths(args.tokens, args.min_len, args.max_len, rng) for _ in range(4))]

    def train_step(batch) -> None:
        target = head.target_probs(batch["final_hidden"])
        counts = count_valid_positions(head, batch, args.ttt, target=target).float().clamp(min=1)
        loss, _ = module(batch, target, counts)
        loss.backward()
        clipped_step(opt, params, 0.5)  # as training steps

    flops = [draft_step_flops(dc, lengths, args.ttt, hf.vocab_size) for lengths, _ in batches]
    step_s, tflops = time_steps(train_step, [b for _, b in batches], flops, args.warmup, args.steps, cuda)
    if args.profile:
        write_profile(args.profile, [b for _, b in batches[:3]], train_step, cuda)
    report_step(f"trainer step ({args.shape}, {args.tokens} tok, ttt {args.ttt})", args, step_s, tflops, cuda,
                compile=args.compile, recompute=args.recompute, ttt=args.ttt, draft_vocab=dv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
