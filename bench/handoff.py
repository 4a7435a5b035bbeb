"""Benchmark the engine -> trainer handoff: the IPC/shared-memory ring vs a gloo CPU-staged transfer.

Two processes (rank 0 = engine, rank 1 = trainer) move an EAGLE-3 payload (default: 8192 tokens,
hidden 4096, 3 aux layers + final hidden, bf16, ~268 MB, plus ids/masks/positions) each step:
  ring   the engine writes the slot with a real kernel and calls send(); the trainer calls recv()
         and a tiny kernel reads the payload; "trainer wait" runs from the recv() call until that
         kernel has finished (host synchronised), "engine stall" is host time in acquire()+send().
  gloo   the engine copies the payload to host memory and dist.send()s it; the trainer dist.recv()s
         it and copies it to its GPU. Same two timings.
Usage:  python bench/handoff.py --out results.json            (GPU, both roles on cuda:0)
        python bench/handoff.py --device cpu --out smoke.json (CPU smoke test, small payload)
Prints a table, writes JSON to --out, exits non-zero on any failure (including wrong bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.drafts.base import CapturePlan, capture_payload_specs  # noqa: E402
from lib.handoff import make_receiver, make_sender  # noqa: E402
from lib.handoff.slots import SlotLayout  # noqa: E402

ENGINE, TRAINER = 0, 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", required=True, help="path of the JSON results file")
    p.add_argument("--tokens", type=int, help="rows per step (default 8192 on cuda, 256 on cpu)")
    p.add_argument("--hidden", type=int, help="hidden size (default 4096 on cuda, 64 on cpu)")
    p.add_argument("--aux", type=int, default=3, help="aux layers captured")
    p.add_argument("--steps", type=int, help="timed steps (default 200 on cuda, 30 on cpu)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--slots", type=int, default=3)
    p.add_argument("--engine-gpu", type=int, default=0)
    p.add_argument("--trainer-gpu", type=int, default=0, help="another GPU than --engine-gpu: cross-device ring")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--engine-work-ms", type=float, default=0.0,
                   help="GPU work the engine does per step before writing the slot (pipelined mode)")
    p.add_argument("--trainer-work-ms", type=float, default=0.0,
                   help="GPU work the trainer does per step on the payload (pipelined mode): with it, the "
                        "trainer wait is the handoff's own cost, not the engine's production time")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (8192 if cuda else 256)
    args.hidden = args.hidden or (4096 if cuda else 64)
    args.steps = args.steps or (200 if cuda else 30)
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; use --device cpu for the smoke test")
    for name in ("tokens", "hidden", "aux", "steps", "slots"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args


def role_device(args, rank: int) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", args.engine_gpu if rank == ENGINE else args.trainer_gpu)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1],
            "mean_ms": statistics.fmean(ms)}


def gpu_work(ms: float, device: torch.device) -> None:
    """Stand-in for the role's real kernels: keeps the GPU busy for `ms` without host involvement."""
    if ms > 0 and device.type == "cuda":
        torch.cuda._sleep(int(ms * 1e-3 * torch.cuda.clock_rate(device) * 1e6))


