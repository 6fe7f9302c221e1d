"""What every command module shares: the configuration as a command loads it, and output
as tables or JSON. Kept apart from ``virtwarden.cli.main`` (the parser) so that the command
modules and the parser do not import each other.
"""
from __future__ import annotations

import argparse
import json
import sys

from virtwarden import config as config_module


def load_config(args: argparse.Namespace) -> config_module.Config:
    return config_module.load_for_process(args.config)


def emit_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
