"""tools/regenerate.py: the target answers every conversation (tiny target, and a loopback OpenAI-compatible
server), lines keep their format, settings are recorded, and a second run skips what is done."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lib.config import TINY_DATA_DIR, TINY_TARGET_DIR
from tests.helpers import REPO, TORCHRUN, cpu_env, smollm2_gguf
from tools import regenerate
from tools.regenerate import RegenError, main

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() on the CPU path sets torch's thread count (--threads); later tests keep their own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SHAREGPT = {"id": "sg", "conversations": [{"from": "human", "value": "Spell 'cat' backwards."},
                                          {"from": "gpt", "value": "tac"}, {"from": "human", "value": "Add 2 and 3."}]}


def write_input(path, n: int = 7) -> list[dict]:
    with open(os.path.join(TINY_DATA_DIR, "heldout.jsonl")) as f:
        objs = [json.loads(x) for x in f.read().splitlines()[:n]]
    objs += [SHAREGPT]
    with open(path, "w") as f:
        for obj in objs:
            f.write(json.dumps(obj) + "\n")
        f.write('{"text": "pre-formatted, nothing to answer"}\n')
    return objs


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.mark.integration
def test_tiny_target_round_trip_sharded_then_resumed(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    objs = write_input(src)
    args = [os.path.join(REPO, "tools", "regenerate.py"), "--target", TINY_TARGET_DIR, "--input", str(src),
            "--output", str(out), "--max-new-tokens", "24", "--batch-size", "3", "--device", "cpu"]
    # Two ranks answer the first 5 pending lines between them, then stop: parts stay, no output yet.
    first = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2", *args, "--max-lines", "5"], cwd=REPO,
                           env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not out.exists() and (tmp_path / "out.jsonl.part-0").exists() and (tmp_path / "out.jsonl.part-1").exists()
    parted = {json.loads(x)["line"]: x for p in ("part-0", "part-1") for x in open(tmp_path / f"out.jsonl.{p}")}
    assert sorted(parted) == [0, 1, 2, 3, 4]
    # One process finishes the rest; the lines answered before are kept, not answered again. (main() in
    # this process: the program's own start and exit were the sharded run's.)
    capsys.readouterr()
    assert main(args[1:]) == 0
    assert "5 already answered" in capsys.readouterr().err
    lines = read_jsonl(out)
    assert [o["regenerated"]["source_line"] for o in lines] == list(range(1, len(objs) + 1))
    assert [json.dumps(o) for o in lines[:5]] == [json.dumps(json.loads(parted[i])["out"]) for i in range(5)]
    for before, after in zip(objs, lines):
        assert after["id"] == before["id"] and after.get("tasks") == before.get("tasks")
        assert after["regenerated"]["temperature"] == 0.0 and after["regenerated"]["max_new_tokens"] == 24
        roles = [t.get("role", t.get("from")) for t in after["conversations"]]
        assert roles[-1] in ("assistant", "gpt")
    sg = lines[-1]["conversations"]
    assert [t["from"] for t in sg] == ["human", "gpt", "human", "gpt"]  # ShareGPT stays ShareGPT, answer appended
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["skipped_lines"] == {str(len(objs) + 1): "no_conversations"} and report["answered"] == len(objs)
    assert not list(tmp_path.glob("out.jsonl.part-*"))
    # Greedy answers are the target's own greedy decoding of the same prompt.
    check_greedy(lines[0])
    # A third run has nothing left to do and leaves the output as it was.
    before = out.read_text()
    assert main(args[1:]) == 0 and "0 for this process" in capsys.readouterr().err and out.read_text() == before


def check_greedy(line: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.eval.spec_decode import greedy_decode
    from lib.eval.target import stop_token_ids

    tok = AutoTokenizer.from_pretrained(TINY_TARGET_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32)
    messages = line["conversations"][:-1]
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(tok, TINY_TARGET_DIR)
    (ids,) = greedy_decode(model, [prompt], 24, stops)
    ids = ids[:-1] if ids and ids[-1] in stops else ids
    assert tok.decode(ids, skip_special_tokens=False) == line["conversations"][-1]["content"]


class FakeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers with the last user message reversed."""

    bodies: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, obj: dict, code: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "loopback-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.bodies.append(body)
        text = body["messages"][-1]["content"][::-1]
        self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}], "usage": {"completion_tokens": len(text)}})