def source_payload(specs, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for spec in specs:
        if spec.dtype.is_floating_point:
            out[spec.name] = torch.randn((spec.max_rows, *spec.row_shape), generator=g, device=device).to(spec.dtype)
        else:
            out[spec.name] = torch.zeros((spec.max_rows, *spec.row_shape), dtype=spec.dtype, device=device)
    return out


def engine_write(views: dict[str, torch.Tensor], src: dict[str, torch.Tensor], step: int, n: int) -> None:
    """The 'engine kernel': fill the slot from the captured states; input_ids carry the step for checking."""
    for name, t in src.items():
        if name == "input_ids":
            views[name][:n].fill_(step)
        else:
            views[name][:n].copy_(t[:n])


def run_ring(args, rank: int, specs, address: str) -> dict:
    device = role_device(args, rank)
    cross = device.type == "cuda" and args.engine_gpu != args.trainer_gpu
    n = args.tokens
    total = args.warmup + args.steps
    acquires, sends, stalls, waits = [], [], [], []
    if rank == ENGINE:
        sender = make_sender(specs, args.slots, address, "trainer (rank 1)", args.timeout_s, device, args.timeout_s, cross_device=cross)
        src = source_payload(specs, device)
        synchronize(device)
        for step in range(total):
            gpu_work(args.engine_work_ms, device)
            t0 = time.perf_counter()
            views = sender.acquire()
            t1 = time.perf_counter()
            engine_write(views, src, step, n)
            t2 = time.perf_counter()
            sender.send({k: v[:n] for k, v in views.items()}, {"step": step, "num_rows": n})
            t3 = time.perf_counter()
            if step >= args.warmup:
                acquires.append(t1 - t0)
                sends.append(t3 - t2)
                stalls.append((t1 - t0) + (t3 - t2))
        del views
        sender.close()
        # acquire() waits for credits (back-pressure from a slower trainer); send() is the handoff's own cost.
        return {"engine_stall": summarize(stalls), "engine_acquire": summarize(acquires), "engine_send": summarize(sends)}
    receiver = make_receiver(specs, args.slots, address, "engine (rank 0)", args.timeout_s, device, args.timeout_s, cross_device=cross)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    pipelined = args.trainer_work_ms > 0 and device.type == "cuda"
    gaps = []
    t_start = None
    for step in range(total):
        if step == args.warmup:
            t_start = time.perf_counter()
        if pipelined:
            # Host time in recv() plus any GPU stall on the slot's event, measured by events around
            # it: what the trainer loses when the engine is ahead, as in the colocated pipeline.
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            before.record()
            t0 = time.perf_counter()
            header, views = receiver.recv()
            t1 = time.perf_counter()
            after.record()
            wrong += (views["input_ids"][n - 1] != header["step"]).to(torch.int64)
            gpu_work(args.trainer_work_ms, device)
            receiver.release()
            if step >= args.warmup:
                waits.append(t1 - t0)
                gaps.append((before, after))
            continue
        t0 = time.perf_counter()
        header, views = receiver.recv()
        wrong += (views["input_ids"][n - 1] != header["step"]).to(torch.int64)  # the tiny kernel that reads it
        synchronize(device)
        t1 = time.perf_counter()
        receiver.release()
        if step >= args.warmup:
            waits.append(t1 - t0)
    synchronize(device)
    elapsed = time.perf_counter() - t_start
    if pipelined:
        stalls = [b.elapsed_time(a) * 1e-3 for b, a in gaps]
        waits = [w + g for w, g in zip(waits, stalls)]
    del views  # close() can drop the mapping only when no view of the slots is left
    receiver.close()
    if int(wrong) != 0:
        raise RuntimeError(f"ring delivered wrong data in {int(wrong)} steps")
    return {"trainer_wait": summarize(waits), "step_ms": elapsed / args.steps * 1e3}


def run_gloo(args, rank: int, specs) -> dict:
    device = role_device(args, rank)
    layout = SlotLayout(tuple(specs))
    n = args.tokens
    total = args.warmup + args.steps
    pin = device.type == "cuda"
    host = torch.empty(layout.slot_bytes, dtype=torch.uint8, pin_memory=pin)
    staged = torch.empty(layout.slot_bytes, dtype=torch.uint8, device=device)
    views = layout.views(staged, 0)
    times = []
    dist.barrier()
    if rank == ENGINE:
        src = source_payload(specs, device)
        for step in range(total):
            engine_write(views, src, step, n)
            t0 = time.perf_counter()
            host.copy_(staged)  # synchronous: waits for the engine kernel like a CPU-staged handoff must
            dist.send(host, dst=TRAINER)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        dist.barrier()
        return {"engine_stall": summarize(times)}
    wrong = 0
    t_start = None
    for step in range(total):
        if step == args.warmup:
            t_start = time.perf_counter()
        t0 = time.perf_counter()
        dist.recv(host, src=ENGINE)
        staged.copy_(host, non_blocking=True)
        wrong += int(views["input_ids"][n - 1] != step)  # reads it on the GPU and synchronises
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - t_start
    dist.barrier()
    if wrong:
        raise RuntimeError(f"gloo delivered wrong data in {wrong} steps")
    return {"trainer_wait": summarize(times), "step_ms": elapsed / args.steps * 1e3}


def worker(rank: int, args: argparse.Namespace, workdir: str) -> None:
    device = role_device(args, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/pg", rank=rank, world_size=2)
    specs = capture_payload_specs(CapturePlan(tuple(range(args.aux)), args.hidden), args.tokens, torch.bfloat16)
    ring = run_ring(args, rank, specs, os.path.join(workdir, "ring.sock"))
    gloo = run_gloo(args, rank, specs)
    gathered = [None, None]
    dist.all_gather_object(gathered, {"ring": ring, "gloo": gloo})
    if rank == ENGINE:
        report(args, specs, device, gathered)
    dist.destroy_process_group()


def report(args, specs, device: torch.device, gathered: list[dict]) -> None:
    payload_bytes = sum(s.row_bytes * args.tokens for s in specs)
    results = {}
    for key, label in (("ring", "ipc_ring" if device.type == "cuda" else "shm_ring"), ("gloo", "gloo_cpu_staged")):
        merged = {**gathered[ENGINE][key], **gathered[TRAINER][key]}
        merged["gb_per_s"] = payload_bytes / (merged["step_ms"] / 1e3) / 1e9
        results[label] = merged
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "payload_bytes": payload_bytes,
           "config": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    print(f"handoff benchmark on {out['device']}: {payload_bytes / 1e6:.1f} MB per step, {args.steps} steps, {args.slots} slots")
    print(f"{'transport':<16} {'engine stall ms p50/p90/max':>30} {'trainer wait ms p50/p90/max':>30} {'step ms':>9} {'GB/s':>7}")
    for label, r in results.items():
        e, w = r["engine_stall"], r["trainer_wait"]
        print(f"{label:<16} {e['p50_ms']:>12.3f} {e['p90_ms']:>8.3f} {e['max_ms']:>8.3f} "
              f"{w['p50_ms']:>12.3f} {w['p90_ms']:>8.3f} {w['max_ms']:>8.3f} {r['step_ms']:>9.3f} {r['gb_per_s']:>7.2f}")
        if "engine_send" in r:
            print(f"{'':<16} of which send() p50 {r['engine_send']['p50_ms']:.3f} ms, waiting for credits in acquire() p50 "
                  f"{r['engine_acquire']['p50_ms']:.3f} ms")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="hob-", dir="/tmp")  # short: Unix socket paths are limited
    try:
        tmp.spawn(worker, args=(args, workdir), nprocs=2, join=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
