"""Who answers for tools/regenerate.py: the target's checkpoint in this process, or a server by URL.

Both take a list of conversations (role/content messages ending with the turn to answer) and return,
per conversation, (answer text, finish reason "stop"|"length"), or None when the prompt alone does
not fit --max-length (the conversation then ends there).

The built-in path takes an HF checkpoint directory or a GGUF file (or a directory holding one): a GGUF
is dequantized once, float32 on the CPU and bfloat16 on a GPU, and cached (lib/target/checkpoint.py).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator, Optional

Answer = Optional[tuple[str, str]]


def checkpoint_dir(target: str, cuda: bool) -> str:
    """The HF checkpoint directory for --target: itself, or the cached HF copy of its GGUF file."""
    from lib.target.checkpoint import convert_gguf, converted_dir, locate_gguf

    gguf = locate_gguf(target)
    if gguf is None:
        return target
    dtype = "bfloat16" if cuda else "float32"  # what the model then runs in (no fast bf16 matmuls on CPU)
    if not os.path.isfile(os.path.join(converted_dir(gguf, dtype), "config.json")):
        print(f"regenerate: --target={target!r} is a GGUF file: dequantizing it to {dtype} once (cached under "
              f"{os.path.dirname(converted_dir(gguf, dtype))})", file=sys.stderr, flush=True)
    return convert_gguf(gguf, dtype)


class LocalTarget:
    """The checkpoint on this process's GPU (LOCAL_RANK) or the CPU, decoding a batch with a KV cache."""

    def __init__(self, cfg: Any, rank: int):
        import torch
        from transformers import AutoTokenizer

        from lib.eval.sampling import StreamCounters
        from lib.eval.target import TargetRunner, stop_token_ids
        from lib.launch.runtime import cpu_threads
        from lib.target.weights import load_causal_lm

        cuda = cfg.device != "cpu" and torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise RuntimeError("--device=cuda: no GPU is visible; use --device=cpu or auto")
        # More processes than GPUs share them round-robin: a small target's decode step is launch-bound
        # (SmolLM2-135M: ~30 ms of mostly CPU per step at batch 512), so processes on one GPU overlap
        # their launches and the GPU runs the kernels of all of them.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local % torch.cuda.device_count()}" if cuda else "cpu")
        self.threads = 0 if cuda else cpu_threads(cfg.threads)  # before the load: the conversion runs on them too
        dtype = torch.bfloat16 if cuda else torch.float32  # no fast bf16 matmuls on CPU
        self.path = checkpoint_dir(cfg.target, cuda)
        self.runner = TargetRunner.from_causal_lm(load_causal_lm(self.path, dtype, self.device))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.stop_ids = stop_token_ids(self.tokenizer, self.path)
        self.cfg = cfg
        self.new_tokens, self.seconds = 0, 0.0
        self._streaming_since: Optional[float] = None
        self.counters = StreamCounters()

    def request(self, messages: list[dict]) -> Optional[tuple[list[int], int]]:
        """(prompt ids, budget of new tokens), or None when the prompt alone reaches --max-length."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  **self.cfg.chat_template_kwargs)
        # The template writes every special token itself (BOS included where the model has one).
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        budget = min(self.cfg.sampling.max_new_tokens, self.cfg.max_length - len(ids))
        return (ids, budget) if budget >= 1 else None

    def stream(self, feed: Callable[[int], list[tuple[Any, list[int], int]]], seed: int,
               sampling: Any = None) -> Iterator[tuple[Any, Answer]]:
        """Continuous batching over what feed() hands out (lib/eval/sampling.py): up to --batch-size rows,
        sampled with `sampling` (a SamplingConfig; default the answers' settings)."""
        import torch

        from lib.eval.sampling import sample_stream

        generator = torch.Generator(self.device).manual_seed(seed)
        self._streaming_since = time.perf_counter()
        try:
            for key, generated in sample_stream(self.runner, feed, self.stop_ids, sampling or self.cfg.sampling,
                                                self.cfg.batch_size, generator, self.counters,
                                                compile=self.cfg.compile):
                self.new_tokens += len(generated.tokens)
                yield key, (self.tokenizer.decode(generated.tokens, skip_special_tokens=False), generated.finish)
        finally:
            self.seconds += time.perf_counter() - self._streaming_since
            self._streaming_since = None

    def reset_stats(self) -> None:
        """Count from here: the answers' rate, without the self-instruct questions sampled before them."""
        self.new_tokens, self.seconds, self.counters = 0, 0.0, type(self.counters)()

    def stats(self) -> str:
        # Progress lines come while streaming: count the running stream's time too.
        running = time.perf_counter() - self._streaming_since if self._streaming_since is not None else 0.0
        seconds = self.seconds + running
        c = self.counters
        return (f"{self.new_tokens} new tokens in {seconds:.1f} s ({self.new_tokens / max(seconds, 1e-9):.0f} "
                f"tokens/s); {c.steps} decode steps, {c.occupancy():.1f} of {self.cfg.batch_size} rows live on average")


class ServerError(RuntimeError):
    pass


class ServerTarget:
    """POST /v1/chat/completions (tools/regenerate.py keeps up to batch_size in flight); each request is
    retried twice on a connection error or a 5xx answer, and bounded by --timeout-s."""

    RETRIES = 3

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.base = cfg.server.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.model = cfg.model or self._first_model()
        self.requests, self.new_tokens = 0, 0
        self._start: Optional[float] = None
        self._lock = threading.Lock()  # the counters, from many threads

    def _call(self, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.RETRIES):
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500 or attempt == self.RETRIES - 1:
                    raise ServerError(f"{self.base}{path}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.RETRIES - 1:
                    raise ServerError(f"{self.base}{path}: {e}; is the server up (--server)?") from None
            time.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        models = self._call("/v1/models").get("data") or []
        if not models:
            raise ServerError(f"{self.base}/v1/models lists no model; pass --model")
        return models[0]["id"]

    def _one(self, messages: list[dict], seed: int) -> Answer:
        s = self.cfg.sampling
        body = {"model": self.model, "messages": messages, "max_tokens": s.max_new_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "seed": seed}
        if self.cfg.chat_template_kwargs:
            body["chat_template_kwargs"] = self.cfg.chat_template_kwargs  # sglang and vLLM both take it
        try:
            reply = self._call("/v1/chat/completions", body)
        except ServerError as e:
            if "HTTP 400" in str(e) and ("context" in str(e).lower() or "length" in str(e).lower()):
                return None  # the prompt does not fit the server's context
            raise
        choice = reply["choices"][0]
        with self._lock:
            self.requests += 1
            self.new_tokens += int((reply.get("usage") or {}).get("completion_tokens", 0))
        return choice["message"].get("content") or "", "length" if choice.get("finish_reason") == "length" else "stop"

    def answer_one(self, messages: list[dict], seed: int) -> Answer:
        """One request (called from up to batch_size threads at once)."""
        if self._start is None:
            self._start = time.perf_counter()
        return self._one(messages, seed)

    def stats(self) -> str:
        seconds = time.perf_counter() - self._start if self._start is not None else 0.0
        return (f"{self.requests} requests to {self.base} ({self.model}), {self.new_tokens} new tokens in "
                f"{seconds:.1f} s ({self.new_tokens / max(seconds, 1e-9):.0f} tokens/s)")
