"""Tool calls in generated text: cut them out of the content stream and parse them.

The model writes a call between the tool-call tags of its format (Qwen:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``); mlx-lm's tokenizer knows
the tags and the parser of the format (``mlx_lm.tool_parsers``), inferred from the
chat template. Here the tags are found in streamed text (held back like stop strings,
since a tag can be split across tokens) and the text between them is handed to that
parser. A call that does not parse is given back as text, flagged, never raised: the
model wrote it, the client decides. Pure Python: no MLX.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Callable

from .text import _held_tail
from .types import ToolCall

TEXT = "text"
CALL = "call"
UNCLOSED = "unclosed"

TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class ToolCallSplitter:
    """Splits content text into plain text and tool-call bodies.

    ``push`` returns ``(kind, text)`` items in order: ``("text", t)`` is content,
    ``("call", body)`` a complete call (tags removed). ``flush`` at the end of the
    stream may return ``("unclosed", body)`` for a call cut off before its end tag.
    """

    def __init__(self, start_tag: str, end_tag: str):
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.inside = False
        self._pending = ""  # outside: a held-back tail; inside: the call body so far

    def push(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        buf = self._pending + text
        self._pending = ""
        while True:
            if self.inside:
                i = buf.find(self.end_tag)
                if i < 0:
                    self._pending = buf
                    return out
                out.append((CALL, buf[:i]))
                buf = buf[i + len(self.end_tag):]
                self.inside = False
            else:
                i = buf.find(self.start_tag)
                if i < 0:
                    break
                if i:
                    out.append((TEXT, buf[:i]))
                buf = buf[i + len(self.start_tag):]
                self.inside = True
        keep = _held_tail(buf, (self.start_tag,))
        if keep:
            self._pending = buf[len(buf) - keep:]
            buf = buf[: len(buf) - keep]
        if buf:
            out.append((TEXT, buf))
        return out

    def flush(self) -> list[tuple[str, str]]:
        out, self._pending = self._pending, ""
        if self.inside:
            self.inside = False
            return [(UNCLOSED, out)]
        return [(TEXT, out)] if out else []


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(
    body: str, parser: Callable[..., Any], tools: tuple[dict, ...] | None
) -> list[ToolCall] | None:
    """The calls in one tool-call body, or None when it is not a well-formed call
    (the parser failed, no name, arguments not a JSON object)."""
    try:
        parsed = parser(body, list(tools) if tools else None)
    except Exception:  # parsers raise ValueError, JSONDecodeError, KeyError, ...
        return None
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        name = item.get("name")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            return None
        calls.append(ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False)))
    return calls or None


def template_tool(name: str, description: str, parameters: dict | None) -> dict:
    """A tool as chat templates expect it (the OpenAI function-tool shape)."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": parameters or {"type": "object", "properties": {}},
        },
    }


def template_tool_call(call_id: str, name: str, arguments_json: str) -> dict:
    """An assistant tool call as chat templates expect it: arguments as an object when
    they are JSON (templates ``tojson`` them), else the text as sent."""
    try:
        args: Any = json.loads(arguments_json) if arguments_json else {}
    except json.JSONDecodeError:
        args = arguments_json
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
