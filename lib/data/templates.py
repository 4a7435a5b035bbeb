"""Chat templates: render a conversation to text and mark where the assistant wrote.

A template returns the text and the character spans of every assistant turn's content *as the
template rendered it* (e.g. trimmed) *including* its end-of-turn token. The data pipeline maps those
spans onto tokens through the tokenizer's offset mapping, so the loss mask is right for any number of
turns and needs no per-template token logic.

Registered names: "auto" (the tokenizer's own Jinja chat template), "tiny" (the embedded target's),
"qwen" (ChatML) and "llama3" (Meta's Llama-3 template, which trims every message). A new template is a
new `register_template` call, not a branch. docs/templates.md says where a registered template
deliberately differs from a model's own chat template.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
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


class TemplateProblem(str, Enum):
    """Why a conversation cannot be rendered; the value is the bad-line reason in the data report."""

    BAD_MESSAGE = "template_bad_message"  # a role or content the templates cannot take
    TEMPLATE_RAISED = "template_raised"  # the Jinja chat template raised (e.g. roles must alternate)
    ANSWER_NOT_LOCATED = "template_answer_not_located"  # the answer's place in the text is not determined
    ANSWER_REWRITTEN = "template_answer_rewritten"  # the template changed the answer beyond whitespace


class Rewrite(str, Enum):
    """How a template changed an answer it was still kept for; counted per reason in the data report."""

    TRIMMED = "answer_trimmed"  # leading/trailing whitespace removed (Llama-3's `| trim`, Qwen3's lstrip)


class TemplateError(ValueError):
    """A conversation or tokenizer does not fit the chosen template; the message says what to change.

    `problem` is set for per-conversation failures (the data loader counts them per reason) and None
    for configuration errors (no chat template, unknown name), which stop the run.
    """

    def __init__(self, message: str, problem: Optional[TemplateProblem] = None):
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: tuple[tuple[int, int], ...]  # [start, end) chars: rendered content + end-of-turn token
    last_assistant_header_end: int  # chars before this are the prompt of the last assistant turn
    rewrites: tuple[tuple[int, Rewrite], ...] = ()  # (message index, how its answer was changed)
    # Per assistant span, where its content ends and its end-of-turn marker begins: an answer cut off by
    # a token limit keeps only [start, content_end) under the loss, since the model never ended that turn.
    content_ends: tuple[int, ...] = ()


def _check_messages(messages: list[dict[str, str]]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise TemplateError(f"message {i}: role {m.get('role')!r} is not one of {ROLES}",
                                TemplateProblem.BAD_MESSAGE)
        if not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i}: content must be a string, got {type(m.get('content')).__name__}",
                                TemplateProblem.BAD_MESSAGE)


def classify_rewrite(index: int, content: str, rendered: str) -> Optional[Rewrite]:
    """None when the template kept the answer verbatim, TRIMMED when it only dropped surrounding
    whitespace; anything else raises, since then the rendered answer is not the answer in the data."""
    if rendered == content:
        return None
    lead = len(content) - len(content.lstrip())
    for i in range(lead + 1):  # the rendered answer must sit inside the content's whitespace margins
        if content.startswith(rendered, i) and not content[i + len(rendered):].strip():
            return Rewrite.TRIMMED
    raise TemplateError(f"assistant message {index}: the chat template renders the answer as {rendered[:60]!r}, "
                        f"not as the data's {content[:60]!r}; fix the data or choose a template that keeps answers",
                        TemplateProblem.ANSWER_REWRITTEN)


@dataclass(frozen=True)
class MarkupTemplate:
    """Templates of the form  bos + (header(role) + content + end_of_turn + after_turn)*.

    trim: every message's content is stripped of surrounding whitespace first, as Meta's Llama-3
    template does (`message['content'] | trim`); without it the text would not be the one the model
    sees at serving time.
    """

    name: str
    header: str  # with "{role}" where the role name goes
    end_of_turn: str
    after_turn: str = ""
    bos: str = ""
    trim: bool = False

    def render(self, messages: list[dict[str, str]]) -> Rendered:
        _check_messages(messages)
        parts = [self.bos]
        pos = len(self.bos)
        spans, rewrites, content_ends = [], [], []
        header_end = -1
        for i, m in enumerate(messages):
            head = self.header.format(role=m["role"])
            parts.append(head)
            pos += len(head)
            start = pos
            content = m["content"].strip() if self.trim else m["content"]
            body = content + self.end_of_turn
            parts.append(body)
            pos += len(body)
            if m["role"] == "assistant":
                spans.append((start, pos))
                content_ends.append(start + len(content))
                header_end = start
                rewrite = classify_rewrite(i, m["content"], content)
                if rewrite is not None:
                    rewrites.append((i, rewrite))
            parts.append(self.after_turn)
            pos += len(self.after_turn)
        return Rendered("".join(parts), tuple(spans), header_end, tuple(rewrites), tuple(content_ends))


_PROBE_CONTENT = "\u2063probe\u2063"  # invisible separators: never part of a real answer, no whitespace to trim


@dataclass
class TokenizerTemplate:
    """The tokenizer's own chat template ("auto").

    Jinja templates cannot report where they placed each message, so each assistant answer is located
    by rendering the conversation a second time with only that answer replaced by a probe: the text
    before the probe and the text after it must be the real rendering's prefix and suffix, and what
    lies between them is the answer exactly as the template rendered it (trimmed, say). The span is so
    bounded on both sides by the template itself; it can never land in another turn, whatever the
    answer repeats. An answer the template changed beyond surrounding whitespace, or a template whose
    other turns depend on the answer, is a TemplateError for that conversation, not a guess.

    The end-of-turn marker is learned once from a probe answer: whatever the template writes right
    after the content, up to the first whitespace (e.g. "<|im_end|>", "<|eot_id|>").
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
                                "into its text; choose a registered template (data.template=qwen|llama3|tiny)")
        tail = probe[at + len(_PROBE_CONTENT):]
        self.end_of_turn = tail.split()[0] if tail.strip() else ""

    def _apply(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception as e:  # Jinja's raise_exception and template bugs alike: the data does not fit it
            raise TemplateError(f"data.template=auto: the chat template raised {type(e).__name__}: {e}",
                                TemplateProblem.TEMPLATE_RAISED) from e

    def render(self, messages: list[dict[str, str]]) -> Rendered:
        _check_messages(messages)
        text = self._apply(messages)
        spans, rewrites, content_ends = [], [], []
        header_end = -1
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            probed = self._apply(messages[:i] + [{"role": "assistant", "content": _PROBE_CONTENT}] + messages[i + 1:])
            at = probed.find(_PROBE_CONTENT)
            before, after = probed[:max(at, 0)], probed[at + len(_PROBE_CONTENT):]
            if (at < 0 or probed.count(_PROBE_CONTENT) != 1 or len(before) + len(after) > len(text)
                    or not text.startswith(before) or not text.endswith(after)):
                raise TemplateError(
                    f"data.template=auto: assistant message {i} cannot be located in the rendered text (the chat "
                    "template renders the rest of the conversation differently for this answer); fix the data "
                    "or choose a registered template", TemplateProblem.ANSWER_NOT_LOCATED)
            start, end = len(before), len(text) - len(after)
            rewrite = classify_rewrite(i, m["content"], text[start:end])
            if rewrite is not None:
                rewrites.append((i, rewrite))
            content_ends.append(end)
            if after.startswith(self.end_of_turn):
                end += len(self.end_of_turn)
            spans.append((start, end))
            header_end = start
        return Rendered(text, tuple(spans), header_end, tuple(rewrites), tuple(content_ends))


TEMPLATES: dict[str, Callable[[Optional[Any]], Any]] = {}


def register_template(name: str, factory: Callable[[Optional[Any]], Any]) -> None:
    """factory(tokenizer) -> an object with .name and .render(messages) -> Rendered."""
    TEMPLATES[name] = factory


register_template("auto", lambda tok: TokenizerTemplate(tok))
register_template("tiny", lambda tok: MarkupTemplate("tiny", "<|{role}|>", TINY_END_OF_TURN))
# Plain ChatML: Qwen3's own template adds an empty think block to the final answer (docs/templates.md)
register_template("qwen", lambda tok: MarkupTemplate("qwen", "<|im_start|>{role}\n", "<|im_end|>", "\n"))
register_template("llama3", lambda tok: MarkupTemplate(
    "llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", bos="<|begin_of_text|>", trim=True))


def get_template(name: str, tokenizer: Any = None):
    if name not in TEMPLATES:
        raise TemplateError(f"data.template={name!r} is not registered; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)
