"""Benchmark the DFlash trainer step: bench/trainer.py with draft=dflash, plus the flex kernel knobs.

The training code path (the DFlash strategy's bundle under FSDP2 on a one-rank trainer group, bf16
compute with fp32 master weights, flex attention on CUDA, the frozen target embedding and lm_head,
chunked cross-entropy, lib/trainer/loop.py's train_step) on synthetic captured states of a target
shape from conf/target: 8192 tokens per step from samples of 512-4096 tokens, block 16,
ceil(tokens/16) anchors, 5 draft layers. MFU: lib/drafts/dflash/flops.py (bench/trainer.py's docstring).

    python bench/dflash_trainer.py --out dflash_trainer.json [--shape qwen3_8b|tiny] [--device cuda|cpu]
        [--no-compile] [--profile top_kernels.txt] [--flex-mode max-autotune-no-cudagraphs] [--flex-options JSON]
        [--block 16] [--layers 5] [--data chat|iid] [draft.options.KEY=VALUE ...]

Same as `python bench/trainer.py --draft dflash draft.options.block_size=16 draft.options.num_layers=5`
with the flex knobs set first. `--data iid` reproduces the data of the tables measured before this
script delegated to bench/trainer.py (a random 70% loss mask rather than a response span).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import trainer  # noqa: E402
from lib.drafts.dflash import mask  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--flex-mode", help="torch.compile mode for flex attention, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--flex-options", type=json.loads, help='flex kernel_options as JSON, e.g. \'{"BLOCK_M1": 64}\'')
    args, rest = p.parse_known_args(argv)
    # Set before the first flex call (the strategy builds its attention lazily, per step).
    mask.FLEX_COMPILE_MODE, mask.FLEX_KERNEL_OPTIONS = args.flex_mode, args.flex_options
    # eval.draft_tokens follows the block, as conf/draft/dflash.yaml sets it for block 16 (it is not timed).
    return trainer.main(["--draft", "dflash", *rest, f"draft.options.block_size={args.block}",
                         f"draft.options.num_layers={args.layers}", f"eval.draft_tokens=[{args.block - 1}]"])


if __name__ == "__main__":
    sys.exit(main())
