"""``virtwarden.submit.wait`` (what ``--wait`` and runbooks run) through a real
PostgreSQL outage: a TCP proxy in front of the server closes every connection and
refuses new ones while it is cut, as a restarting or failing-over server does."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from tests.faults import CuttableProxy


def _running_job(url: str):
    from virtwarden.catalog import jobs
    from virtwarden.catalog.store import Catalog

    cat = Catalog(url)
    job = jobs.create(cat, kind="backup", domain="web01", host="local", params={})
    claim = jobs.claim(cat, job.id, "worker-a", 600, lock_domain=False)
    assert claim.fence is not None, claim
    return cat, job, claim.fence


def test_a_wait_outlasts_a_catalog_outage_and_sees_the_end(pg_schema_url: str, caplog) -> None:
    """The catalog goes away while the job runs; the job ends meanwhile (its worker
    reaches the server directly); the wait reads again until the catalog is back and
    returns the succeeded job instead of failing at the first read."""
    from virtwarden.catalog import jobs
    from virtwarden.catalog.store import Catalog

    from virtwarden.submit import wait

    direct, job, fence = _running_job(pg_schema_url)
    with CuttableProxy(5432) as proxy:
        cat = Catalog(proxy.url(pg_schema_url))
        outage_over = threading.Event()

        def outage() -> None:
            time.sleep(0.5)
            proxy.cut()
            time.sleep(2)
            jobs.finish(direct, fence, ok=True, result={"point_id": "p-1"})
            time.sleep(2)
            proxy.restore()
            outage_over.set()

        t = threading.Thread(target=outage)
        caplog.set_level(logging.WARNING, logger="virtwarden.submit")
        t.start()
        try:
            done = wait(cat, job.id, outage=60)
        finally:
            t.join(30)
            cat.close()
            direct.close()
    assert outage_over.is_set()
    assert (done.state, done.result) == ("succeeded", {"point_id": "p-1"})
    said = [r.getMessage() for r in caplog.records]
    assert any("the catalog cannot be read" in m for m in said), said
    assert any("the catalog can be read again" in m for m in said), said


def test_a_wait_gives_up_after_its_patience_saying_the_job_goes_on(pg_schema_url: str) -> None:
    from virtwarden.catalog import jobs
    from virtwarden.catalog.store import Catalog

    from virtwarden.errors import DatabaseUnavailable
    from virtwarden.submit import wait

    direct, job, _fence = _running_job(pg_schema_url)
    try:
        with CuttableProxy(5432) as proxy:
            cat = Catalog(proxy.url(pg_schema_url))
            try:
                proxy.cut()
                start = time.monotonic()
                with pytest.raises(DatabaseUnavailable) as e:
                    wait(cat, job.id, outage=2)
                took = time.monotonic() - start
            finally:
                cat.close()
        assert 2 <= took < 30, took
        assert f"job {job.id}: the catalog could not be read for" in str(e.value)
        assert f"virtwarden job {job.id}" in str(e.value)
        assert e.value.exit_code == 5
        assert jobs.get(direct, job.id).state == "running"  # the wait changed nothing
    finally:
        direct.close()
