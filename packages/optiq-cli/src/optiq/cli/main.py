"""The ``optiq`` command line. It only parses arguments and calls library functions.

Each command lives in its own module and is imported only when invoked, so
``optiq --help`` stays fast and a command's heavy imports (MLX, gRPC) load on demand.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# command name -> "module:attribute" (relative to optiq.cli)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info:info", "Describe a model: architecture, layer kinds, parameters, quantization."),
    "convert": ("convert:convert", "Sensitivity-aware mixed-precision weight quantization."),
    "eval": ("eval:eval_cmd", "Perplexity, KL vs a reference, GSM8K-style accuracy."),
    "kv-cache": ("kv_cache:kv_cache", "Measure KV sensitivity and write a mixed-precision KV config."),
    "serve": ("serve:serve", "Run the gRPC generation service."),
    "generate": ("client:generate", "Generate from a running server (streams to the terminal)."),
    "chat": ("client:chat", "Chat with a running server."),
    "lora": ("lora:lora", "LoRA training, export and fusing."),
}


class LazyGroup(click.Group):
    """Click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module_name, attr = target.split(":")
        module = importlib.import_module(f"optiq.cli.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optiq")
def cli() -> None:
    """OptiQ: make language models small and fast on MLX.

    MODEL arguments default to the bundled tiny Qwen3.5-style model; otherwise give a
    local model directory or a Hugging Face id (org/name) in the local HF cache (never
    downloaded).
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: typed OptiQ errors become one-line messages and exit code 1."""
    from optiq.core.errors import OptiQError

    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except OptiQError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
