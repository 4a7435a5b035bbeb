"""Chat templates: render a conversation to text and mark where the assistant wrote.

A template returns the text and the character spans of every assistant turn's content *including*
its end-of-turn token. The data pipeline maps those spans onto tokens through the tokenizer's offset
mapping, so the loss mask is right for any number of turns and needs no per-template token logic.

Registered names: "auto" (the tokenizer's own Jinja chat template), "tiny" (the embedded target's),
"qwen" (ChatML) and "llama3". A new template is a new `register_template` call, not a branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

ROLES = ("system", "user", "assistant")

# The tiny target's own template, stored in its tokenizer_config.json by tools/make_tiny_target.py.
# Role markers are special tokens and nothing separates turns, so every token belongs to one turn.
TINY_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>")
TINY_END_OF_TURN = "<|end|>"
TINY_PAD = "<|pad|>"
TINY_CHAT_TEMPLATE_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('tiny chat template: unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


class TemplateError(ValueError):
    """A conversation or tokenizer does not fit the chosen template; the message says what to change."""


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) chars: content + end-of-turn token
    last_assistant_header_end: int  # chars before this are the prompt of the last assistant turn


def _check_messages(messages: list[dict[str, str]]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise TemplateError(f"message {i}: role {m.get('role')!r} is not one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i}: content must be a string, got {type(m.get('content')).__name__}")


@dataclass(frozen=True)
class MarkupTemplate:
    """Templates of the form  bos + (header(role) + content + end_of_turn + after_turn)*."""

    name: str
    header: str  # with "{role}" where the role name goes
    end_of_turn: str
    after_turn: str = ""
    bos: str = ""

    def render(self, messages: list[dict[str, str]]) -> Rendered:
        _check_messages(messages)
        parts = [self.bos]
        pos = len(self.bos)
        spans = []
        header_end = -1
        for m in messages:
            head = self.header.format(role=m["role"])
            parts.append(head)
            pos += len(head)
            start = pos
            body = m["content"] + self.end_of_turn
            parts.append(body)
            pos += len(body)
            if m["role"] == "assistant":
                spans.append((start, pos))
                header_end = start
            parts.append(self.after_turn)
            pos += len(self.after_turn)
        return Rendered("".join(parts), tuple(spans), header_end)


_PROBE_CONTENT = "\u2063probe\u2063"  # invisible separators: never part of a real answer


@dataclass
class TokenizerTemplate:
    """The tokenizer's own chat template ("auto").

    Jinja templates cannot report where they placed each message, so each assistant content is
    searched for in the rendered text from where the template's generation prompt for that turn ends
    (the conversation before it, rendered with add_generation_prompt=True), so an earlier identical
    user message is never mistaken for it. The end-of-turn marker is learned once by rendering a probe
    answer: whatever the template writes right after an assistant's content, up to the first
    whitespace, is that marker (e.g. "<|im_end|>", "<|eot_id|>").
    """

    tokenizer: Any
    name: str = "auto"

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError(
                f"data.template=auto but the tokenizer {getattr(self.tokenizer, 'name_or_path', '?')!r} has no "
                "chat_template; set data.template to one of " + ", ".join(n for n in TEMPLATES if n != "auto"))
        probe = self._apply([{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE_CONTENT}])
        at = probe.find(_PROBE_CONTENT)
        if at < 0:
            raise TemplateError("data.template=auto: the tokenizer's chat template does not copy assistant content "
                                "verbatim; choose a registered template (data.template=qwen|llama3|tiny)")
        tail = probe[at + len(_PROBE_CONTENT):]
        self.end_of_turn = tail.split()[0] if tail.strip() else ""

    def _apply(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, messages: list[dict[str, str]]) -> Rendered:
        _check_messages(messages)
        text = self._apply(messages)
        spans = []
        cursor = 0
        header_end = -1
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], add_generation_prompt=True)
            start = text.find(m["content"], len(prompt) if text.startswith(prompt) else cursor)
            if start < 0:
                raise TemplateError(f"data.template=auto: assistant message {i} is not verbatim in the rendered text "
                                    "(the chat template rewrites it); choose a registered template instead")
            end = start + len(m["content"])
            if text.startswith(self.end_of_turn, end):
                end += len(self.end_of_turn)
            spans.append((start, end))
            header_end = start
            cursor = end
        return Rendered(text, tuple(spans), header_end)


TEMPLATES: dict[str, Callable[[Optional[Any]], Any]] = {}


def register_template(name: str, factory: Callable[[Optional[Any]], Any]) -> None:
    """factory(tokenizer) -> an object with .name and .render(messages) -> Rendered."""
    TEMPLATES[name] = factory


register_template("auto", lambda tok: TokenizerTemplate(tok))
register_template("tiny", lambda tok: MarkupTemplate("tiny", "<|{role}|>", TINY_END_OF_TURN))
register_template("qwen", lambda tok: MarkupTemplate("qwen", "<|im_start|>{role}\n", "<|im_end|>", "\n"))
register_template("llama3", lambda tok: MarkupTemplate(
    "llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", bos="<|begin_of_text|>"))


def get_template(name: str, tokenizer: Any = None):
    if name not in TEMPLATES:
        raise TemplateError(f"data.template={name!r} is not registered; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)
