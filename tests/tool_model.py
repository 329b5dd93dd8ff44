"""A tool-calling model for the tool-call tests, trained here in a few seconds.

The bundled model's chat template renders no tools, so mlx-lm infers no tool-call
format for it; and teaching it tool calls with a LoRA adapter takes minutes of CPU
(it has to unlearn its dictionary prose). :func:`make_tool_model` instead trains a
tiny Llama (the bundled tokenizer, random start, 2 layers of 64) on a few tool-call
chats rendered with a Qwen3-style template (tools in ``<tools>`` in the system turn,
calls as ``<tool_call>{json}</tool_call>``, results as ``<tool_response>`` in a user
turn), so mlx-lm picks its ``json_tools`` parser, as for Qwen3. The model really makes
those calls (greedy), including one malformed call the server must return as flagged
text; nothing in the server is mocked.
"""

from __future__ import annotations

import json
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


def _encode(tok, chat: dict) -> tuple[list[int], int]:
    """Token ids of a whole chat and where its last (assistant) turn starts."""
    kw = dict(tools=chat["tools"], tokenize=False, enable_thinking=False)
    full = tok.encode(tok.apply_chat_template(chat["messages"], **kw), add_special_tokens=False)
    head = tok.encode(tok.apply_chat_template(chat["messages"][:-1], add_generation_prompt=True,
                                              **kw), add_special_tokens=False)
    assert full[: len(head)] == head, "the template's prompt is not a prefix of the chat"
    return full, len(head)


def _learned(logits, targets, answer) -> bool:
    """Every answer token is the argmax, with a margin (mean loss on answers < 0.02), so
    that greedy decoding in the server reproduces the answers."""
    import mlx.nn as nn

    right = bool(((logits.argmax(-1) == targets) | ~answer).all())
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    return right and (ce * answer).sum().item() / answer.sum().item() < 0.02


def make_tool_model(out: Path, bundled: Path, max_steps: int = 1000, seed: int = 0) -> Path:
    """Train the tool model into ``out`` until it reproduces every chat's last turn
    greedily (checked every few steps; raises if it never does)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from optiq.core.tiny_models import build_model, copy_tokenizer_files, save_model_dir

    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 192,
        "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
        "vocab_size": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "float32", "max_position_embeddings": 1024, "rope_theta": 10000.0,
    }
    out.mkdir(parents=True)
    copy_tokenizer_files(bundled, out)
    cfg_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["chat_template"] = TOOL_TEMPLATE
    cfg_file.write_text(json.dumps(tok_cfg, indent=2))
    tok = load_tokenizer(out)

    rows = [_encode(tok, c) for c in tool_chats()]
    n = max(len(ids) for ids, _ in rows)
    inputs = mx.array([ids[:-1] + [0] * (n - len(ids)) for ids, _ in rows])
    targets = mx.array([ids[1:] + [0] * (n - len(ids)) for ids, _ in rows])
    # trained on every token (a model that only sees the answers stalls as a bigram
    # model); checked on the answers, the assistant's last turn
    real = mx.array([[i < len(ids) - 1 for i in range(n - 1)] for ids, _ in rows])
    answer = mx.array([[start - 1 <= i < len(ids) - 1 for i in range(n - 1)]
                       for ids, start in rows])

    model = build_model(config, seed=seed)

    def loss_fn(m):
        ce = nn.losses.cross_entropy(m(inputs), targets, reduction="none")
        return (ce * real).sum() / real.sum()

    step_fn = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=3e-3)
    for step in range(1, max_steps + 1):
        loss, grads = step_fn(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if step % 20 == 0 and _learned(model(inputs), targets, answer):
            save_model_dir(model, config, out, dtype=mx.float32)
            return out
    raise RuntimeError(f"the tool model did not learn its chats in {max_steps} steps "
                       f"(loss {loss.item():.3f})")
