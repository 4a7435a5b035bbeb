"""Answer every conversation of a JSON Lines data set with the target's own responses.

    # the built-in path: the target's checkpoint, batched decoding with a KV cache, one shard per process
    torchrun --standalone --nproc_per_node=8 tools/regenerate.py --target /models/Qwen3-8B \\
        --input sharegpt.jsonl --output regen.jsonl --max-new-tokens 2048 --temperature 0.7 --top-p 0.95
    python tools/regenerate.py --target assets/tiny_target --input in.jsonl --output out.jsonl   # one process
    # a small target on one GPU: 4 processes share it (its decode step is launch-bound, see below)
    torchrun --standalone --nproc_per_node=4 tools/regenerate.py --target model.gguf --input ... --output ...
    # a GGUF file (or a directory holding one) works as --target too: dequantized once and cached
    python tools/regenerate.py --target model.gguf --input in.jsonl --output out.jsonl --threads 4
    # no data: the target writes 1000 questions itself, then answers them (tools/self_instruct.py)
    python tools/regenerate.py --target /models/Qwen3-8B --self-instruct 1000 --output out.jsonl
    # an OpenAI-compatible server the user already runs (sglang, vLLM), by URL
    python tools/regenerate.py --server http://127.0.0.1:30000 --model Qwen/Qwen3-8B --input ... --output ...

Every assistant turn is replaced, in order, by the target's answer to the conversation so far (with
the earlier answers already replaced); a conversation that ends with a user turn gets an answer
appended. Lines keep their format (role/content or ShareGPT from/value) and their other keys, and
gain "regenerated": the sampling settings, the source line and each answer's finish reason.

Resumable: each process appends finished lines to OUTPUT.part-<rank> as it goes; a later run skips
every line already in OUTPUT or a part file (whatever the number of processes) and refuses other
sampling settings. When all lines are done, rank 0 merges the parts into OUTPUT in input order.
Lines that cannot be answered (malformed, pre-formatted text, prompt longer than --max-length) are
left out and counted in OUTPUT.report.json.

--self-instruct N samples N user turns from the target first (OUTPUT.self_instruct.jsonl, reused by a
rerun) and answers them after --input's lines, if any; tools/self_instruct.py says how they are chosen.
With more processes than GPUs, process r decodes on GPU r mod #GPUs: a small target's decode step
is bound by the CPU launching kernels, and processes sharing a GPU overlap those launches.
On the CPU, --threads sets torch's thread count (0: one per two cores, lib/launch/runtime.py).
"""
from __future__ import annotations

import glob
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.data.records import SHAREGPT_ROLES  # noqa: E402
from lib.eval.sampling import SamplingError  # noqa: E402
from tools import self_instruct  # noqa: E402
from tools.regen_args import RegenConfig, RegenError, build_parser, to_config  # noqa: E402
from tools.regen_backends import LocalTarget, ServerTarget  # noqa: E402
from tools.self_instruct import SelfInstructError  # noqa: E402


# ---- lines in, lines out ----

@dataclass
class Conversation:
    line: int  # 0-based input line
    obj: dict  # the input line's object
    sharegpt: bool
    messages: list[dict]  # role/content, normalised
    answers: list[str] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    turn: int = 0  # next message index to look at
    history: list[dict] = field(default_factory=list)  # messages with the answers so far

    def next_prompt(self) -> Optional[list[dict]]:
        """The messages to answer next, or None when the conversation is done."""
        while self.turn < len(self.messages):
            m = self.messages[self.turn]
            if m["role"] == "assistant" and self.history:
                return self.history
            if m["role"] != "assistant":
                self.history.append(m)
            self.turn += 1
        if self.history and self.history[-1]["role"] == "user" and self.turn == len(self.messages):
            self.turn += 1  # the answer to a final user turn is appended
            return self.history
        return None

    def turns_left(self) -> int:
        """Answers still to write (an upper bound: a prompt may end the conversation at --max-length)."""
        asked = self.messages[self.turn:]
        ending = 1 if asked and asked[-1]["role"] == "user" else 0
        return sum(m["role"] == "assistant" for m in asked) + ending

    def answer(self, text: str, finish: str) -> None:
        self.answers.append(text)
        self.finish.append(finish)
        self.history = self.history + [{"role": "assistant", "content": text}]
        self.turn += 1

    def stop_here(self) -> None:
        self.turn = len(self.messages) + 1

    def result(self, settings: dict) -> dict:
        turns, answers = [], iter(self.answers)
        key_role, key_text = ("from", "value") if self.sharegpt else ("role", "content")
        assistant = "gpt" if self.sharegpt else "assistant"
        seen_user = False
        for original in self.obj["conversations"]:
            seen_user = seen_user or _role(original) == "user"
            if _role(original) == "assistant" and not seen_user:
                continue  # an answer to nothing: next_prompt() skipped it too
            if _role(original) == "assistant":
                text = next(answers, None)
                if text is None:
                    break
                turns.append({**original, key_text: text})
            else:
                turns.append(original)
        turns += [{key_role: assistant, key_text: text} for text in answers]
        # A conversation cut by --max-length ends at its last answer.
        while turns and _role(turns[-1]) != "assistant":
            turns.pop()
        return {**self.obj, "conversations": turns,
                "regenerated": {**settings, "source_line": self.line + 1, "finish": self.finish}}