@pytest.fixture
def server():
    FakeServer.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_server_path_against_a_loopback_server(tmp_path, server, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    objs = write_input(src, n=4)
    args = ["--server", server, "--input", str(src), "--output", str(out), "--temperature", "0.7", "--top-p", "0.9",
            "--max-new-tokens", "64", "--batch-size", "2", "--chat-template-kwargs", '{"enable_thinking": false}']
    assert main(args + ["--max-lines", "2"]) == 0
    assert not out.exists()
    sent = len(FakeServer.bodies)
    assert main(args) == 0
    lines = read_jsonl(out)
    assert len(lines) == len(objs)
    # Every request carried the settings; every assistant turn is the server's answer to the turns before it.
    assert {b["model"] for b in FakeServer.bodies} == {"loopback-model"}
    assert all(b["temperature"] == 0.7 and b["top_p"] == 0.9 and b["max_tokens"] == 64 for b in FakeServer.bodies)
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in FakeServer.bodies)
    for line in lines:
        turns = line["conversations"]
        key = "content" if "content" in turns[0] else "value"
        for i, t in enumerate(turns):
            if t.get("role", t.get("from")) in ("assistant", "gpt"):
                asked = [u for u in turns[:i] if u.get("role", u.get("from")) in ("user", "human")][-1]
                assert t[key] == asked[key][::-1]
        assert line["regenerated"]["model"] == "loopback-model" and line["regenerated"]["top_p"] == 0.9
    answers = sum(len(r["regenerated"]["finish"]) for r in lines)
    assert len(FakeServer.bodies) == answers  # the second run asked only for the lines the first left
    assert sent < answers
    # Done: a third run sends nothing; other sampling settings are refused, naming them.
    assert main(args) == 0 and len(FakeServer.bodies) == answers
    with pytest.raises(RegenError, match=r"temperature: 0.7 there, 1.0 now"):
        regenerate.read_done(regenerate.parse_args([*args[:-6], "--temperature", "1.0", "--model", "loopback-model"]))


def test_conversations_with_most_turns_are_started_first(tmp_path, server, monkeypatch):
    """A conversation's turns are answered one after another: the longest chains start first, so the
    batch does not end with one long conversation decoding alone."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    one = {"conversations": [{"role": "user", "content": "one"}]}
    three = {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                               {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"},
                               {"role": "user", "content": "c"}]}
    two = {"conversations": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "q"},
                             {"role": "user", "content": "r"}]}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(o) + "\n" for o in (one, two, three)))
    assert main(["--server", server, "--input", str(src), "--output", str(out), "--batch-size", "1"]) == 0
    asked = [b["messages"][-1]["content"] for b in FakeServer.bodies]
    assert asked == ["a", "b", "c", "p", "r", "one"]
    assert [len(o["regenerated"]["finish"]) for o in read_jsonl(out)] == [1, 2, 3]


def test_a_torn_part_line_is_answered_again(tmp_path):
    part = tmp_path / "out.jsonl.part-0"
    part.write_text(json.dumps({"line": 0, "skipped": "malformed_json"}) + "\n" + '{"line": 1, "out": {"conv')
    src = tmp_path / "in.jsonl"
    src.write_text("x\n")
    cfg = regenerate.parse_args(["--server", "http://127.0.0.1:9", "--input", str(src), "--output",
                                 str(tmp_path / "out.jsonl")])
    done, skipped = regenerate.read_done(cfg)
    assert done == {} and skipped == {0: "malformed_json"}
    writer = regenerate.PartWriter(str(part))
    writer.skipped(1, "no_user_turn")
    writer.close()
    assert [json.loads(x)["line"] for x in part.read_text().splitlines()] == [0, 1]


def test_settings_are_checked():
    with pytest.raises(RegenError, match="exactly one"):
        regenerate.parse_args(["--input", __file__, "--output", "/tmp/x.jsonl"])
    with pytest.raises(RegenError, match="--compile: only the built-in path"):
        regenerate.parse_args(["--server", "http://127.0.0.1:9", "--input", __file__, "--output", "/tmp/x.jsonl",
                               "--compile"])
    from lib.eval.sampling import SamplingError
    with pytest.raises(SamplingError, match=r"top_p=0.0: must be in \(0, 1\]"):
        regenerate.parse_args(["--server", "http://127.0.0.1:9", "--input", __file__, "--output", "/tmp/x.jsonl",
                               "--top-p", "0"])


@pytest.mark.parametrize("max_batch", [1, 2, 8])
def test_continuous_batching_decodes_each_row_as_alone(max_batch):
    """Rows join a running batch as others finish (different prompt lengths, budgets and stop tokens);
    every row's greedy output equals greedy_decode of its prompt alone. A tiny top_p is greedy too."""
    from transformers import AutoModelForCausalLM

    from lib.eval.sampling import SamplingConfig, StreamCounters, sample_stream
    from lib.eval.spec_decode import greedy_decode
    from lib.eval.target import TargetRunner

    model = AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32)
    runner = TargetRunner.from_causal_lm(model)
    prompts = [[5, 9, 3, 7, 11], [4, 8], [6, 6, 6], [12, 40, 41, 42, 43, 44, 45, 46], [7], [3, 3, 9, 27]]
    budgets = [12, 5, 20, 3, 16, 9]
    want = greedy_decode(runner, prompts, max(budgets))
    stop = want[2][6]  # a token the third row emits: it ends there ("stop"), other rows may too
    pending = [(i, p, b) for i, (p, b) in enumerate(zip(prompts, budgets))]

    def feed(n):
        taken = pending[:n]
        del pending[:n]
        return taken

    for cfg in (SamplingConfig(), SamplingConfig(temperature=1.0, top_p=1e-6)):
        pending[:] = [(i, p, b) for i, (p, b) in enumerate(zip(prompts, budgets))]
        counters = StreamCounters()
        got = dict(sample_stream(runner, feed, [stop], cfg, max_batch, torch.Generator().manual_seed(0), counters))
        # Every live row takes one token per step, or stops there.
        assert counters.rows == sum(len(r.tokens) + (r.finish == "stop") for r in got.values())
        assert counters.occupancy() <= max_batch and counters.steps >= counters.rows / max_batch
        for i, w in enumerate(want):
            w = w[:budgets[i]]
            expect = w[:w.index(stop)] if stop in w else w
            assert got[i].tokens == expect, (i, got[i].tokens, expect)
            assert got[i].finish == ("stop" if stop in w else "length")


