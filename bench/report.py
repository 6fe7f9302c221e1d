"""The printed table and the JSON file of a run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.scenario import VAULTS, Results
from bench.stats import Series, human_bytes, ratio, spread

GOAL = 1.10  # within 10% of the bare operation
# Format 2 (targets vault and vault-s3) cuts, compresses and encrypts what it stores: its own goals.
VAULT_FULL = 1.25  # a full at >= 0.8x the throughput of cp + fsync
VAULT_AGAIN = 0.01  # a second full of unchanged data stores < 1% of the first
VAULT_STORED = 1.5  # an incremental stores <= 1.5x the bytes dirtied
FLAT = 1.10  # peak memory may not grow more than this when the data grows
# Against virtnbdbackup (whole commands on both sides): a full and a restore at least
# 1.5x its throughput, an incremental in at most 0.6x its time.
PEER_FASTER = 1 / 1.5
PEER_INCREMENTAL = 0.6


def _rate(data: Series, seconds: Series) -> str:
    if not data.samples or not seconds.samples or not seconds.median:
        return ""
    return f"{data.median / seconds.median / 1e6:.0f} MB/s"


def _verdict(value: float, goal: float) -> str:
    if value != value:  # NaN: nothing measured
        return "-"
    return f"{value:.2f} {'ok' if value <= goal else 'MISS'}"


def rows(res: Results, targets: list[str]) -> list[list[str]]:
    s = res.series
    none = Series("s")
    image = s.get("image.actual_size", Series("B"))
    bare_name = {"full.nfs": "cp --sparse + fsync", "full.s3": "boto3 upload_file",
                 "full.vault": "cp --sparse + fsync", "full.vault-s3": "boto3 upload_file of the image",
                 "restore.nfs": "cp x2 + rebase + convert + fsync",
                 "restore.s3": "download_file x2 + rebase + convert + fsync",
                 "restore.vault": "qemu-img convert of the same data + fsync",
                 "restore.vault-s3": "parallel GET of the same chunks + fsync"}
    full_bare = {"vault": "full.nfs.bare", "vault-s3": "full.s3.bare"}
    out = []
    for t in targets:
        goal = VAULT_FULL if t in VAULTS else GOAL
        ours = s.get(f"full.{t}", none)
        base = s.get(full_bare.get(t, f"full.{t}.bare"), none)
        out.append([f"full backup -> {t} (submit to succeeded)", spread(ours), _rate(image, ours),
                    f"{bare_name[f'full.{t}']}: {spread(base)}", _rate(image, base),
                    _verdict(ratio(ours, base), goal)])
        cli = s.get(f"full.{t}.cli", none)
        out.append(["  same, whole CLI command", spread(cli), "", "", "", _verdict(ratio(cli, base), goal)])
        if t in VAULTS:
            first, again = s.get(f"full.{t}.stored", Series("B")), s.get(f"full2.{t}.stored", Series("B"))
            out.append(["  bytes stored by the first full", spread(first), "", f"image: {human_bytes(image.median)}",
                        "", ""])
            out.append(["  second full, data unchanged: stored", spread(again), "",
                        f"first full: {human_bytes(first.median)}", "", _verdict(ratio(again, first), VAULT_AGAIN)])
        push = s.get("full.push.bare", none)
        if t == "nfs" and push.samples:
            out.append(["  vs. libvirt push backup alone", "", "", f"push to a file + fsync: {spread(push)}",
                        _rate(image, push), _verdict(ratio(ours, push), GOAL)])
        publish = s.get("full.nfs.publish_only", none)
        if t == "nfs" and publish.samples:
            out.append(["  its publish step alone (hash, sync)", spread(publish), _rate(image, publish), "", "", ""])
    for t in targets:
        ours, stored = s.get(f"incremental.{t}", none), s.get(f"incremental.{t}.stored", Series("B"))
        dirtied, clusters = s.get("dirtied", Series("B")), s.get("dirtied.clusters", Series("B"))
        out.append([f"incremental -> {t} (submit to succeeded)", spread(ours), _rate(dirtied, ours), "", "", ""])
        out.append(["  bytes stored vs bytes dirtied", spread(stored), "",
                    f"dirtied: {human_bytes(dirtied.median)} ({human_bytes(clusters.median)} in whole clusters)",
                    "", _verdict(ratio(stored, dirtied), VAULT_STORED if t in VAULTS else GOAL)])
    for t in targets:
        ours, base = s.get(f"restore.{t}", none), s.get(f"restore.{t}.bare", none)
        out.append([f"restore latest <- {t} (full + incr.)", spread(ours), "",
                    f"{bare_name[f'restore.{t}']}: {spread(base)}", "", _verdict(ratio(ours, base), GOAL)])
        cli = s.get(f"restore.{t}.cli", none)
        out.append(["  same, whole CLI command", spread(cli), "", "", "", _verdict(ratio(cli, base), GOAL)])
        single = s.get(f"restore.{t}.bare_get", none)
        if single.samples:
            out.append(["  vs. one plain GET per artifact", "", "",
                        f"get_object x2 + rebase + convert + fsync: {spread(single)}", "",
                        _verdict(ratio(ours, single), GOAL)])
    if "full.peer" in s:
        out += peer_rows(res, targets)
    return out


def peer_rows(res: Results, targets: list[str]) -> list[list[str]]:
    """Each target's whole CLI commands against virtnbdbackup's on the same data."""
    s = res.series
    none, image = Series("s"), s.get("image.actual_size", Series("B"))
    steps = (("full", "virtnbdbackup -l full", PEER_FASTER, image),
             ("incremental", "virtnbdbackup -l inc", PEER_INCREMENTAL, s.get("dirtied", Series("B"))),
             ("restore", "virtnbdrestore", PEER_FASTER, None))
    out = []
    for job, command, goal, data in steps:
        theirs = s.get(f"{job}.peer", none)
        stored = s.get(f"{job}.peer.stored", Series("B"))
        for t in targets:
            ours = s.get(f"{job}.{t}.cli", none)
            out.append([f"{job} {'<-' if job == 'restore' else '->'} {t} vs. the peer (CLI)", spread(ours),
                        _rate(data, ours) if data else "", f"{command}: {spread(theirs)}",
                        _rate(data, theirs) if data else "", _verdict(ratio(ours, theirs), goal)])
        if stored.samples:
            out.append(["  bytes the peer stored", "", "", spread(stored), "", ""])
    return out


def memory_rows(res: Results, targets: list[str], big_label: str | None) -> list[list[str]]:
    s = res.series
    out = [["worker idle (before each job)", spread(s.get("worker.idle_rss", Series("B"))), ""]]
    for job in ("full", "incremental", "restore"):
        for t in targets:
            peak = s.get(f"{job}.{t}.rss")
            if peak is not None:
                out.append([f"{job} {'<-' if job == 'restore' else '->'} {t}", spread(peak), ""])
    if big_label:
        for t in targets:
            small, big = s.get(f"full.{t}.rss"), s.get(f"memcheck.{big_label}.{t}.rss")
            if small is not None and big is not None:
                out.append([f"full -> {t} with {big_label} of data", spread(big),
                            f"{_verdict(ratio(big, small), FLAT)} (vs the full above)"])
    return out


def table(body: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [header, *body])


def render(res: Results, targets: list[str], machine: dict[str, str], params: dict[str, Any],
           big_label: str | None) -> str:
    lines = ["Machine:"] + [f"  {k:24} {v}" for k, v in machine.items()]
    lines += ["Parameters:"] + [f"  {k:24} {v}" for k, v in params.items()]
    image = res.series.get("image.actual_size")
    if image is not None:
        lines.append(f"  {'guest image size':24} {human_bytes(image.median)} (qemu-img info -U, actual size)")
    load = res.series.get("load.1min")
    if load is not None:
        lines.append(f"  {'load (1 min) per repeat':24} {spread(load)} (other work on the machine shows here)")
    lines += ["", "Times in seconds, median [min-max]; ratio = virtwarden / bare (goal <= 1.10; the format-2 "
              f"targets vault and vault-s3: full <= {VAULT_FULL}, second full stored <= {VAULT_AGAIN}, "
              f"incremental stored <= {VAULT_STORED} x dirtied, restore <= {GOAL}; against the peer virtnbdbackup: "
              "full and "
              f"restore <= {PEER_FASTER:.2f}, incremental <= {PEER_INCREMENTAL}).", ""]
    lines.append(table(rows(res, targets), ["measurement", "virtwarden", "rate", "bare", "rate", "ratio"]))
    lines += ["", "Peak resident memory of the worker process tree (main + pool child + tools it runs):", ""]
    lines.append(table(memory_rows(res, targets, big_label), ["job", "peak RSS", "ratio"]))
    if res.notes:
        lines += ["", "Notes:"] + [f"  - {n}" for n in res.notes]
    return "\n".join(lines)


def ratios(res: Results) -> dict[str, float]:
    """virtwarden / bare for every pair measured (medians), as in the table."""
    pairs = {f"{job}.{t}{cli}": (f"{job}.{t}{cli}", f"{job}.{t}.bare")
             for job in ("full", "restore") for t in ("nfs", "s3") for cli in ("", ".cli")}
    pairs |= {f"full.vault{cli}": (f"full.vault{cli}", "full.nfs.bare") for cli in ("", ".cli")}
    pairs |= {f"full.vault-s3{cli}": (f"full.vault-s3{cli}", "full.s3.bare") for cli in ("", ".cli")}
    pairs |= {f"restore.{t}{cli}": (f"restore.{t}{cli}", f"restore.{t}.bare") for cli in ("", ".cli") for t in VAULTS}
    pairs |= {f"full2.{t}.stored_vs_first": (f"full2.{t}.stored", f"full.{t}.stored") for t in VAULTS}
    pairs |= {f"{job}.{t}.cli_vs_peer": (f"{job}.{t}.cli", f"{job}.peer")
              for job in ("full", "incremental", "restore") for t in ("nfs", "s3", *VAULTS)}
    pairs |= {"full.nfs.vs_push": ("full.nfs", "full.push.bare"),
              "restore.s3.vs_get": ("restore.s3", "restore.s3.bare_get")}
    pairs |= {f"incremental.{t}.stored_vs_dirtied": (f"incremental.{t}.stored", "dirtied")
              for t in ("nfs", "s3", *VAULTS)}
    pairs |= {f"incremental.{t}.stored_vs_clusters": (f"incremental.{t}.stored", "dirtied.clusters")
              for t in ("nfs", "s3", *VAULTS)}
    pairs |= {f"memcheck.{k.split('.', 1)[1].rsplit('.', 1)[0]}.rss": (k, f"full.{k.split('.')[-2]}.rss")
              for k in res.series if k.startswith("memcheck.") and k.endswith(".rss")}
    s = res.series
    return {name: ratio(s[a], s[b]) for name, (a, b) in pairs.items() if a in s and b in s}


def write_json(path: Path, res: Results, machine: dict[str, str], params: dict[str, Any]) -> None:
    doc = {"machine": machine, "parameters": params, "notes": res.notes, "ratios": ratios(res),
           "series": {k: v.to_json() for k, v in sorted(res.series.items())}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
