"""``optiq generate`` / ``optiq chat``: clients of a running ``optiq serve``.

They stream tokens to the terminal as they arrive; reasoning (``<think>``) is hidden
unless ``--show-thinking`` (then shown dimmed). They work against remote servers too
(``--host``, ``--api-key``, ``--tls``/``--tls-ca``). No MLX is imported.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import click


def _connection_options(f: Callable) -> Callable:
    opts = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Server address."),
        click.option("--port", default=50051, show_default=True, type=int),
        click.option("--api-key", envvar="OPTIQ_API_KEY", default=None,
                     help="Bearer token [env OPTIQ_API_KEY]."),
        click.option("--tls", is_flag=True, help="Use TLS (system root certificates)."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="PEM CA certificate to verify the server (implies --tls)."),
        click.option("--timeout", type=float, default=None,
                     help="Deadline per request in seconds."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _generation_options(f: Callable) -> Callable:
    opts = [
        click.option("--max-tokens", type=int, default=None, help="[server default]"),
        click.option("--temp", "temperature", type=float, default=None, help="[server default]"),
        click.option("--top-p", type=float, default=None, help="[server default]"),
        click.option("--top-k", type=int, default=None, help="[server default]"),
        click.option("--min-p", type=float, default=None, help="[server default]"),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None, help="Reproducible sampling."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--adapter", default="", help="Name of a LoRA adapter the server registered."),
        click.option("--system", default=None, help="System message."),
        click.option("--think/--no-think", "enable_thinking", default=None,
                     help="Switch the chat template's thinking mode [template default]."),
        click.option("--show-thinking", is_flag=True, help="Print reasoning (dimmed)."),
        click.option("--stats", is_flag=True, help="Print usage and timings at the end."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _client(host: str, port: int, api_key: str | None, tls: bool, tls_ca: str | None) -> Any:
    from optiq.runtime.client import Client

    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    return Client(target, api_key=api_key, tls=tls, tls_ca=tls_ca)


def _rpc_error(e: Any, target: str) -> Exception:
    import grpc

    from optiq.core.errors import OptiQError

    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return OptiQError(
            f"server {target} unavailable ({e.details()}): is `optiq serve` running there?"
        )
    name = code.name if code is not None else "ERROR"
    return OptiQError(f"{name}: {e.details() if hasattr(e, 'details') else e}")


def stream_to_terminal(call: Any, *, show_thinking: bool, stats: bool) -> tuple[str, Any]:
    """Print a Generate stream; returns (content text, final event)."""
    from optiq.v1 import generation_pb2 as pb

    content: list[str] = []
    final = None
    in_reasoning = False
    hidden = 0  # reasoning tokens not printed
    for r in call:
        if r.HasField("finished"):
            final = r.finished
            break
        d = r.delta
        if d.channel == pb.CHANNEL_REASONING:
            hidden += 0 if show_thinking else len(d.token_ids)
            if show_thinking and d.text:
                click.echo(click.style(d.text, dim=True), nl=False)
                in_reasoning = True
            continue
        if in_reasoning and d.text:
            click.echo("\n", nl=False)
            in_reasoning = False
        content.append(d.text)
        click.echo(d.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if final is not None and final.reason == pb.FINISH_REASON_ERROR:
        from optiq.core.errors import OptiQError

        raise OptiQError(f"generation failed: {final.error}")
    if hidden and not "".join(content).strip():
        # an empty answer with exit 0 would look like a broken model or server
        click.echo(f"note: no answer, only {hidden} hidden reasoning token{'s' * (hidden != 1)}: "
                   "use --show-thinking to see them (or a larger --max-tokens)", err=True)
    if final is not None and stats:
        u = final.usage
        tps = u.completion_tokens / (u.decode_time_ms / 1e3) if u.decode_time_ms else 0.0
        click.echo(
            f"[{pb.FinishReason.Name(final.reason).removeprefix('FINISH_REASON_').lower()}: "
            f"{u.prompt_tokens} prompt + {u.completion_tokens} generated tokens "
            f"({u.reasoning_tokens} reasoning); TTFT {u.time_to_first_token_ms:.0f} ms; "
            f"{tps:.1f} tok/s]",
            err=True,
        )
    return "".join(content), final


def _sampling(kw: dict[str, Any]) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
    return {k: kw[k] for k in keys if kw.get(k) is not None}


@click.command()
@click.argument("prompt")
@click.option("--raw", is_flag=True,
              help="Send PROMPT as plain text (no chat template).")
@_generation_options
@_connection_options
def generate(prompt: str, raw: bool, host: str, port: int, api_key: str | None, tls: bool,
             tls_ca: str | None, timeout: float | None, **kw: Any) -> None:
    """Generate from PROMPT ('-' reads stdin) on a running `optiq serve`.

    PROMPT goes through the model's chat template as one user message unless --raw.
    """
    import grpc

    if prompt == "-":
        prompt = sys.stdin.read()
    client = _client(host, port, api_key, tls, tls_ca)
    common = dict(max_tokens=kw["max_tokens"], stop=kw["stop"], adapter=kw["adapter"],
                  **_sampling(kw))
    if raw:
        if kw["system"] or kw["enable_thinking"] is not None:
            raise click.UsageError("--system and --think/--no-think need the chat template (drop --raw)")
        req: dict[str, Any] = dict(prompt=prompt, **common)
    else:
        msgs = ([{"role": "system", "content": kw["system"]}] if kw["system"] else [])
        msgs.append({"role": "user", "content": prompt})
        req = dict(messages=msgs, enable_thinking=kw["enable_thinking"], **common)
    call = client.generate(timeout=timeout, **req)
    try:
        stream_to_terminal(call, show_thinking=kw["show_thinking"], stats=kw["stats"])
    except grpc.RpcError as e:
        raise _rpc_error(e, client.target) from None
    except KeyboardInterrupt:
        call.cancel()
        raise
    finally:
        client.close()


@click.command()
@_generation_options
@_connection_options
def chat(host: str, port: int, api_key: str | None, tls: bool, tls_ca: str | None,
         timeout: float | None, **kw: Any) -> None:
    """Chat with a running `optiq serve` (/reset clears history, /exit or Ctrl-D quits,
    Ctrl-C stops an answer)."""
    import grpc

    client = _client(host, port, api_key, tls, tls_ca)
    history: list[dict[str, str]] = []
    if kw["system"]:
        history.append({"role": "system", "content": kw["system"]})
    base = list(history)
    try:
        try:
            info = client.model_info(timeout=10)
        except grpc.RpcError as e:
            raise _rpc_error(e, client.target) from None
        click.echo(f"Chatting with {info.model_id} at {client.target}. /reset, /exit.", err=True)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                history = list(base)
                click.echo("(history cleared)", err=True)
                continue
            history.append({"role": "user", "content": line})
            call = client.generate(
                timeout=timeout, messages=history, enable_thinking=kw["enable_thinking"],
                max_tokens=kw["max_tokens"], stop=kw["stop"], adapter=kw["adapter"],
                **_sampling(kw),
            )
            try:
                answer, _ = stream_to_terminal(call, show_thinking=kw["show_thinking"],
                                               stats=kw["stats"])
            except KeyboardInterrupt:
                call.cancel()
                click.echo("\n(stopped)", err=True)
                history.pop()
                continue
            except grpc.RpcError as e:
                history.pop()
                raise _rpc_error(e, client.target) from None
            history.append({"role": "assistant", "content": answer})
    finally:
        client.close()