def _role(turn: dict) -> Optional[str]:
    return turn.get("role") if "role" in turn else SHAREGPT_ROLES.get(turn.get("from"))


def parse(line_no: int, text: str) -> Conversation | str:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return "malformed_json"
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list) or not obj["conversations"]:
        return "no_conversations"  # pre-formatted {"text"} lines have no turns to answer
    messages, sharegpt = [], False
    for turn in obj["conversations"]:
        if not isinstance(turn, dict):
            return "malformed_turn"
        sharegpt = sharegpt or "from" in turn
        role, content = _role(turn), turn.get("content", turn.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            return "malformed_turn"
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        return "no_user_turn"
    return Conversation(line_no, obj, sharegpt, messages)


# ---- resume: part files and the merged output ----

def part_path(output: str, rank: int) -> str:
    return f"{output}.part-{rank}"


def read_done(cfg: RegenConfig) -> tuple[dict[int, dict], dict[int, str]]:
    """(answered lines by 0-based input line, skipped lines with their reason) from OUTPUT, its report
    and every part file; a torn last line of a part (a killed run) is ignored and answered again."""
    done: dict[int, dict] = {}
    skipped: dict[int, str] = {}
    if os.path.exists(cfg.output):
        with open(cfg.output) as f:
            for text in f:
                obj = json.loads(text)
                done[obj["regenerated"]["source_line"] - 1] = obj
    report = cfg.output + ".report.json"
    if os.path.exists(report):
        with open(report) as f:
            skipped.update({int(k) - 1: v for k, v in json.load(f)["skipped_lines"].items()})
    for path in glob.glob(glob.escape(cfg.output) + ".part-*"):
        with open(path) as f:
            for text in f:
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if "skipped" in rec:
                    skipped[rec["line"]] = rec["skipped"]
                else:
                    done[rec["line"]] = rec["out"]
    want = cfg.record()
    for obj in list(done.values())[:1]:
        have = {k: obj["regenerated"].get(k) for k in want}
        changed = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if changed:
            raise RegenError(f"{cfg.output} holds lines answered with other settings ("
                             + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                             + "); use the same settings to resume, or another --output")
    return done, skipped


class PartWriter:
    """Appends this process's finished lines, one flushed JSON line each, after cutting a torn tail."""

    def __init__(self, path: str):
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        self._file = open(path, "a", buffering=1)

    def answered(self, line: int, obj: dict) -> None:
        self._file.write(json.dumps({"line": line, "out": obj}, ensure_ascii=False) + "\n")

    def skipped(self, line: int, reason: str) -> None:
        self._file.write(json.dumps({"line": line, "skipped": reason}) + "\n")

    def close(self) -> None:
        self._file.close()


def merge(cfg: RegenConfig, total_lines: int) -> dict:
    """All lines done: OUTPUT in input order (written whole, then renamed), the report, parts removed."""
    done, skipped = read_done(cfg)
    missing = [i + 1 for i in range(total_lines) if i not in done and i not in skipped]
    report = {"input": cfg.input, "lines": total_lines, "answered": len(done), "skipped": len(skipped),
              "skipped_lines": {str(i + 1): r for i, r in sorted(skipped.items())}, "settings": cfg.record(),
              "missing": missing[:20]}
    if missing:
        return report  # a --max-lines run: the parts stay for the next run
    tmp = cfg.output + ".tmp"
    with open(tmp, "w") as f:
        for i in sorted(done):
            f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
    with open(cfg.output + ".report.json", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, cfg.output)
    for path in glob.glob(glob.escape(cfg.output) + ".part-*"):
        os.unlink(path)
    return report


# ---- the run ----

PROGRESS_EVERY_S = 60.0  # a progress line per process at most this often

def answer_lines(cfg: RegenConfig, backend: Any, conversations: list[Conversation], writer: PartWriter) -> int:
    """Answer every conversation, turn by turn; returns the number of answers.

    Built-in path: continuous batching of up to batch_size rows, a conversation's next turn joining as
    soon as its answer is done. Server path: batch_size conversations in flight, each going through its
    turns on its own, so a long answer holds up only its own conversation (the server batches).
    """
    settings, answers = cfg.record(), 0
    progress = {"done": 0, "shown": time.monotonic()}
    # Longest first: a conversation's turns are answered one after another, so one that starts late
    # with many turns would decode almost alone at the end while the batch stands empty.
    conversations = sorted(conversations, key=lambda c: (-c.turns_left(), -sum(len(m["content"]) for m in c.messages)))

    def finish(conv: Conversation) -> None:
        if conv.answers:
            writer.answered(conv.line, conv.result(settings))
        else:
            writer.skipped(conv.line, "prompt_too_long")
        progress["done"] += 1
        if time.monotonic() - progress["shown"] >= PROGRESS_EVERY_S:
            progress["shown"] = time.monotonic()
            print(f"regenerate[{os.environ.get('RANK', '0')}]: {progress['done']}/{len(conversations)} "
                  f"conversations, {backend.stats()}", file=sys.stderr, flush=True)

    def take(conv: Conversation, result) -> int:
        if result is None:  # the prompt alone reaches --max-length (or the server's context)
            conv.stop_here()
            return 0
        conv.answer(*result)
        return 1

    if hasattr(backend, "answer_one"):
        lock = threading.Lock()

        def one(conv: Conversation) -> int:
            count = 0
            while (prompt := conv.next_prompt()) is not None:
                count += take(conv, backend.answer_one(prompt, cfg.sampling.seed + conv.line + count))
            with lock:
                finish(conv)
            return count

        with ThreadPoolExecutor(max_workers=min(cfg.batch_size, len(conversations))) as pool:
            return sum(pool.map(one, conversations))
    queue = deque(conversations)

    def feed(n: int) -> list:
        """Up to n prompts: the next turn of conversations that got an answer first, then new ones."""
        out = []
        while queue and len(out) < n:
            conv = queue.popleft()
            prompt = conv.next_prompt()
            if prompt is None:
                finish(conv)
                continue
            request = backend.request(prompt)
            if request is None:
                take(conv, None)
                queue.appendleft(conv)  # to be finished with the turns it has
                continue
            out.append((conv, *request))
        return out

    for conv, result in backend.stream(feed, seed=cfg.sampling.seed + conversations[0].line):
        answers += take(conv, result)
        queue.appendleft(conv)
    return answers


def parse_args(argv: list[str]) -> RegenConfig:
    return to_config(build_parser(__doc__).parse_args(argv))


def main(argv: list[str]) -> int:
    try:
        cfg = parse_args(argv)
    except (RegenError, SamplingError) as e:
        print(f"regenerate: {e}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        # Only to agree on the end (the decoding needs no collective). Shards finish hours apart on a
        # large data set, so the barrier gets a long timeout; torchrun ends every rank if one fails.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    backend = None
    if cfg.server:
        backend = ServerTarget(cfg)  # asks the server for its model name when --model is not given
        cfg = replace(cfg, model=backend.model)
        backend.cfg = cfg
    if cfg.self_instruct:
        if rank == 0:
            try:
                backend = self_instruct.prepare_input(cfg, lambda: LocalTarget(cfg, rank))
            except SelfInstructError as e:
                print(f"regenerate: {e}", file=sys.stderr)
                return 2  # torchrun then ends the ranks waiting below
        if world > 1:
            dist.barrier()  # the other ranks read the files rank 0 just wrote
        cfg = replace(cfg, input=self_instruct.input_path(cfg.output, cfg.input is not None))
    with open(cfg.input) as f:
        lines = f.read().splitlines()
    done, skipped = read_done(cfg)
    todo = [i for i in range(len(lines)) if i not in done and i not in skipped]
    if cfg.max_lines:
        todo = todo[:cfg.max_lines]
    mine = todo[rank::world]
    writer = PartWriter(part_path(cfg.output, rank))
    conversations = []
    for i in mine:
        parsed = parse(i, lines[i])
        if isinstance(parsed, str):
            writer.skipped(i, parsed)
        else:
            conversations.append(parsed)
    print(f"regenerate[{rank}/{world}]: {len(lines)} lines, {len(done)} already answered, {len(skipped)} skipped, "
          f"{len(mine)} for this process", file=sys.stderr)
    if conversations:
        backend = backend or LocalTarget(cfg, rank)
        answers = answer_lines(cfg, backend, conversations, writer)
        print(f"regenerate[{rank}/{world}]: {answers} answers, {backend.stats()}", file=sys.stderr)
    writer.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        report = merge(cfg, len(lines))
        where = cfg.output if not report["missing"] else f"{cfg.output}.part-* (run again to go on)"
        print(f"regenerate: {report['answered']}/{report['lines']} lines answered, {report['skipped']} skipped -> "
              f"{where}", file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from lib.launch.exiting import exit_without_teardown

    # Only as a program: main() has closed its part file and left its process group.
    exit_without_teardown(main(sys.argv[1:]))