def test_compiled_decoding_writes_the_same_answers(tmp_path):
    """--compile (the lean decode steps compiled) answers as the eager path does, on CPU in fp32."""
    from transformers import AutoModelForCausalLM

    from lib.eval.target import TargetRunner

    tiny = TargetRunner.from_causal_lm(AutoModelForCausalLM.from_pretrained(TINY_TARGET_DIR, dtype=torch.float32))
    assert tiny.lean_decoder(compile=True).compiled is not None  # the tiny target takes the compiled steps
    src = tmp_path / "in.jsonl"
    write_input(src, n=4)
    outputs = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert main(["--target", TINY_TARGET_DIR, "--input", str(src), "--output", str(out), "--max-new-tokens", "16",
                     "--batch-size", "3", "--device", "cpu", *flags]) == 0
        outputs[bool(flags)] = [o["conversations"][-1] for o in read_jsonl(out)]
    assert len(outputs[True]) == 5 and outputs[True] == outputs[False]


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    parser = regenerate.build_parser(regenerate.__doc__)
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    assert text.count("(default: ") == len(options)
    for shown in ("--threads THREADS built-in path on the CPU: torch threads (0: one per two cores) (default: 0)",
                  "--temperature TEMPERATURE 0 = greedy (default: 0.0)", "(default: 96)",
                  "--self-instruct N", "python tools/regenerate.py --target model.gguf"):
        assert shown in text



def test_a_gguf_file_or_its_directory_is_a_target(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    gguf = smollm2_gguf()
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, n=1)  # one chat line, one ShareGPT line, one pre-formatted line
    assert main(["--target", gguf, "--input", str(src), "--output", str(out), "--max-new-tokens", "4",
                 "--device", "cpu", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    lines = read_jsonl(out)
    assert len(lines) == 2 and all(o["regenerated"]["model"] == os.path.basename(gguf) for o in lines)
    assert all(o["regenerated"]["finish"][-1] in ("stop", "length") for o in lines)
    # A directory holding the file is accepted too; one holding neither a checkpoint nor a GGUF names both.
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / os.path.basename(gguf)).symlink_to(gguf)
    cfg = regenerate.parse_args(["--target", str(folder), "--input", str(src), "--output", str(out)])
    assert cfg.target == str(folder)
    with pytest.raises(RegenError, match=r"neither an HF checkpoint directory \(config.json\) nor a GGUF file"):
        regenerate.parse_args(["--target", str(tmp_path), "--input", str(src), "--output", str(out)])
