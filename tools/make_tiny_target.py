"""Build the embedded tiny target (assets/tiny_target): tokenizer, chat template and a trained Qwen3.

Steps: train a byte-level BPE tokenizer on the procedural corpus (assets/tiny_data, made by
tools/gen_corpus.py); store the tiny chat template (lib/data/templates.py) in tokenizer_config.json;
tokenise the corpus through the project's own data pipeline (lib/data/datasets.py); train a small
Qwen3ForCausalLM on the assistant tokens on CPU for a fixed number of steps (deterministic in the
seed); reload the saved files and report the held-out loss and the greedy answers' exact-match
accuracy per task family, written to docs/tiny_target.md.

    python tools/make_tiny_target.py            # the shipped model (see docs/tiny_target.md)
    python tools/make_tiny_target.py --steps 200 --out-dir /tmp/tiny   # a quick smoke build
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib.config import DataConfig  # noqa: E402
from lib.data.datasets import TokenizedDataset, load_dataset, load_heldout_prompts  # noqa: E402
from tools import gen_corpus  # noqa: E402
from lib.data.templates import TINY_CHAT_TEMPLATE_JINJA, TINY_END_OF_TURN, TINY_PAD, TINY_SPECIAL_TOKENS  # noqa: E402


KEPT_SECTION = "## Why this recipe"
PATH_OPTIONS = ("--data-dir", "--out-dir", "--report")  # where files go, not part of the recipe


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # one token per digit: numbers then share digit embeddings, which arithmetic needs
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_END_OF_TURN, pad_token=TINY_PAD,
                                   chat_template=TINY_CHAT_TEMPLATE_JINJA)
    fast.save_pretrained(out_dir)
    # keep the template inside tokenizer_config.json (readers that ignore chat_template.jinja find it)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = TINY_CHAT_TEMPLATE_JINJA
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name every transformers version resolves
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    return fast


def corpus_texts(path: str) -> list[str]:
    with open(path) as f:
        return [m["content"] for line in f for m in json.loads(line)["conversations"]]


def padded_batch(ds: TokenizedDataset, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) right-padded; labels are -100 off the loss mask."""
    width = max(ds.length(i) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        tokens, mask = ds[i]
        t = torch.tensor(tokens)
        ids[r, :len(t)] = t
        attn[r, :len(t)] = 1
        labels[r, :len(t)] = torch.where(torch.tensor(mask), t, torch.full_like(t, -100))
    return ids, attn, labels


def masked_lm_loss(model, ids, attn, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def length_bucketed_batches(ds: TokenizedDataset, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches; samples of similar length share a batch so padding stays small."""
    order = torch.randperm(len(ds), generator=gen).tolist()
    batches = []
    for c in range(0, len(order), batch_size * 32):
        chunk = sorted(order[c:c + batch_size * 32], key=ds.length)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train(model, ds: TokenizedDataset, args, pad_id: int) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    batches: list[list[int]] = []
    start, smoothed = time.time(), None
    model.train()
    for step in range(args.steps):
        if not batches:
            batches = length_bucketed_batches(ds, args.batch_size, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = masked_lm_loss(model, *(t.to(args.device) for t in padded_batch(ds, batches.pop(), pad_id)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {smoothed:.4f}  lr {lr_at(step):.2e}  {time.time() - start:6.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def heldout_loss(model, ds: TokenizedDataset, pad_id: int) -> float:
    total, count = 0.0, 0
    for b in range(0, len(ds), 64):
        batch = padded_batch(ds, list(range(b, min(b + 64, len(ds)))), pad_id)
        ids, attn, labels = (t.to(model.device) for t in batch)
        n = int((labels[:, 1:] != -100).sum())
        total += masked_lm_loss(model, ids, attn, labels).item() * n
        count += n
    return total / count


@torch.no_grad()
def greedy_accuracy(model, prompts, families: dict[str, str], end_id: int, pad_id: int) -> dict[str, tuple[int, int]]:
    """family -> (exact-match answers, prompts): greedy decoding until the end-of-turn token."""
    score: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in range(0, len(prompts), 32):
        group = prompts[b:b + 32]
        width = max(len(p.prompt_ids) for p in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(group):  # left padding: every prompt ends where generation starts
            ids[r, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            attn[r, width - len(p.prompt_ids):] = 1
        longest = max(len(p.reference_ids) for p in group)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), max_new_tokens=longest + 8, do_sample=False,
                             eos_token_id=end_id, pad_token_id=pad_id)[:, width:].tolist()
        for p, gen in zip(group, out):
            answer = gen[:gen.index(end_id) + 1] if end_id in gen else gen
            fam = families[p.sample_id]
            score[fam][0] += answer == p.reference_ids
            score[fam][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(score.items())}


def write_report(path: str, command: str, shape: dict, loss: float, acc: dict, seconds: float, args,
                 device_name: str) -> None:
    right, total = sum(a for a, _ in acc.values()), sum(n for _, n in acc.values())
    rows = "\n".join(f"| {fam} | {a}/{n} | {100 * a / n:.1f}% |" for fam, (a, n) in acc.items())
    text = f"""# The embedded tiny target

`assets/tiny_target` is a small Qwen3ForCausalLM trained by this project on its own procedural corpus
(`assets/tiny_data`, generated by `tools/gen_corpus.py`), so the whole pipeline runs offline on a CPU
and speculative decoding has a target whose answers are mostly right and predictable. It loads
offline with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.

Reproduce (seed {args.seed}; this run took {seconds / 60:.1f} min on {device_name}; GPU kernels are not
bitwise deterministic, so a rerun gives a model of the same quality, not the same bytes):

```
python tools/gen_corpus.py
{command}
```

## Shape

| key | value |
| --- | --- |
{chr(10).join(f"| {k} | {v} |" for k, v in shape.items())}

Default EAGLE-3 aux layers `[1, L/2-1, L-4]` = `[1, {shape['num_hidden_layers'] // 2 - 1}, {shape['num_hidden_layers'] - 4}]`.

Tokenizer: byte-level BPE (`tokenizers`), digits split one per token, special tokens
{", ".join(f"`{t}`" for t in TINY_SPECIAL_TOKENS)}; `eos_token` = `{TINY_END_OF_TURN}`.
Chat template (the `tiny` template of `lib/data/templates.py`, in `tokenizer_config.json`):
`<|role|>content<|end|>` per message, generation prompt `<|assistant|>`, nothing between turns.

## Training

{args.steps} AdamW steps of {args.batch_size} conversations (lr {args.lr}, warmup 5%, cosine to 5%),
loss on assistant tokens only (the data pipeline's loss mask), seed {args.seed}, on
{f"{args.generated} conversations freshly generated by tools/gen_corpus.py (seed {args.seed + 7919}, held-out prompts excluded)" if args.generated else "assets/tiny_data/train.jsonl"}.
The tokenizer is trained on assets/tiny_data/train.jsonl either way.

## Held-out results (assets/tiny_data/heldout.jsonl: prompts disjoint from training)

Masked held-out loss (assistant tokens, nats/token): **{loss:.4f}**

Greedy exact-match accuracy of the last assistant answer (token for token, end-of-turn included),
by task family: **{right}/{total} = {100 * right / total:.1f}%** overall.

| family | right | accuracy |
| --- | --- | --- |
{rows}

Families with few possible questions (weekday, month, reverse, uppercase) appear in the held-out set
mostly in new contexts (another system message or earlier turns), since most of their bare questions
are already in the training set.
"""
    if os.path.exists(path):  # keep the hand-written comparison of recipes that follows the results
        with open(path) as f:
            previous = f.read()
        if KEPT_SECTION in previous:
            text += "\n" + previous[previous.index(KEPT_SECTION):]
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(REPO_ROOT, "assets", "tiny_data"))
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "assets", "tiny_target"))
    ap.add_argument("--report", default=os.path.join(REPO_ROOT, "docs", "tiny_target.md"),
                    help="markdown results file ('' to skip)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--generated", type=int, default=300000,
                    help="train on this many freshly generated conversations instead of the shipped train.jsonl")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    args = ap.parse_args(argv)
    if args.layers < 5:
        ap.error(f"--layers={args.layers}: use >= 5 so the default aux layers [1, L/2-1, L-4] exist")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error(f"--hidden={args.hidden} must divide by --heads={args.heads}, which must divide by --kv-heads")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.time()
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(args.out_dir, exist_ok=True)
    train_path, heldout_path = (os.path.join(args.data_dir, n) for n in ("train.jsonl", "heldout.jsonl"))
    tokenizer = train_tokenizer(corpus_texts(train_path), args.vocab_size, args.out_dir)
    end_id, pad_id = tokenizer.convert_tokens_to_ids(TINY_END_OF_TURN), tokenizer.pad_token_id
    if args.generated:  # fresh conversations from the same generator, never a held-out prompt
        with open(heldout_path) as f:
            exclude = {gen_corpus.prompt_key(json.loads(line)["conversations"]) for line in f}
        train_path = os.path.join(tempfile.mkdtemp(prefix="tiny_target_"), "train.jsonl")
        gen_corpus.write_jsonl(train_path, gen_corpus.generate(args.generated, args.seed + 7919, "gen", exclude))
    data_cfg = DataConfig(path=train_path, heldout_path=heldout_path, template="tiny", max_length=256)
    train_ds = load_dataset(data_cfg, args.out_dir, "train")
    heldout_ds = load_dataset(data_cfg, args.out_dir, "heldout")
    # rounded up to a multiple of 64 like real checkpoints: the embedding has rows no token uses
    shape = dict(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, max_position_embeddings=1024, tie_word_embeddings=True)
    config = Qwen3Config(**shape, rope_theta=10000.0, bos_token_id=None, eos_token_id=end_id, pad_token_id=pad_id)
    model = Qwen3ForCausalLM(config).to(args.device)
    print(f"tiny target: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_ds)} train / {len(heldout_ds)} held-out conversations", flush=True)
    train(model, train_ds, args, pad_id)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = end_id, pad_id
    model.save_pretrained(args.out_dir)

    # score what was saved, loaded the way every user of the target loads it
    saved = AutoModelForCausalLM.from_pretrained(args.out_dir).to(args.device).eval()
    loss = heldout_loss(saved, heldout_ds, pad_id)
    with open(heldout_path) as f:
        families = {r["id"]: r["tasks"][-1] for r in map(json.loads, f)}
    prompts = load_heldout_prompts(data_cfg, args.out_dir, len(heldout_ds))
    acc = greedy_accuracy(saved, prompts, families, end_id, pad_id)
    seconds = time.time() - began
    print(f"held-out loss {loss:.4f}; greedy exact match " +
          ", ".join(f"{k} {a}/{n}" for k, (a, n) in acc.items()) + f"; {seconds:.0f}s", flush=True)
    if args.report:
        given = argv if argv is not None else sys.argv[1:]
        recipe = [a for i, a in enumerate(given) if not (a.startswith(PATH_OPTIONS) or
                                                         (i > 0 and given[i - 1] in PATH_OPTIONS))]
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
        write_report(args.report, " ".join(["python tools/make_tiny_target.py"] + recipe), shape, loss, acc,
                     seconds, args, device_name)


if __name__ == "__main__":
    main()
