"""Runbooks: named, parameterised sequences of on-call actions. Pure, like policies.

Built-in runbooks cover what an on-call engineer reaches for (restore-latest,
restore-at, drill-now, evacuate-host, verify-repository); operators add their own as
``kind: Runbook`` documents in the policy directory, next to their policies::

    apiVersion: virtwarden/v1
    kind: Runbook
    metadata: {name: db-recover, description: "prove last night's backup, then bring it up"}
    spec:
      params:
        domain: {required: true, help: "the database domain"}
      steps:
        - action: drill
          with: {domain: "{domain}"}
        - action: restore
          with: {domain: "{domain}", point: latest, as_domain: "{domain}-recovered"}

A step's values may name parameters in braces; every name must be a declared
parameter, every key must belong to its action, and an action's required keys must be
given (checked when the file is read, with ``file:line: field: message`` errors).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, StrictBool, model_validator
from virtwarden.policies.fields import choice
from virtwarden.policies.model import Metadata, Source, _Strict

from virtwarden.errors import PolicyError
from virtwarden.validation import suggest

KIND = "Runbook"
Action = Literal["backup", "snapshot", "restore", "drill", "evacuate", "verify"]


@dataclass(frozen=True)
class ActionKeys:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    one_of: tuple[tuple[str, ...], ...] = ()  # exactly one key of each group

    @property
    def allowed(self) -> tuple[str, ...]:
        return self.required + self.optional


ACTIONS: dict[str, ActionKeys] = {
    "backup": ActionKeys(("domain",), ("policy", "full")),
    "snapshot": ActionKeys(("domain",), ("policy",)),
    "restore": ActionKeys(("domain",), ("point", "at", "to_dir", "as_domain", "in_place", "start", "discard_old"),
                          one_of=(("to_dir", "as_domain", "in_place"),)),
    "drill": ActionKeys(("domain",), ("point", "policy")),
    "evacuate": ActionKeys(("host",), ("to",)),
    "verify": ActionKeys((), ("domain", "storage", "sample_percent")),
}
BOOLEAN_KEYS = {"full", "in_place", "start", "discard_old"}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off", ""}


ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class Param(_Strict):
    required: StrictBool = False
    default: str | None = None
    help: str = ""


class Step(_Strict):
    action: Annotated[Action, choice(Action)]
    with_: dict[str, str | bool | int] = Field(default_factory=dict, alias="with")

    @model_validator(mode="after")
    def _keys(self) -> Step:
        keys = ACTIONS[self.action]
        unknown = [k for k in self.with_ if k not in keys.allowed]
        if unknown:
            k = unknown[0]
            raise ValueError(f"{self.action} takes no {k!r}{suggest(k, list(keys.allowed))}"
                             f" (it takes: {', '.join(keys.allowed)})")
        missing = [k for k in keys.required if k not in self.with_]
        if missing:
            raise ValueError(f"{self.action} needs {', '.join(missing)}")
        for group in keys.one_of:  # with parameters in them, render() checks it
            given = [k for k in group if k in self.with_]
            if len(given) > 1 and not any(placeholders(self.with_[k]) for k in given):
                raise ValueError(f"{self.action} takes one of {', '.join(group)}, not {' and '.join(given)}")
        return self


class RunbookSpec(_Strict):
    description: str = ""
    params: dict[ParamName, Param] = Field(default_factory=dict)
    steps: tuple[Step, ...]

    @model_validator(mode="after")
    def _placeholders(self) -> RunbookSpec:
        if not self.steps:
            raise ValueError("a runbook needs at least one step")
        for i, step in enumerate(self.steps):
            for key, value in step.with_.items():
                for name in placeholders(value):
                    if name not in self.params:
                        raise ValueError(f"steps[{i}].with.{key}: {{{name}}} is not a parameter"
                                         f"{suggest(name, list(self.params))}"
                                         f" (declared: {', '.join(self.params) or 'none'})")
        return self


class Runbook(_Strict):
    apiVersion: Literal["virtwarden/v1"]
    kind: Literal["Runbook"]
    metadata: Metadata
    spec: RunbookSpec
    _source: Source = PrivateAttr(default_factory=lambda: Source("<built-in>", 1))

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def source_text(self) -> str:
        return self._source.at()

    def placed(self, source: Source) -> Runbook:
        self._source = source
        return self

    @property
    def builtin(self) -> bool:
        return self._source.file == "<built-in>"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.spec.description or self.metadata.description or "",
                "source": self.source_text, "builtin": self.builtin,
                "params": {k: p.model_dump() for k, p in self.spec.params.items()},
                "steps": [{"action": s.action, "with": dict(s.with_)} for s in self.spec.steps]}


@dataclass(frozen=True)
class Planned:
    """One step with its values filled in."""

    index: int
    action: str
    args: dict[str, Any]


def placeholders(value: object) -> list[str]:
    if not isinstance(value, str):
        return []
    try:
        return [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
    except ValueError as e:
        raise ValueError(f"{value!r}: {e} (write {{{{ and }}}} for literal braces)") from e


def render(book: Runbook, given: dict[str, str]) -> list[Planned]:
    """The steps with ``given`` parameters filled in; PolicyError naming every problem
    (an unknown or missing parameter) before anything runs."""
    declared = book.spec.params
    errors = [f"runbook {book.name}: unknown parameter {k!r}{suggest(k, list(declared))}"
              f" (it takes: {', '.join(declared) or 'none'})" for k in given if k not in declared]
    values = {k: p.default for k, p in declared.items() if p.default is not None}
    values.update({k: v for k, v in given.items() if k in declared})
    errors += [f"runbook {book.name}: parameter {k!r} is required ({p.help or 'no help given'})"
               for k, p in declared.items() if p.required and not values.get(k)]
    if errors:
        raise PolicyError("\n".join(errors))
    out = []
    for i, step in enumerate(book.spec.steps):
        args: dict[str, Any] = {}
        for key, raw in step.with_.items():
            value = raw.format_map({k: values.get(k, "") for k in declared}) if isinstance(raw, str) else raw
            if key in BOOLEAN_KEYS:
                value = _boolean(book.name, i, key, value)
            elif value == "":
                continue  # an optional parameter left empty: as if the key were not given
            args[key] = value
        keys = ACTIONS[step.action]
        for group in keys.one_of:
            chosen = [k for k in group if args.get(k) not in (None, False)]
            if len(chosen) != 1:
                raise PolicyError(f"runbook {book.name}: step {i + 1} ({step.action}) needs exactly one of"
                                  f" {', '.join(group)}; got {', '.join(chosen) or 'none'}")
        out.append(Planned(i + 1, step.action, args))
    return out


def _boolean(book: str, i: int, key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise PolicyError(f"runbook {book}: step {i + 1}: {key} must be true or false, not {value!r}")


def _builtin(name: str, description: str, params: dict[str, dict], steps: list[dict]) -> Runbook:
    return Runbook.model_validate({"apiVersion": "virtwarden/v1", "kind": KIND,
                                   "metadata": {"name": name, "description": description},
                                   "spec": {"description": description, "params": params, "steps": steps}})


_DOMAIN = {"required": True, "help": "the domain to act on"}
_RESTORE_TARGET = {
    "to_dir": {"default": "", "help": "restore into this directory of flat images"},
    "as_domain": {"default": "", "help": "or define a new domain of this name"},
    "in_place": {"default": "false", "help": "or replace the domain's disks (it is shut off first)"},
    "start": {"default": "false", "help": "start the restored domain"},
}
_RESTORE_WITH = {"domain": "{domain}", "to_dir": "{to_dir}", "as_domain": "{as_domain}", "in_place": "{in_place}",
                 "start": "{start}"}

BUILTINS: tuple[Runbook, ...] = (
    _builtin("restore-latest", "restore a domain's newest complete restore point",
             {"domain": _DOMAIN, **_RESTORE_TARGET},
             [{"action": "restore", "with": {**_RESTORE_WITH, "point": "latest"}}]),
    _builtin("restore-at", "restore the last complete point at or before a time (ISO 8601)",
             {"domain": _DOMAIN, "at": {"required": True, "help": "e.g. 2026-11-27T03:00+01:00"}, **_RESTORE_TARGET},
             [{"action": "restore", "with": {**_RESTORE_WITH, "at": "{at}"}}]),
    _builtin("drill-now", "restore a point into scratch space and boot it as an isolated throwaway domain",
             {"domain": _DOMAIN, "point": {"default": "latest", "help": "a point id, or latest"}},
             [{"action": "drill", "with": {"domain": "{domain}", "point": "{point}"}}]),
    _builtin("evacuate-host", "live-migrate every running domain of a host to other hosts",
             {"host": {"required": True, "help": "the host to empty"},
              "to": {"default": "", "help": "only to these hosts (comma-separated)"}},
             [{"action": "evacuate", "with": {"host": "{host}", "to": "{to}"}}]),
    _builtin("verify-repository", "re-read stored artifacts and check their SHA-256 against the catalog;"
             " damaged points are taken out of service",
             {"domain": {"default": "", "help": "only this domain's points"},
              "storage": {"default": "", "help": "only this storage target"},
              "sample_percent": {"default": "100", "help": "re-read this percentage of the artifacts, least"
                                 " recently verified first"}},
             [{"action": "verify", "with": {"domain": "{domain}", "storage": "{storage}",
                                            "sample_percent": "{sample_percent}"}}]),
)
