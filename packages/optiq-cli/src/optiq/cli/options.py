"""Options shared by several commands."""

from __future__ import annotations

import click

model_argument = click.argument("model", required=False, default=None, metavar="[MODEL]")
