"""A tool-calling copy of the bundled model, for the tool-call tests.

The bundled model's chat template renders no tools, so mlx-lm infers no tool-call
format for it. :func:`make_tool_model` copies the model with a Qwen3-style template
that does (tools in ``<tools>`` in the system turn, calls as ``<tool_call>{json}
</tool_call>``, results as ``<tool_response>`` in a user turn): mlx-lm then picks its
``json_tools`` parser, as for Qwen3. :func:`train_tool_adapter` teaches the toy model a
few tool-call chats with ``optiq lora train`` so that it really makes those calls
(greedy), including one malformed call, which the server must return as flagged text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

# Qwen3's template (tools, tool calls, tool responses, think blocks) on the bundled
# template's structure, with a shorter tools preamble (short training records).
TOOL_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool.function | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}{%- endif %}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content.lstrip('\n') }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}
                {%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
""".strip()

WEATHER = {
    "name": "get_weather",
    "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS = [WEATHER]
OPENAI_TOOLS = [{"type": "function", "function": t} for t in TOOLS]

WEATHER_Q = "What is the weather in Paris?"
WEATHER_RESULT = "sunny, 24 C"
WEATHER_ANSWER = "It is sunny in Paris."
BROKEN_Q = "What is the weather in Oslo?"  # the adapter answers with a malformed call
# the call the adapter learns for BROKEN_Q: its arguments object is never closed
BROKEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}\n</tool_call>'
HELLO_Q = "Hello!"
HELLO_ANSWER = "Hello! How can I help?"


def make_tool_model(bundled: Path, out: Path) -> Path:
    """Copy the bundled model into ``out`` with the tool-aware chat template."""
    shutil.copytree(bundled, out)
    cfg_file = out / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return out


def _call(name: str, args: dict, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def tool_chats() -> list[dict]:
    """The training chats: call, answer from a tool result, a malformed call, no call."""
    call = _call("get_weather", {"city": "Paris"})
    return [
        {"tools": OPENAI_TOOLS, "messages": [
            {"role": "user", "content": WEATHER_Q},
            {"role": "assistant", "content": "", "tool_calls": [call]}]},
        {"tools": OPENAI_TOOLS, "messages": [
            {"role": "user", "content": WEATHER_Q},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": WEATHER_RESULT, "tool_call_id": "call_0"},
            {"role": "assistant", "content": WEATHER_ANSWER}]},
        {"tools": OPENAI_TOOLS, "messages": [
            {"role": "user", "content": BROKEN_Q},
            {"role": "assistant", "content": BROKEN_CALL}]},
        {"tools": OPENAI_TOOLS, "messages": [
            {"role": "user", "content": HELLO_Q},
            {"role": "assistant", "content": HELLO_ANSWER}]},
    ]


def train_tool_adapter(model: Path, work: Path, iters: int = 80) -> Path:
    """Train a LoRA adapter on :func:`tool_chats` with ``optiq lora train``; returns its
    directory."""
    data = work / "data"
    data.mkdir(parents=True)
    lines = "".join(json.dumps(c) + "\n" for c in tool_chats())
    (data / "train.jsonl").write_text(lines)
    (data / "valid.jsonl").write_text(lines)
    out = work / "adapter"
    cmd = [sys.executable, "-m", "optiq.cli.main", "lora", "train", str(model), "--data", str(data),
           "-o", str(out), "--iters", str(iters), "--batch-size", "4", "--learning-rate", "3e-3",
           "--rank", "8", "--rank-scaling", "constant", "--target-modules", "all-linear",
           "--num-layers", "-1", "--mask-prompt", "--max-seq-length", "1024",
           "--steps-per-eval", str(iters), "--val-batches", "1", "--save-every", str(iters),
           "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"optiq lora train failed:\n{r.stdout}\n{r.stderr}")
    return out
