"""The scheduler's sending process (``celery_app.Publisher``): its messages reach the real
broker; a process SIGKILLed between two requests is replaced by the next one, and one
killed during a request reports that request's jobs unsent (for the sweeper); a dead
broker is reported, not hidden; closing it leaves no process behind."""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from datetime import UTC, datetime

import pytest
from virtwarden.catalog.views import JobView

from virtwarden import config as config_module
from virtwarden.errors import BrokerUnavailable


def _jobs(n: int) -> list[JobView]:
    now = datetime.now(UTC)
    return [JobView(id=str(uuid.uuid4()), kind="backup", state="queued", domain=f"d{i}", host=f"pub-{i % 2}",
                    params={}, result=None, error=None, progress=0.0, progress_text=None, attempts=0, max_attempts=3,
                    created_at=now, started_at=None, finished_at=None, requested_by="scheduler") for i in range(n)]


def _queued(redis_url: str) -> list[str]:
    import redis
    from virtwarden.worker import celery_app

    client = redis.Redis.from_url(redis_url)
    return [m.decode() for host in ("pub-0", "pub-1") for m in client.lrange(celery_app.queue_for(host), 0, -1)]


@pytest.fixture
def broker(redis_url: str):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    yield redis_url
    redis.Redis.from_url(redis_url).flushdb()


def test_a_publisher_sends_and_one_killed_between_requests_is_replaced(broker, tmp_path):
    from virtwarden.worker import celery_app

    cfg = config_module.load(None, env={"VIRTWARDEN_BROKER_URL": broker, "VIRTWARDEN_DATA_DIR": str(tmp_path)})
    made = _jobs(7)
    publisher = celery_app.Publisher(cfg).start()
    try:
        sent, error = publisher.send_many(made[:3])
        assert error is None and sent == made[:3]
        queued = _queued(broker)
        assert all(any(j.id in m for m in queued) for j in made[:3])
        first = publisher._proc.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while publisher._proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        sent, error = publisher.send_many(made[3:5])  # a new process serves it
        assert error is None and sent == made[3:5] and publisher._proc.pid != first
        sent, error = publisher.send_many(made[5:])
        assert error is None and sent == made[5:]
        queued = _queued(broker)
        assert all(any(j.id in m for m in queued) for j in made)
        assert len(queued) == len(made)
    finally:
        publisher.close()
    assert publisher._proc is None


def test_a_publisher_whose_process_dies_during_a_request_reports_its_jobs_unsent(broker, tmp_path):
    """SIGSTOP holds the process in the middle of a request; SIGKILL ends it there: the
    request's jobs come back unsent with an error saying so (the sweeper sends them)."""
    from virtwarden.worker import celery_app

    cfg = config_module.load(None, env={"VIRTWARDEN_BROKER_URL": broker, "VIRTWARDEN_DATA_DIR": str(tmp_path)})
    publisher = celery_app.Publisher(cfg).start()
    try:
        assert publisher.send_many(_jobs(1))[1] is None  # started and serving
        pid = publisher._proc.pid
        os.kill(pid, signal.SIGSTOP)
        import threading

        result: list = []
        asking = threading.Thread(target=lambda: result.append(publisher.send_many(_jobs(4))))
        asking.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        asking.join(20)
        assert not asking.is_alive()
        sent, error = result[0]
        assert sent == [] and isinstance(error, BrokerUnavailable) and "ended" in str(error)
    finally:
        publisher.close()


def test_a_wedged_publisher_is_killed_and_its_request_reported_unsent(broker, tmp_path, monkeypatch):
    """A process that stops answering (SIGSTOP, as a hang would) does not hold the tick:
    after PUBLISHER_SECONDS it is killed, the request's jobs come back unsent, and the
    next request starts a new process."""
    from virtwarden.worker import celery_app

    cfg = config_module.load(None, env={"VIRTWARDEN_BROKER_URL": broker, "VIRTWARDEN_DATA_DIR": str(tmp_path)})
    publisher = celery_app.Publisher(cfg).start()
    try:
        # A new process's imports count against the budget: the first send gets the
        # default, the wedged one 2 s.
        assert publisher.send_many(_jobs(1))[1] is None
        monkeypatch.setattr(celery_app, "PUBLISHER_SECONDS", 2.0)
        stopped = publisher._proc
        os.kill(stopped.pid, signal.SIGSTOP)
        start = time.monotonic()
        sent, error = publisher.send_many(_jobs(3))
        assert time.monotonic() - start < 10
        assert sent == [] and isinstance(error, BrokerUnavailable) and "no answer within 2s" in str(error)
        assert not stopped.is_alive()
        # The next request starts a new process, whose imports count against the same
        # budget: 2 s is too little for them on a loaded 2-core machine.
        monkeypatch.setattr(celery_app, "PUBLISHER_SECONDS", 60.0)
        made = _jobs(2)
        assert publisher.send_many(made) == (made, None)
    finally:
        publisher.close()


def test_a_broker_that_stops_answering_fails_a_send_instead_of_holding_it(tmp_path, monkeypatch):
    """A Redis SIGSTOPped (it accepts connections and never answers) used to hold a send
    for ever, and with it the scheduler's tick: every later slot of the fleet waited. The
    broker's sockets now time out: the send fails, its jobs stay due for the sweeper, and
    once the broker answers again the next send goes."""
    from virtwarden.worker import celery_app

    from tests.faults import PrivateRedis

    monkeypatch.setattr(celery_app, "BROKER_IO_SECONDS", 2.0)
    before = celery_app._config
    redis_server = PrivateRedis(tmp_path / "redis")
    redis_server.start()
    try:
        cfg = config_module.load(None, env={"VIRTWARDEN_BROKER_URL": redis_server.url,
                                            "VIRTWARDEN_DATA_DIR": str(tmp_path)})
        celery_app.configure(cfg)
        first = _jobs(2)
        assert celery_app.send_many(first) == (first, None)
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        result: list = []
        import threading

        sending = threading.Thread(target=lambda: result.append(celery_app.send_many(_jobs(5))), daemon=True)
        sending.start()
        sending.join(20)  # the old code is still waiting here
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert not sending.is_alive(), "the send still waits for a broker that does not answer"
        sent, error = result[0]
        assert sent == [] and isinstance(error, BrokerUnavailable) and "unreachable" in str(error)
        again = _jobs(3)
        assert celery_app.send_many(again) == (again, None)
    finally:
        redis_server.stop()
        monkeypatch.undo()
        if before is not None:  # this process's app as the tests before this one left it
            celery_app.configure(before)


def test_a_publisher_reports_a_dead_broker(tmp_path):
    from virtwarden.worker import celery_app

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config_module.load(None, env={"VIRTWARDEN_BROKER_URL": f"redis://127.0.0.1:{port}/0",
                                        "VIRTWARDEN_DATA_DIR": str(tmp_path)})
    publisher = celery_app.Publisher(cfg)
    try:
        sent, error = publisher.send_many(_jobs(3))
        assert sent == [] and isinstance(error, BrokerUnavailable) and "unreachable" in str(error)
    finally:
        publisher.close()
