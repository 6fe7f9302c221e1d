"""Shared test plumbing.

Tests that need a real service (libvirtd, Redis, the S3 endpoint) ask for it through a
fixture. When the service is absent the test skips, unless VIRTWARDEN_REQUIRE_LIBVIRT is
set (``.ci/run`` sets it): then a missing service is an error, so CI cannot pass by
skipping.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = bool(os.environ.get("VIRTWARDEN_REQUIRE_LIBVIRT"))


def need(condition: bool, why: str) -> None:
    """Skip (locally) or fail (in CI) when a real service is missing."""
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"required service missing: {why} (VIRTWARDEN_REQUIRE_LIBVIRT is set)")
    pytest.skip(why)


def need_module(name: str) -> ModuleType:
    """The module ``name``, imported; skip (locally) or fail (in CI) when it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"{name} is not importable: {e}")
        raise  # not reached: need() skipped or failed


pytest_plugins = ["tests.guests", "tests.agentguest", "tests.s3server", "tests.faultproxy", "tests.harness"]
