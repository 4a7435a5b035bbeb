"""End-to-end placements, back to back in one invocation, on the same data, model shapes and seed.

Each placement is a real `bash launch.sh ...` run (MPS started/stopped by the launcher) of a
random-init target shape with the EAGLE-3 draft, 8192 tokens per pair per step. Steady-state
figures come from the runs' metrics.jsonl (the first --skip steps are warm-up and compilation).

    python bench/e2e.py --suite one_gpu --out-dir /tmp/e2e   # sequential, colocate+MPS, colocate no MPS
    python bench/e2e.py --suite two_gpu --out-dir /tmp/e2e   # colocate vs disaggregate, 8B, 14B and 32B
    python bench/e2e.py --suite cpu --out-dir /tmp/e2e       # the same machinery on the tiny target
    python bench/e2e.py --suite moe_one_gpu --out-dir /tmp/e2e   # Qwen3-30B-A3B and gpt-oss-20b shapes

Writes results.json, a markdown table (table.md) and a PNG chart into --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.flops import BF16_PEAK_TFLOPS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "assets", "tiny_target")

# name, placement, mps, target shape, more overrides for that run
BIG = ("infer_frac=0.5", "train_frac=0.4")  # a 32B target's 61 GiB of weights need half the GPU
SUITES = {
    "one_gpu": [("sequential", "sequential", "off", "qwen3_8b", ()),
                ("colocate+MPS", "colocate", "on", "qwen3_8b", ()),
                ("colocate-noMPS", "colocate", "off", "qwen3_8b", ())],
    # Engine/trainer FLOPs per step: 8B 0.86, 14B 1.09, 32B 1.98 (the unbalanced case).
    "two_gpu": [("colocate+MPS-8B", "colocate", "on", "qwen3_8b", ()),
                ("disaggregate-8B", "disaggregate", "off", "qwen3_8b", ()),
                ("colocate+MPS-14B", "colocate", "on", "qwen3_14b", ()),
                ("disaggregate-14B", "disaggregate", "off", "qwen3_14b", ()),
                ("colocate+MPS-32B", "colocate", "on", "qwen3_32b", BIG),
                ("disaggregate-32B", "disaggregate", "off", "qwen3_32b", BIG)],
    # --steps 1000: peak memory per role at step 100 vs the last step (the memory soak).
    "soak": [("colocate+MPS", "colocate", "on", "qwen3_8b", ())],
    # --steps 200: loss curves of the two placements (mean relative deviation in the table).
    "curves": [("sequential", "sequential", "off", "qwen3_8b", ()), ("colocate+MPS", "colocate", "on", "qwen3_8b", ())],
    "cpu": [("sequential", "sequential", "off", "tiny", ()), ("colocate", "colocate", "off", "tiny", ())],
    # MoE shapes on one GPU (issue 17): 30B-A3B's 61 GB and gpt-oss-20b's 42 GB of bf16 weights need the
    # larger engine share.
    "moe_one_gpu": [("sequential-30B-A3B", "sequential", "off", "qwen3_30b_a3b", BIG),
                    ("colocate+MPS-30B-A3B", "colocate", "on", "qwen3_30b_a3b", BIG),
                    ("colocate+MPS-gpt-oss-20b", "colocate", "on", "gpt_oss_20b", BIG)],
}
# launch.sh takes every GPU it sees: the same runs on a 4-GPU machine are 4 pairs vs 2 + 2 GPUs.
SUITES["four_gpu"] = SUITES["two_gpu"]
SOAK_EARLY_STEP = 100


def run_one(name: str, placement: str, mps: str, target: str, run_overrides: tuple, args) -> dict:
    run_dir = os.path.join(args.out_dir, name.replace(" ", "_").replace(",", "").replace("+", "_"))
    overrides = [f"placement={placement}", f"mps={mps}", f"run.dir={run_dir}", f"train.max_steps={args.steps}",
                 "train.log_every=10", "eval.every=0", "checkpoint.every=0", f"train.ttt_length={args.ttt}"]
    if target != "tiny":
        overrides += [f"target={target}", "target.random_init=true", f"target.tokenizer={TINY}",
                      f"engine.token_budget={args.tokens}", "draft.draft_vocab_size=32000",
                      f"train_frac={args.train_frac}", f"infer_frac={args.infer_frac}"]
    overrides += [*run_overrides, *args.extra]
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(REPO, "launch.sh"), *overrides], cwd=REPO, capture_output=True,
                          text=True)
    wall = time.time() - t0
    with open(os.path.join(args.out_dir, f"{os.path.basename(run_dir)}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"name": name, "error": f"exit {proc.returncode}", "log_tail": tail}
    return summarize(name, placement, target, run_dir, wall, args)


def summarize(name: str, placement: str, target: str, run_dir: str, wall: float, args) -> dict:
    from transformers import AutoConfig

    from omegaconf import OmegaConf

    from bench.flops import draft_step_flops, target_forward_flops
    from lib.config import compose
    from lib.drafts.eagle3.model import Eagle3DraftConfig
    from lib.drafts.eagle3.strategy import eagle3_aux_layers
    from lib.target.shape import load_hf_config

    with open(os.path.join(run_dir, "topology.json")) as f:
        topo = json.load(f)
    all_rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    all_rows = [r for r in all_rows if "loss" in r]
    rows = all_rows[args.skip:]
    early = next((r for r in all_rows if r["step"] == SOAK_EARLY_STEP), None)
    step = statistics.median(r["step_time_s"] for r in rows)
    tokens_per_step = statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in rows)
    gpus = len({r["device"] for r in topo["ranks"]})
    pairs = sum(1 for r in topo["ranks"] if r["role"] in ("trainer", "both"))
    if target == "tiny":
        hf = AutoConfig.from_pretrained(TINY)
    else:
        hf = load_hf_config(compose([f"target={target}", "target.random_init=true"]).target)
    # Samples of the embedded corpus are short: attention is a rounding error, count matmuls only. The
    # draft's share is counted for EAGLE-3 only (another family's step has other FLOPs: its own bench,
    # e.g. bench/dflash_trainer.py, counts them); for other drafts the FLOP columns stay empty.
    tflops = None
    if OmegaConf.load(os.path.join(run_dir, "config.yaml")).draft.name == "eagle3":
        aux = eagle3_aux_layers(None, hf.num_hidden_layers)
        dc = Eagle3DraftConfig.from_target(hf, min(32000, hf.vocab_size), aux, {})
        unit = [1] * int(tokens_per_step / pairs)
        flops = pairs * (target_forward_flops(hf, unit) + draft_step_flops(dc, unit, args.ttt, hf.vocab_size))
        tflops = flops / step / 1e12
    return {
        "name": name, "placement": placement, "target": target, "gpus": gpus, "pairs": pairs, "wall_s": wall,
        "steps": len(rows) + args.skip, "step_time_s": step, "tokens_per_s": tokens_per_step / step,
        "tokens_per_s_per_gpu": tokens_per_step / step / gpus,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in rows),
        "useful_tflops": tflops, "useful_tflops_per_gpu": tflops and tflops / gpus,
        "frac_of_peak": tflops and tflops / gpus / BF16_PEAK_TFLOPS,
        "handoff_ms": statistics.median(r["handoff_ms"] for r in rows) if placement != "sequential" else None,
        "trainer_peak_gib": max(r["peak_alloc_bytes"] for r in rows) / 2**30,
        "engine_peak_gib": max(r.get("engine_peak_alloc_bytes", 0) for r in rows) / 2**30,
        "final_loss": rows[-1]["loss"],
        "losses": [r["loss"] for r in all_rows],
        "peak_gib_at": {str(r["step"]): {"trainer": r["peak_alloc_bytes"] / 2**30,
                                         "engine": r.get("engine_peak_alloc_bytes", 0) / 2**30}
                        for r in (early, all_rows[-1]) if r is not None},
    }


def _or_dash(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: list[dict], device: str, command: str) -> str:
    base = results[0] if "error" not in results[0] else None
    lines = [f"Device: {device}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.", "",
             "| placement | target | GPUs | step s | tokens/s | tokens/s/GPU | ratio | samples/s | useful TFLOP/s/GPU "
             "| % of bf16 peak | handoff ms | trainer peak GiB | engine peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |")
            continue
        ref = next((b for b in results if "error" not in b and b["target"] == r["target"]), base)
        ratio = r["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"]
        handoff = "-" if r["handoff_ms"] is None else f"{r['handoff_ms']:.2f}"
        lines.append(f"| {r['name']} | {r['target']} | {r['gpus']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} "
                     f"| {r['tokens_per_s_per_gpu']:.0f} | {ratio:.3f} | {r['samples_per_s']:.1f} "
                     f"| {_or_dash(r['useful_tflops_per_gpu'], '.0f')} "
                     f"| {_or_dash(r['frac_of_peak'] and 100 * r['frac_of_peak'], '.1f')} | {handoff} "
                     f"| {r['trainer_peak_gib']:.1f} | {r['engine_peak_gib']:.1f} |")
    lines.append("")
    lines.append("ratio: tokens/s per GPU against the first row of the same target in this invocation.")
    for r in results:
        if "error" in r:
            continue
        ref = next((b for b in results if "error" not in b and b["target"] == r["target"]), None)
        if ref is not r and ref is not None:
            n = min(len(r["losses"]), len(ref["losses"]))
            dev = sum(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], ref["losses"][:n])) / n
            lines.append(f"- loss curve of {r['name']} vs {ref['name']}: mean relative deviation {100 * dev:.3f}% "
                         f"over {n} steps")
        if len(r["peak_gib_at"]) > 1:
            (s0, m0), (s1, m1) = sorted(r["peak_gib_at"].items(), key=lambda kv: int(kv[0]))
            lines.append(f"- {r['name']} peak allocated GiB, step {s0} -> {s1}: trainer {m0['trainer']:.3f} -> "
                         f"{m1['trainer']:.3f}, engine {m0['engine']:.3f} -> {m1['engine']:.3f}")
    return "\n".join(lines)


def chart(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["name"] for r in ok], [r["tokens_per_s_per_gpu"] for r in ok], color="#4a7ab5")
    ax.set_ylabel("tokens/s per GPU")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the figures")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--train-frac", type=float, default=0.45)
    p.add_argument("--infer-frac", type=float, default=0.45)
    p.add_argument("--only", nargs="*", help="names of the suite's runs to keep")
    p.add_argument("extra", nargs="*", help="more Hydra overrides for every run")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    for name, placement, mps, target, run_overrides in SUITES[args.suite]:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        r = run_one(name, placement, mps, target, run_overrides, args)
        print(json.dumps(r), flush=True)
        results.append(r)
    try:
        import torch
        device = torch.cuda.get_device_name() + f" x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the table still names the suite
        device = "unknown"
    command = "python bench/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results, device, command)
    print(text)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"device": device, "command": command, "results": results}, f, indent=1)
    chart(results, os.path.join(args.out_dir, "e2e.png"))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
