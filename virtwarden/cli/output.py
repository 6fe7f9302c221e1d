"""What every command module shares: the configuration as a command loads it, and output
as tables or JSON. Kept apart from ``virtwarden.cli.main`` (the parser) so that the command
modules and the parser do not import each other.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from virtwarden.config import Config


def load_config(args: argparse.Namespace) -> Config:
    """The configuration, imported here: its models cost 0.1 s to build, which a command
    that needs none (``policy validate`` without ``--config``) does not pay."""
    from virtwarden.config import load_for_process

    return load_for_process(args.config)


def emit_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
