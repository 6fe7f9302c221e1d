"""What every command module shares: the configuration as a command loads it, and output
as tables or JSON. Kept apart from ``worker.cli`` (the parser) so that the command
modules and the parser do not import each other.
"""
from __future__ import annotations

import argparse
import json
import sys

from virtwarden import config as config_module
from virtwarden import permissions


def load_config(args: argparse.Namespace) -> config_module.Config:
    cfg = config_module.load(args.config)
    apply_security(cfg)
    return cfg


def apply_security(cfg: config_module.Config) -> None:
    """This process's file modes from ``security``, and a warning when the configuration
    file holds secrets that other users can read (as for the API's token file: the
    warning says how to close it, and the file is used)."""
    permissions.configure(cfg.security.read_group, cfg.security.service_group)
    if cfg.file_secrets:
        permissions.warn_if_exposed(cfg.source, ", ".join(cfg.file_secrets))


def emit_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
