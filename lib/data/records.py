"""One JSON Lines record of training or held-out data, parsed: its messages, its cut-off answers, its
category (lib/data/datasets.py's module docstring has the accepted formats)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Record:
    line_no: int
    sample_id: str
    messages: Optional[list[dict[str, str]]]  # None for a pre-formatted text record
    text: Optional[str] = None
    cut_turns: tuple[int, ...] = ()  # ordinals among the assistant turns of answers cut off by a token limit
    category: Optional[str] = None


def parse_line(line: str, line_no: int, default_id: str) -> Record | str:
    """A Record, or the reason the line is unusable."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "malformed_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    sample_id = str(obj.get("id", default_id))
    category = obj.get("category") if isinstance(obj.get("category"), str) else None
    if "conversations" not in obj:
        text = obj.get("text")
        if not isinstance(text, str):
            return "no_conversations_or_text"
        return Record(line_no, sample_id, None, text, category=category) if text else "empty_conversation"
    turns = obj["conversations"]
    if not isinstance(turns, list):
        return "no_conversations_or_text"
    if not turns:
        return "empty_conversation"
    messages, cut = [], []
    regenerated = obj.get("regenerated")
    finish = regenerated.get("finish") if isinstance(regenerated, dict) else None
    finish = finish if isinstance(finish, list) else []
    for turn in turns:
        if not isinstance(turn, dict):
            return "malformed_turn"
        if "role" in turn:
            role, content = turn["role"], turn.get("content")
        else:
            role, content = SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")), turn.get("value")
        if role not in ("system", "user", "assistant"):
            return "unknown_role"
        if not isinstance(content, str):
            return "malformed_turn"
        if role == "assistant":
            ordinal = sum(m["role"] == "assistant" for m in messages)
            said = finish[ordinal] if ordinal < len(finish) else None
            if "length" in (said, turn.get("finish"), turn.get("finish_reason")):
                cut.append(ordinal)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "no_assistant_turn"
    return Record(line_no, sample_id, messages, cut_turns=tuple(cut), category=category)
