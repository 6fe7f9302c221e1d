"""``python -m bench.cli_startup``: how long read-only ``virtwarden`` commands take, whole.

Each command runs ``--runs`` times as a new process (``python -m virtwarden.cli``, as the
installed command does) on a throwaway configuration with an SQLite catalog that exists
already (so no run creates a schema). Prints the median, minimum and maximum wall time
of each, and the import time alone (``python -c "import virtwarden.cli.main"``) for
reference. Needs no libvirt, broker or storage: only the catalog is read.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "policies" / "examples"

COMMANDS: list[tuple[str, list[str]]] = [
    ("--version", ["--version"]),
    ("jobs", ["jobs"]),
    ("jobs --json", ["jobs", "--json"]),
    ("backups web01 --json", ["backups", "web01", "--json"]),
    ("alerts --json", ["alerts", "--json"]),
    ("services", ["services"]),
    ("schedule slots", ["schedule", "slots"]),
    ("policy validate (examples)", ["policy", "validate", str(POLICY)]),
]


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: validation found errors; anything else is a failed run
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return took


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cli_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="virtwarden-cli-bench-") as tmp:
        config = Path(tmp) / "virtwarden.yaml"
        config.write_text(f"data_dir: {tmp}/data\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTWARDEN_")}
        env["VIRTWARDEN_CONFIG"] = str(config)
        timed(["-m", "virtwarden.cli", "jobs"], env)  # creates the catalog once, outside the figures
        rows = [("import virtwarden.cli.main only", ["-c", "import virtwarden.cli.main"])]
        rows += [(name, ["-m", "virtwarden.cli", *cmd]) for name, cmd in COMMANDS]
        print(f"{'command':32} {'median':>8} {'min':>8} {'max':>8}   (seconds, {args.runs} runs each)")
        for name, cmd in rows:
            samples = [timed(cmd, env) for _ in range(args.runs)]
            print(f"{name:32} {statistics.median(samples):8.3f} {min(samples):8.3f} {max(samples):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
