"""Benchmark the DFlash trainer step: block forward + backward + AdamW on one GPU.

The training code path (DFlashModule under FSDP2 on a one-rank trainer group, bf16 compute with fp32
master weights, flex attention on CUDA, the frozen target embedding and lm_head, chunked
cross-entropy) on random captured states of a target shape from conf/target: 8192 tokens per step
from samples of 512-4096 tokens, block 16, ceil(tokens/16) anchors, 5 draft layers.

    python bench/dflash_trainer.py --out dflash_trainer.json [--shape qwen3_8b|tiny] [--device cuda|cpu]
        [--no-compile] [--profile top_kernels.txt] [--flex-mode max-autotune-no-cudagraphs] [--flex-options JSON]

MFU counts useful matmul FLOPs only (no recomputation): 3x forward for the trainable stack, 2x for
fc (no input gradient) and for the frozen lm_head (no weight gradient), attention over the visible
(query, key) pairs of the block mask only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.trainer import (add_step_args, init_one_rank, parse_step_args, report_step,  # noqa: E402
                           sample_lengths, target_config, time_steps, write_profile)
from lib.drafts.dflash.fused import use_compiled  # noqa: E402
from lib.drafts.dflash import mask  # noqa: E402
from lib.drafts.dflash.mask import build_blocks, dense_mask, sample_anchors  # noqa: E402
from lib.drafts.dflash.model import DFlashConfig, DFlashDraft  # noqa: E402
from lib.drafts.dflash.trainer import DFlashModule, DFlashOptions, default_target_layers  # noqa: E402
from lib.launch.sharding import shard  # noqa: E402
from lib.trainer.optim import build_optimizer, clipped_step  # noqa: E402


def step_flops(c: DFlashConfig, tokens: int, blocks, visible_pairs: int) -> float:
    h, q, kv, i = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    queries = blocks.ids.numel()
    valid = int(blocks.valid().sum())
    fc = 2 * tokens * c.fc_in_features * h * 2
    per_layer_ctx = 2 * tokens * h * 2 * kv * 3
    per_layer_block = 2 * queries * (h * (q + 2 * kv) + q * h + 3 * h * i) * 3
    attn = 2 * 2 * visible_pairs * c.head_dim * c.num_attention_heads * 3
    head = 2 * valid * h * c.vocab_size * 2
    return fc + c.num_hidden_layers * (per_layer_ctx + per_layer_block) + c.num_hidden_layers * attn + head


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_step_args(p)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--flex-mode", help="torch.compile mode for flex attention, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--flex-options", type=json.loads, help='flex kernel_options as JSON, e.g. \'{"BLOCK_M1": 64}\'')
    args = parse_step_args(p, argv)
    mask.FLEX_COMPILE_MODE, mask.FLEX_KERNEL_OPTIONS = args.flex_mode, args.flex_options
    use_compiled(args.compile)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    init_one_rank(device)
    hf = target_config(args.shape)
    layers = default_target_layers(hf.num_hidden_layers, args.layers)
    c = DFlashConfig(hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                     num_attention_heads=hf.num_attention_heads, num_key_value_heads=hf.num_key_value_heads,
                     head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                     num_hidden_layers=args.layers, rms_norm_eps=hf.rms_norm_eps, rope_theta=1e6,
                     max_position_embeddings=hf.max_position_embeddings, vocab_size=hf.vocab_size,
                     target_hidden_size=hf.hidden_size, num_target_layers=hf.num_hidden_layers,
                     target_layer_ids=layers, block_size=args.block, mask_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    draft = DFlashDraft(c).to(device)
    draft.set_target_weights(torch.randn(c.vocab_size, c.hidden_size, device=device, dtype=dtype) * 0.02,
                             torch.randn(c.vocab_size, c.hidden_size, device=device, dtype=dtype) * 0.02)
    options = DFlashOptions(block_size=args.block)
    module = shard(DFlashModule(draft, options, use_flex=cuda), dist.group.WORLD, device)
    params = [q for q in module.parameters() if q.requires_grad]
    opt = build_optimizer(params, 1e-4, 0.0, device)  # as training builds it
    rng, gen = random.Random(0), torch.Generator(device=device).manual_seed(0)
    batches = []
    for _ in range(4):
        lengths = sample_lengths(args.tokens, args.min_len, args.max_len, rng)
        t = sum(lengths)
        batch = {"input_ids": torch.randint(0, c.vocab_size, (t,), device=device, generator=gen),
                 "loss_mask": torch.rand(t, device=device, generator=gen) < 0.7,
                 "position_ids": torch.cat([torch.arange(n, device=device) for n in lengths]),
                 "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                            device=device),
                 "aux_hidden": torch.randn(t, c.fc_in_features, device=device, generator=gen).to(dtype)}
        anchors = sample_anchors(batch["loss_mask"], batch["cu_seqlens"], args.block, None,
                                 torch.Generator().manual_seed(len(batches)))
        blocks = build_blocks(batch["input_ids"], batch["loss_mask"], batch["position_ids"], batch["cu_seqlens"],
                              anchors, args.block, 0)
        pairs = int(dense_mask(blocks).sum())
        batches.append((batch, blocks, step_flops(c, t, blocks, pairs)))

    def train_step(batch_and_blocks) -> None:
        batch, blocks = batch_and_blocks
        decay = options.decay(device)
        norm = (blocks.valid().view(-1, args.block)[:, 1:].float().sum(0) * decay).sum()
        loss, _ = module(batch, blocks, norm)
        loss.backward()
        clipped_step(opt, params, 0.5)  # as training steps

    step_s, tflops = time_steps(train_step, [(b, bl) for b, bl, _ in batches], [f for _, _, f in batches],
                                args.warmup, args.steps, cuda)
    if args.profile:
        write_profile(args.profile, [(b, bl) for b, bl, _ in batches[:3]], train_step, cuda)
    report_step(f"dflash trainer step ({args.shape}, {args.tokens} tok, block {args.block}, {args.layers} layers)",
                args, step_s, tflops, cuda, compile=args.compile, flex_mode=args.flex_mode,
                flex_options=args.flex_options, block=args.block, layers=args.layers, target_layers=layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
