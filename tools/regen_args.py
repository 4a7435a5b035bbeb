"""tools/regenerate.py's command line: the options, their checks and RegenConfig (what a run uses).

Every check raises RegenError (or lib.eval.sampling.SamplingError) with one line naming the option,
its value and the fix, before anything is loaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from lib.eval.sampling import SamplingConfig
from lib.target.checkpoint import locate_gguf
from tools import self_instruct


class RegenError(ValueError):
    """A setting or a file is wrong; the message names it, its value and the fix."""


@dataclass(frozen=True)
class RegenConfig:
    input: Optional[str]  # None only with self_instruct
    output: str
    sampling: SamplingConfig
    target: Optional[str] = None  # local HF checkpoint directory, or a GGUF file (or a directory holding one)
    server: Optional[str] = None  # base URL of an OpenAI-compatible server
    model: Optional[str] = None  # the model name the server serves (default: its first)
    batch_size: int = 32  # conversations decoded together (built-in path) or requests in flight (server)
    max_length: int = 8192  # prompt + answer tokens (built-in path); longer prompts end the conversation there
    max_lines: int = 0  # >0: answer at most this many pending lines in this run (a trial, or a time budget)
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": false} for Qwen3
    device: str = "auto"
    timeout_s: float = 600.0  # one server request
    compile: bool = False  # built-in path: the lean decode steps compiled (lib/eval/compiled_decode.py)
    threads: int = 0  # built-in path on the CPU: torch threads (0: one per two cores)
    self_instruct: int = 0  # >0: the target writes this many questions first (tools/self_instruct.py)
    self_instruct_sampling: Optional[SamplingConfig] = None  # how those questions are sampled
    self_instruct_seeds: Optional[str] = None  # JSON Lines whose first user turns open the questions
    self_instruct_seed_words: int = 4  # words of each seed's opening

    def __post_init__(self) -> None:
        if (self.target is None) == (self.server is None):
            raise RegenError("--target/--server: give exactly one (a local checkpoint directory or GGUF file, or "
                             "the URL of an OpenAI-compatible server such as sglang or vLLM)")
        if self.target is not None:
            self._check_target()
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise RegenError(f"--server={self.server!r}: must be a URL, e.g. http://127.0.0.1:30000")
        if self.server is not None and self.compile:
            raise RegenError("--compile: only the built-in path (--target) decodes here; drop it with --server")
        if self.self_instruct_seeds is not None and not self.self_instruct:
            raise RegenError(f"--self-instruct-seeds={self.self_instruct_seeds!r}: seeds open self-instruct "
                             "questions; add --self-instruct N")
        if self.self_instruct_seeds is not None and not os.path.isfile(self.self_instruct_seeds):
            raise RegenError(f"--self-instruct-seeds={self.self_instruct_seeds!r}: file not found; point it at a "
                             "JSON Lines file of conversations (e.g. tools/real_prompts.py's train.jsonl)")
        if self.self_instruct_seed_words < 1:
            raise RegenError(f"--self-instruct-seed-words={self.self_instruct_seed_words}: must be >= 1, e.g. 4")
        if self.input is None and not self.self_instruct:
            raise RegenError("--input: missing; give a JSON Lines data set, or --self-instruct N to have the target "
                             "write N questions itself")
        if self.input is not None and not os.path.isfile(self.input):
            raise RegenError(f"--input={self.input!r}: file not found; point it at a JSON Lines data set")
        if self.input is not None and os.path.abspath(self.input) == os.path.abspath(self.output):
            raise RegenError(f"--output={self.output!r}: must differ from --input")
        for key, value in (("batch_size", self.batch_size), ("max_length", self.max_length)):
            if value < 1:
                raise RegenError(f"--{key.replace('_', '-')}={value}: must be >= 1")
        for key, value, zero in (("max-lines", self.max_lines, "all"), ("threads", self.threads, "auto"),
                                 ("self-instruct", self.self_instruct, "none")):
            if value < 0:
                raise RegenError(f"--{key}={value}: must be >= 0 (0: {zero})")
        if self.self_instruct and self.server is not None:
            raise RegenError(f"--self-instruct={self.self_instruct}: the questions are sampled by the built-in path "
                             "only; use --target (the checkpoint) for them, or drop --self-instruct with --server")

    def _check_target(self) -> None:
        try:
            gguf = locate_gguf(self.target)
        except ValueError:  # a directory holding several GGUF files
            raise RegenError(f"--target={self.target!r}: holds several .gguf files; point --target at the one to "
                             "use") from None
        if gguf is None and not os.path.isfile(os.path.join(self.target, "config.json")):
            raise RegenError(f"--target={self.target!r}: neither an HF checkpoint directory (config.json) nor a GGUF "
                             "file (or a directory holding one); point it at either")
        if gguf is not None and importlib.util.find_spec("gguf") is None:
            raise RegenError(f"--target={self.target!r} is a GGUF file, which transformers reads with the gguf "
                             "package; fix: pip install gguf, or point --target at an HF checkpoint directory")

    def record(self) -> dict:
        """What shapes the answers: a resumed run must match it."""
        # The model by name: the server's (main() asks it when --model is not given) or the checkpoint
        # directory's, so a resume from another working directory or mount still matches.
        model = self.model if self.server else os.path.basename(os.path.normpath(self.target))
        return {**self.sampling.record(), "model": model,
                "chat_template_kwargs": self.chat_template_kwargs}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's examples as written, and every option's default."""


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    ap.add_argument("--input", help="JSON Lines data set to answer (optional with --self-instruct)")
    ap.add_argument("--output", required=True, help="JSON Lines file the answered lines go to")
    ap.add_argument("--target", help="the built-in path: a local HF checkpoint directory, or a GGUF file (or a "
                    "directory holding one), dequantized once to float32 on CPU / bfloat16 on GPU and cached")
    ap.add_argument("--server", help="base URL of an OpenAI-compatible server (sglang, vLLM)")
    ap.add_argument("--model", help="model name on the server (none: the first it lists)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, 1 = no cut")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="answer tokens at most (finish 'length' there)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="rows decoded together (built-in path) or requests in flight (--server)")
    ap.add_argument("--max-length", type=int, default=8192,
                    help="built-in path: prompt + answer tokens; a longer prompt ends its conversation there")
    ap.add_argument("--max-lines", type=int, default=0, help="answer at most this many pending lines now (0: all)")
    ap.add_argument("--chat-template-kwargs", type=json.loads, default={},
                    help='JSON, e.g. \'{"enable_thinking": false}\'')
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="built-in path's device")
    ap.add_argument("--threads", type=int, default=0,
                    help="built-in path on the CPU: torch threads (0: one per two cores)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="--server: seconds per request")
    ap.add_argument("--compile", action="store_true",
                    help="built-in path: compile the decode step's layers (dense Llama-family targets; the first "
                         "steps wait for the compiler). Measured slower than eager for Qwen3-8B at 64 rows on an "
                         "H200 (docs/real_model.md); try it on smaller targets")
    ap.add_argument("--self-instruct", type=int, default=0, metavar="N",
                    help="built-in path: the target first writes N questions (user turns) itself, sampled at "
                         "--temperature/--top-p when --temperature > 0, else at "
                         f"{self_instruct.SELF_INSTRUCT_TEMPERATURE}/{self_instruct.SELF_INSTRUCT_TOP_P}, into OUTPUT.self_instruct.jsonl, then answers them "
                         "after --input's lines (0: none)")
    ap.add_argument("--self-instruct-max-tokens", type=int, default=self_instruct.SELF_INSTRUCT_MAX_TOKENS,
                    help="a question's tokens at most; longer ones are dropped")
    ap.add_argument("--self-instruct-seeds", metavar="FILE",
                    help="JSON Lines of conversations (never held-out data): each question opens with the first "
                         "words of one line's first user turn, in turn, and the target writes the rest")
    ap.add_argument("--self-instruct-seed-words", type=int, default=4, metavar="W",
                    help="words of a seed's opening")
    return ap


def to_config(a: argparse.Namespace) -> RegenConfig:
    if a.self_instruct_max_tokens < 1:
        raise RegenError(f"--self-instruct-max-tokens={a.self_instruct_max_tokens}: must be >= 1, e.g. "
                         f"{self_instruct.SELF_INSTRUCT_MAX_TOKENS}")
    sampling = SamplingConfig(a.temperature, a.top_p, a.max_new_tokens, a.seed)
    # Sampled answers: the questions follow the same settings. Greedy answers (the default) would make
    # greedy questions, one question N times: those are sampled at the module's defaults instead.
    sampled = a.temperature > 0
    questions = SamplingConfig(a.temperature if sampled else self_instruct.SELF_INSTRUCT_TEMPERATURE,
                               a.top_p if sampled else self_instruct.SELF_INSTRUCT_TOP_P,
                               a.self_instruct_max_tokens, a.seed)
    return RegenConfig(a.input, a.output, sampling, a.target, a.server, a.model, a.batch_size, a.max_length,
                       a.max_lines, a.chat_template_kwargs, a.device, a.timeout_s, a.compile, a.threads,
                       a.self_instruct, questions, a.self_instruct_seeds, a.self_instruct_seed_words)
