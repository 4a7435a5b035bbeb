"""What `train.recompute` saves: memory of one EAGLE-3 TTT step, plain and recomputed.

The draft of a conf/target shape (bf16, random weights) runs ttt_forward + backward on one packed
sample of --tokens tokens. On CUDA the figure is the peak allocated memory of the step (what the
trainer's share must hold); on CPU, where torch keeps no allocator statistics, it is the bytes of the
activations autograd keeps for backward at the end of the forward (parameters and the target table
left out; under recompute the checkpoints' own inputs, two [tokens, hidden] tensors per step, are not
seen by the hook and are added by count).

    python bench/recompute_memory.py --shape qwen3_8b --tokens 8192 --device cuda --out rc.json
    python bench/recompute_memory.py --shape qwen3_8b --tokens 128 --device cpu      # per-token bytes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.trainer import target_config  # noqa: E402
from lib.drafts.eagle3.loss import ttt_forward  # noqa: E402
from lib.drafts.eagle3.model import Eagle3Draft, Eagle3DraftConfig  # noqa: E402
from lib.drafts.eagle3.target_head import TargetHead  # noqa: E402
from lib.drafts.eagle3.vocab import build_vocab_map  # noqa: E402


def build(shape: str, tokens: int, device: torch.device, draft_vocab: int):
    hf = target_config(shape)
    layers = hf.num_hidden_layers
    cfg = Eagle3DraftConfig.from_target(hf, draft_vocab, [1, layers // 2 - 1, layers - 4])
    gen = torch.Generator().manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.set_vocab_map(*build_vocab_map(torch.randint(0, cfg.vocab_size, (cfg.vocab_size,), generator=gen),
                                         cfg.draft_vocab_size))
    draft = draft.to(device=device, dtype=torch.bfloat16)
    head = TargetHead(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen).to(device, torch.bfloat16) * 0.02,
                      draft.d2t)
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (tokens,), generator=gen).to(device),
             "loss_mask": torch.ones(tokens, dtype=torch.bool, device=device),
             "position_ids": torch.arange(tokens, device=device),
             "cu_seqlens": torch.tensor([0, tokens], dtype=torch.int32, device=device),
             "aux_hidden": torch.randn(tokens, cfg.fc_in_features, generator=gen).to(device, torch.bfloat16),
             "final_hidden": torch.randn(tokens, cfg.hidden_size, generator=gen).to(device, torch.bfloat16)}
    return draft, head, batch


def saved_bytes(draft, head, batch, ttt: int, recompute: bool) -> int:
    target = head.target_probs(batch["final_hidden"])
    owned = {t.untyped_storage().data_ptr() for t in [*draft.parameters(), *draft.buffers(), target.probs]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()  # views of one tensor counted once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = ttt_forward(draft, head, batch, ttt, target=target, recompute=recompute)
    kept = sum(seen.values())
    if recompute:  # each step's checkpoint keeps attn_out and hidden [T, H] and its rows' hidden [N, H]
        kept += 3 * ttt * batch["input_ids"].shape[0] * draft.config.hidden_size * 2
    loss.backward()
    return kept


def peak_bytes(draft, head, batch, ttt: int, recompute: bool) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = ttt_forward(draft, head, batch, ttt, recompute=recompute)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_8b")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device(args.device)
    draft, head, batch = build(args.shape, args.tokens, device, args.draft_vocab)
    measure = peak_bytes if device.type == "cuda" else saved_bytes
    what = "peak allocated bytes of the step" if device.type == "cuda" else "activation bytes kept for backward"
    result = {"shape": args.shape, "tokens": args.tokens, "ttt": args.ttt, "device": args.device, "what": what}
    for recompute in (False, True):
        draft.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        value = measure(draft, head, batch, args.ttt, recompute)
        result["recompute" if recompute else "plain"] = {"bytes": value, "step_s": time.perf_counter() - t0}
    plain, rc = result["plain"], result["recompute"]
    per_token = [r["bytes"] / args.tokens / 2**10 for r in (plain, rc)]
    print(f"{args.shape}, {args.tokens} tokens, ttt {args.ttt}, {args.device} ({what}): plain "
          f"{plain['bytes'] / 2**30:.2f} GiB in {plain['step_s']:.2f} s, recompute {rc['bytes'] / 2**30:.2f} GiB in "
          f"{rc['step_s']:.2f} s; {per_token[0]:.0f} vs {per_token[1]:.0f} KiB per token")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
