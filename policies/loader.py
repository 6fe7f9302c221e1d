"""Reading policy files: every error of every document, each as ``file:line: field: message``.

An operator fixing a policy directory wants the whole list at once, not one error per
run, so errors are collected across documents and files and raised together. A file
may hold several documents separated by ``---``; line numbers are those of the file.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from virtwarden.policies.model import API_VERSION, KIND, Policy, Source, problems
from virtwarden.policies.runbooks import BUILTINS, Runbook
from virtwarden.policies.runbooks import KIND as RUNBOOK_KIND

from virtwarden.errors import PolicyError
from virtwarden.validation import explain, suggest
from virtwarden.yamldoc import Document, YamlSyntaxError, format_path, load_documents
from virtwarden.yamldoc import Path as KeyPath

SUFFIXES = (".yaml", ".yml")
# YAML reads a plain value starting with '*' as an alias: the usual slip in a cron schedule.
_QUOTE_HINT = " (quote values that start with '*' or '&', e.g. schedule: \"*/15 * * * *\")"


def load_file(path: str | Path) -> list[Policy]:
    """The policies of one file; PolicyError listing every error when any is wrong."""
    reader = _Reader()
    reader.file(Path(path))
    return reader.result()


def load_dir(directory: str | Path, *, missing_ok: bool = False) -> list[Policy]:
    """The policies of every ``*.yaml``/``*.yml`` file of ``directory`` (not its subdirectories),
    read in name order; PolicyError listing every error when any is wrong. ``missing_ok``:
    a directory that does not exist holds no policies (the configured directory), instead
    of being an error (a path given to ``policy validate``).

    Read once per process and again only when the files change: the scheduler settles
    thousands of slots a tick, the listener every event, each asking for the policies.
    A change is any file added, removed, renamed, or with another size, inode or
    modification or change time (nanoseconds), which an editor's save or a
    configuration manager's rename always makes. A file changed in the last
    ``SETTLE_SECONDS`` is read every time: file times advance in clock ticks of a few
    milliseconds, so two saves within one tick could otherwise look alike. Policies
    are frozen, so the same objects can be handed out again; a directory with errors is
    read every time."""
    path = Path(directory)
    held: dict[Path, tuple[Policy, ...]] | None = getattr(_held, "dirs", None)
    if held is not None and path in held:
        return list(held[path])
    try:
        signature = _signature(path)
    except OSError:  # gone, or not readable: the reader says which, precisely
        signature = None
    with _cache_lock:
        cached = _cache.get(path)
    if signature is not None and cached is not None and cached[0] == signature:
        found = list(cached[1])
    elif signature is None and missing_ok and not path.is_dir():
        found = []
    else:
        reader = _Reader()
        reader.path(path)
        found = reader.result()
        settled = time.time_ns() - int(SETTLE_SECONDS * 1e9)
        if signature is not None and all(entry[4] < settled for entry in signature):
            with _cache_lock:
                _cache[path] = (signature, tuple(found))
    if held is not None:
        held[path] = tuple(found)
    return list(found)


@contextmanager
def held() -> Iterator[None]:
    """Within it, ``load_dir`` looks at each policy directory once in this thread: later
    calls get the policies of the first look, without a ``stat`` of every file. A
    scheduler tick settles thousands of slots from one reading (a look per slot cost
    0.6 s of a 20,000-slot tick), and its decisions and its jobs' parameters come from
    the same policies; an edit takes effect at the next tick. Nests."""
    outer = getattr(_held, "dirs", None)
    if outer is None:
        _held.dirs = {}
    try:
        yield
    finally:
        if outer is None:
            del _held.dirs


SETTLE_SECONDS = 2.0
_cache: dict[Path, tuple[tuple, tuple[Policy, ...]]] = {}
_cache_lock = threading.Lock()
_held = threading.local()


def _signature(directory: Path) -> tuple:
    """(name, size, inode, mtime, ctime) of each policy file, ctime last."""
    return tuple((f.name, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                 for f in policy_files(directory) for st in (f.stat(),))


def load_runbooks(directory: str | Path) -> list[Runbook]:
    """The ``kind: Runbook`` documents of the policy directory's files (after the
    built-in ones); PolicyError listing every error of every document when any is wrong."""
    reader = _Reader()
    if Path(directory).is_dir():
        reader.path(Path(directory))
    if reader.errors:
        raise PolicyError("\n".join(reader.errors))
    return [*BUILTINS, *reader.runbooks]


def validate_paths(paths: list[str], runbooks: list[Runbook] | None = None) -> tuple[list[Policy], list[str]]:
    """For ``virtwarden policy validate``: the valid policies and the error lines (the
    valid runbooks are appended to ``runbooks`` when given).

    Each path is a file or a directory; policy names must be unique across all of them,
    as they would be in one policy_dir.
    """
    reader = _Reader()
    for path in paths:
        reader.path(Path(path))
    if runbooks is not None:
        runbooks.extend(reader.runbooks)
    return reader.policies, reader.errors


def policy_files(directory: Path) -> list[Path]:
    """The files ``load_dir`` reads, in order; hidden files (editor leftovers) are skipped."""
    return sorted(p for p in directory.iterdir()
                  if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file())


class _Reader:
    """Collects policies and error lines over any number of files."""

    def __init__(self) -> None:
        self.policies: list[Policy] = []
        self.runbooks: list[Runbook] = []
        self.errors: list[str] = []
        self._names: dict[str, Policy] = {}
        self._runbook_names: dict[str, Runbook] = {b.name: b for b in BUILTINS}

    def result(self) -> list[Policy]:
        if self.errors:
            raise PolicyError("\n".join(self.errors))
        return self.policies

    def path(self, path: Path) -> None:
        if path.is_dir():
            for file in policy_files(path):
                self.file(file)
        elif path.exists():
            self.file(path)
        else:
            self.errors.append(f"{path}: no such file or directory")

    def file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.errors.append(f"{path}: no such file or directory")
            return
        except UnicodeDecodeError:
            self.errors.append(f"{path}: not UTF-8 text")
            return
        except OSError as e:
            self.errors.append(f"{path}: cannot read: {e.strerror}")
            return
        try:
            documents = load_documents(text, str(path))
        except YamlSyntaxError as e:
            self.errors.append(str(e) + (_QUOTE_HINT if "alphabetic or numeric" in e.message else ""))
            return
        for document in documents:
            self.document(document)

    def document(self, doc: Document) -> None:
        if not isinstance(doc.data, dict):
            self.errors.append(f"{doc.file}:{doc.line}: document: must be a mapping with apiVersion, kind,"
                               f" metadata and spec (found {_kind_of(doc.data)})")
            return
        data = _string_keys(doc.data, (), _children(doc))
        header = _header_problems(data)
        if header:  # another version or kind: its other fields would only add noise
            self._report(doc, header)
            return
        if data.get("kind") == RUNBOOK_KIND:
            self._runbook(doc, data)
            return
        try:
            policy = Policy.model_validate(data)
        except ValidationError as e:
            self.errors.extend(explain(e, Policy, doc.file, doc))
            return
        policy = policy.placed(Source(doc.file, doc.line, doc))
        self._report(doc, problems(policy))
        self._add(policy)

    def _add(self, policy: Policy) -> None:
        first = self._names.get(policy.name)
        if first is not None:
            self.errors.append(f"{policy.source.at(('metadata', 'name'))}: metadata.name: duplicate policy name"
                               f" {policy.name!r} (first defined at {first.source.at(('metadata', 'name'))})")
            return
        self._names[policy.name] = policy
        self.policies.append(policy)

    def _runbook(self, doc: Document, data: dict[str, Any]) -> None:
        try:
            book = Runbook.model_validate(data)
        except ValidationError as e:
            self.errors.extend(explain(e, Runbook, doc.file, doc))
            return
        book = book.placed(Source(doc.file, doc.line, doc))
        first = self._runbook_names.get(book.name)
        if first is not None:
            where = "a built-in runbook" if first.builtin else f"first defined at {first.source_text}"
            self.errors.append(f"{doc.file}:{doc.line_of(('metadata', 'name'))}: metadata.name: duplicate runbook"
                               f" name {book.name!r} ({where})")
            return
        self._runbook_names[book.name] = book
        self.runbooks.append(book)

    def _report(self, doc: Document, found: list[tuple[KeyPath, str]]) -> None:
        self.errors.extend(f"{doc.file}:{doc.line_of(path)}: {format_path(path)}: {message}"
                           for path, message in found)


def _header_problems(data: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    """apiVersion and kind, when present and wrong (when missing, the schema says so)."""
    out: list[tuple[KeyPath, str]] = []
    version, kind = data.get("apiVersion"), data.get("kind")
    if "apiVersion" in data and version != API_VERSION:
        out.append((("apiVersion",), f"unsupported apiVersion {version!r}: this virtwarden reads"
                    f" {API_VERSION!r}"))
    if "kind" in data and kind not in (KIND, RUNBOOK_KIND):
        hint = suggest(kind, [KIND, RUNBOOK_KIND]) if isinstance(kind, str) else ""
        out.append((("kind",), f"unknown kind {kind!r}{hint}: policy files hold kind {KIND!r}"
                    f" or {RUNBOOK_KIND!r}"))
    return out


def _children(doc: Document) -> dict[KeyPath, list[str]]:
    """The keys of each mapping as written in the file, by the mapping's path."""
    out: dict[KeyPath, list[str]] = {}
    for path in doc.lines:
        if path and isinstance(path[-1], str):
            out.setdefault(path[:-1], []).append(path[-1])
    return out


def _string_keys(data: Any, path: KeyPath, written: dict[KeyPath, list[str]]) -> Any:
    """``data`` with every mapping key as it was written.

    YAML 1.1 reads the key ``on:`` (like yes/no/off) as a boolean and ``1:`` as a
    number; a policy's keys are names, so the text of the file is put back.
    """
    if isinstance(data, list):
        return [_string_keys(item, path + (i,), written) for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        name = key if isinstance(key, str) else _as_written(key, written.get(path, []))
        out[name] = _string_keys(value, path + (name,), written)
    return out


def _as_written(key: object, candidates: list[str]) -> str:
    for text in candidates:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if type(value) is type(key) and value == key:
            return text
    return str(key)


def _kind_of(data: object) -> str:
    if data is None:
        return "an empty value"
    if isinstance(data, list):
        return "a list"
    return f"the {type(data).__name__} {data!r}" if len(repr(data)) < 40 else f"a {type(data).__name__}"
