"""Which policy governs a domain: pure functions over what is known about the domain.

A selector matches when every condition it states holds:
- the domain name matches one of ``domains`` and none of ``exclude`` (fnmatch globs,
  case-sensitive, as libvirt names are);
- ``hosts`` (when the policy names hosts and the domain's host is known) matches the host;
- every ``metadata`` key is present in the domain's virtwarden metadata with that value.

Overlaps: when several policies select one domain for the same job, the one whose job
section has the highest ``priority`` governs it alone. Equal top priorities are an error
naming the policies, never two jobs: a silent double backup would fill the storage and
split the chains between targets.

The virtwarden metadata of a domain lives in its libvirt ``<metadata>`` element, in the
namespace ``METADATA_NAMESPACE``; each child element is a key, its text the value::

    virsh metadata vm1 --uri https://virtwarden.dev/xmlns/1 --key vw \\
        --set '<virtwarden><tier>gold</tier><backup>nightly</backup></virtwarden>'
"""
from __future__ import annotations

import fnmatch
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field

from virtwarden.policies.model import JOBS, Job, Policy, Selector

from virtwarden.errors import NotFound, PolicyError
from virtwarden.validation import suggest

METADATA_NAMESPACE = "https://virtwarden.dev/xmlns/1"


@dataclass(frozen=True)
class DomainFacts:
    """What selection may look at. ``host`` None: not known yet, so hosts are not checked."""

    name: str
    host: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def selects(policy: Policy, facts: DomainFacts) -> bool:
    """Whether ``policy``'s selector matches the domain (whatever jobs the policy has)."""
    return _matches(policy.spec.selector, facts)


def _matches(sel: Selector, facts: DomainFacts) -> bool:
    if not _any_glob(facts.name, sel.domains) or _any_glob(facts.name, sel.exclude):
        return False
    if sel.hosts is not None and facts.host is not None and not _any_glob(facts.host, sel.hosts):
        return False
    return all(facts.metadata.get(key) == value for key, value in sel.metadata.items())


def _any_glob(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)


def matching(policies: Iterable[Policy], facts: DomainFacts, job: Job = "backup") -> list[Policy]:
    """The policies that select the domain and ask for ``job``, highest priority first
    (then by name, so the order is stable)."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}: one of {', '.join(JOBS)}")
    found = [p for p in policies if p.section(job) is not None and selects(p, facts)]
    return sorted(found, key=lambda p: (-priority(p, job), p.name))


def priority(policy: Policy, job: Job) -> int:
    section = policy.section(job)
    return section.priority if section is not None else 0


def governing(policies: Iterable[Policy], facts: DomainFacts, job: Job = "backup") -> Policy | None:
    """The one policy that governs ``job`` for the domain, None when none selects it.

    PolicyError when the highest priority is shared: the operator must decide.
    """
    found = matching(policies, facts, job)
    if not found:
        return None
    top = [p for p in found if priority(p, job) == priority(found[0], job)]
    if len(top) > 1:
        named = " and ".join(f"{p.name!r} ({p.source_text})" for p in top)
        section = "spec." + {"snapshot": "snapshots"}.get(job, job)
        raise PolicyError(f"policies {named} {'both' if len(top) == 2 else 'all'} select domain {facts.name!r}"
                          f" for {job} with priority {priority(top[0], job)}: give one a higher"
                          f" {section}.priority or narrow a selector (exclude)")
    return found[0]


def by_name(policies: list[Policy], name: str) -> Policy:
    """The policy called ``name``, whatever it selects; NotFound, with a near name
    suggested, when there is none."""
    for candidate in policies:
        if candidate.name == name:
            return candidate
    names = sorted(p.name for p in policies)
    raise NotFound(f"no policy named {name!r}{suggest(name, names)} (known: {', '.join(names) or 'none'})")


def parse_metadata(xml: str) -> dict[str, str]:
    """The virtwarden metadata of a domain, from its whole XML or from the element alone
    (what ``virDomainGetMetadata`` answers for METADATA_NAMESPACE); {} when absent."""
    root = ET.fromstring(xml)
    if root.tag == "domain":
        found = root.find(f"metadata/{{{METADATA_NAMESPACE}}}*")
        if found is None:
            return {}
        root = found
    return {_local(child.tag): (child.text or "").strip() for child in root}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
