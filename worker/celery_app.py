"""The Celery app: Redis broker, a queue per hypervisor host, one task that runs a job row.

Why these settings (see docs/architecture.md, "Jobs survive workers"):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only
  after its job finished, so a worker killed mid-job does not lose it.
- ``visibility_timeout`` far above the longest backup: Redis would otherwise hand an
  unacknowledged message to another worker after an hour. A redelivered or duplicate
  message is harmless anyway: the job row's lease lets only one worker run it.
- ``worker_prefetch_multiplier = 1``: a worker busy with a long backup does not hoard
  messages other workers could take.
- Socket timeouts on the broker's connections (``BROKER_IO_SECONDS``): a broker that
  stops answering fails a send instead of holding the sender for ever.
- Results live in the catalog, not in a result backend.
- The sweeper thread in each worker (worker/outbox.py, sending through ``send``) requeues jobs whose worker
  died (lease expired) without waiting for the broker to redeliver their message, and
  sends again any queued job whose message is overdue (a broker outage delays jobs,
  it never drops them).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals
from kombu.exceptions import BatchPublishError
from kombu.exceptions import OperationalError as KombuOperationalError
from virtwarden.catalog import jobs
from virtwarden.catalog.services import Presence
from virtwarden.catalog.store import Catalog

from virtwarden.config import Config
from virtwarden.errors import BrokerUnavailable

log = logging.getLogger(__name__)
TASK = "virtwarden.run_job"
# A broker that accepts connections but stops answering (a Redis stopped, wedged or
# swapping) fails a send after this long instead of holding it for ever: the sender (a
# scheduler tick, the listener, a CLI command, the sweeper) reports it and the job stays
# queued and due. Far above a worker's wait for messages (kombu's BRPOP, 1 s).
BROKER_IO_SECONDS = 30.0
BROKER_CONNECT_SECONDS = 10.0
# The longest a Publisher's process may take to answer one request (a batch's sends,
# themselves bounded by the timeouts above): past it the process is killed.
PUBLISHER_SECONDS = 120.0
BUSY_RETRY_SECONDS = 15

app = Celery("virtwarden")
_config: Config | None = None
_catalogs: dict[str, Catalog] = {}


def catalog() -> Catalog:
    """This process's catalog (one engine per process: pool children open their own
    after the fork, and reuse it for every job)."""
    url = config().catalog_url
    if url not in _catalogs:
        _catalogs[url] = Catalog(url)
    return _catalogs[url]


def queue_for(host: str) -> str:
    return f"host.{host}"


def configure(cfg: Config) -> Celery:
    """Point the app at the configured broker (called once per process)."""
    global _config
    _config = cfg
    if app.conf.get("broker_url") != cfg.broker_url:
        _forget_broker_connections()
    app.conf.update(
        broker_url=cfg.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": cfg.worker.visibility_timeout_seconds,
                                  "socket_timeout": BROKER_IO_SECONDS,
                                  "socket_connect_timeout": BROKER_CONNECT_SECONDS},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue="virtwarden",
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def _forget_broker_connections() -> None:
    """The app's pools are those of the broker configured before: a process pointed at
    another broker must take its connections from that broker's pools (Celery resets the
    same two after a fork). The old pools stay in kombu's registry, open, for a process
    pointed back at their broker."""
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def config() -> Config:
    if _config is None:
        from virtwarden import config as config_module

        configure(config_module.load_for_process())
    assert _config is not None
    return _config


@app.task(name=TASK, bind=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    from virtwarden.worker.runner import execute, retry_delay

    cfg = config()
    outcome = execute(cfg, job_id, cat=catalog(), via_host=_queue_host(self.request))
    if outcome.state == "busy":
        # This message comes back: the outbox need not send another meanwhile.
        jobs.postpone(catalog(), job_id, BUSY_RETRY_SECONDS + cfg.worker.resend_seconds)
        raise self.retry(countdown=BUSY_RETRY_SECONDS)
    if outcome.state == "retry":
        raise self.retry(countdown=retry_delay(cfg, jobs.get(catalog(), job_id).attempts))
    if outcome.send is not None:  # re-routed to the host its domain runs on now
        try:
            send(outcome.send)
        except BrokerUnavailable as e:  # the outbox sends it once the broker is back
            log.warning("job %s: %s; it stays queued", job_id, e)
    return outcome.state


def _queue_host(request) -> str | None:
    """The host whose queue delivered this message (``host.<name>``), if known."""
    key = (getattr(request, "delivery_info", None) or {}).get("routing_key") or ""
    return key[len("host."):] if key.startswith("host.") else None


def send(job: jobs.JobView) -> None:
    """Hand a job to the workers of its host; BrokerUnavailable when the broker is down.

    The message goes over a connection of the app's producer pool, kept between sends:
    a new connection and queue declaration per message cost the scheduler's midnight
    tick most of its time. A pooled connection the broker dropped is reconnected by the
    send's retry; a broker that stays away fails the send within seconds, as before."""
    _, error = send_many([job])
    if error is not None:
        raise error


# Messages per pipelined write to the broker: the size of a scheduler's batch of slots.
PUBLISH_BATCH = 500


def send_many(queued: list[jobs.JobView]) -> tuple[list[jobs.JobView], BrokerUnavailable | None]:
    """``send`` for many jobs over one connection of the producer pool: the jobs sent, in
    order, and the error that stopped the rest (None when all went).

    Messages go PUBLISH_BATCH at a time through kombu's publish batch (on Redis one
    non-transactional pipeline: one round trip instead of one per message). A job counts
    as sent once its batch was written; when a write fails, the jobs of that batch and
    the ones after it are returned unsent. Some of that batch may have reached the broker
    all the same: sent again by the sweeper, such a job gets a second message, which the
    job row's lease makes harmless (as for any redelivery)."""
    count, error = _publish([(job.id, job.host) for job in queued])
    return queued[:count], error


def _publish(queued: list[tuple[str, str | None]]) -> tuple[int, BrokerUnavailable | None]:
    """``send_many`` of (job id, host) pairs: how many went, in order, and what stopped
    the rest."""
    sent = 0
    if not queued:
        return sent, None
    cfg = config()
    try:
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1, interval_start=0.2, timeout=5)
            declared: set[str] = set()
            for start in range(0, len(queued), PUBLISH_BATCH):
                batch = queued[start:start + PUBLISH_BATCH]
                # max_size above the batch's commands (an LPUSH each): nothing is written
                # before the block ends, so a batch is written whole or reported unsent.
                with producer.batch(max_size=2 * len(batch) + 1):
                    for job_id, host in batch:
                        queue = queue_for(host or "")
                        # Each host's queue is declared with its first message of the call
                        # (Celery's default); later ones skip kombu's per-message bind of a
                        # copy of the queue, a tenth of a millisecond each.
                        # argsrepr/kwargsrepr given: Celery's saferepr of them cost a
                        # tenth of each message's time. No retry: a publish inside the batch
                        # writes nothing (the block's end writes the batch, and a failure
                        # there is handled below), so kombu's retry wrapper around each
                        # publish only cost time (7% of 20,000 sends).
                        app.send_task(TASK, args=[job_id], queue=queue, producer=producer,
                                      argsrepr=repr([job_id]), kwargsrepr="{}",
                                      declare=[] if queue in declared else None,
                                      retry=False)
                        declared.add(queue)
                sent += len(batch)
    except (KombuOperationalError, BatchPublishError, OSError) as e:  # BatchPublishError: "delivery is uncertain"
        return sent, BrokerUnavailable(mask(f"broker {cfg.broker_url} unreachable: {e}"))
    return sent, None


class Publisher:
    """``send_many`` in a process of its own, for a scheduler tick that sends thousands
    of messages: building a Celery message is Python (about 0.15 ms each), and in the
    scheduler's process it took turns, through the GIL, with the tick's transactions.
    The process is spawned (not forked: the scheduler has threads and open connections)
    on first use and serves one request at a time over a pipe: the jobs' ids and hosts
    in, how many went and the broker's error out. If it dies, the jobs of the request
    count as unsent (the sweeper sends them again; a duplicate message is harmless) and
    the next request starts a new one."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()

    def start(self) -> Publisher:
        """Start the process now (it imports Celery meanwhile); ``send_many`` would."""
        with self._lock:
            self._started()
        return self

    def send_many(self, queued: list[jobs.JobView]) -> tuple[list[jobs.JobView], BrokerUnavailable | None]:
        with self._lock:
            conn = self._started()
            try:
                conn.send([(job.id, job.host) for job in queued])
                if not conn.poll(PUBLISHER_SECONDS):
                    self._proc.kill()  # wedged: the sweeper sends its jobs
                    raise TimeoutError(f"no answer within {PUBLISHER_SECONDS:g}s")
                count, error, bug = conn.recv()
            except (EOFError, OSError) as e:
                self._stop()
                return [], BrokerUnavailable(f"the process sending the scheduler's messages ended ({e!r}):"
                                             " its jobs are sent again by the sweeper")
        if bug is not None:
            raise RuntimeError(f"the process sending the scheduler's messages failed: {bug}")
        return queued[:count], None if error is None else BrokerUnavailable(error)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _started(self) -> Any:
        if self._proc is None or not self._proc.is_alive():
            import multiprocessing

            self._stop()
            context = multiprocessing.get_context("spawn")
            self._conn, theirs = context.Pipe()
            self._proc = context.Process(target=_publisher, args=(theirs, self.cfg), name="virtwarden-sends",
                                         daemon=True)
            self._proc.start()
            theirs.close()
        return self._conn

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the process reads end-of-file and returns
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._conn = None


def _publisher(conn: Any, cfg: Config) -> None:
    """The body of ``Publisher``'s process. Ctrl-C in a terminal reaches the whole
    process group: the scheduler ends its tick and closes the pipe, which ends this."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(cfg)
    while True:
        try:
            queued = conn.recv()
        except EOFError:  # the scheduler closed the pipe, or ended
            return
        try:
            count, error = _publish(queued)
            conn.send((count, None if error is None else str(error), None))
        except Exception as e:  # noqa: BLE001 - a bug: said to the scheduler, which raises it
            conn.send((0, None, repr(e)))


def check_broker(cfg: Config) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, timeout=5)
    except (KombuOperationalError, OSError) as e:
        raise BrokerUnavailable(mask(f"broker {cfg.broker_url} unreachable: {e}")) from e


def mask(url: str) -> str:
    from virtwarden.redact import mask as _mask

    return _mask(url)


# --- the sweeper: requeue jobs of dead workers, resend lost messages ---------------
def _sweep_forever(stop: threading.Event) -> None:
    from virtwarden.worker.outbox import Sweeper

    sweeper = Sweeper(config(), catalog(), send)
    while True:
        sweeper.sweep()
        if stop.wait(config().worker.reap_seconds):
            return


_sweeper_stop = threading.Event()
_serving: list[str] = []  # the hosts whose queues this worker takes (set by the worker command)
_presence: list[Presence] = []


def serving(hosts: list[str]) -> None:
    """Say which hosts this process works for, before the worker starts."""
    _serving[:] = hosts


@signals.worker_process_init.connect
def _forget_parent_catalogs(**_kwargs: object) -> None:
    """A pool child forked from a parent with open database connections must not use
    them (they belong to the parent); it opens its own."""
    for cat in _catalogs.values():
        cat.engine.dispose(close=False)
    _catalogs.clear()


@signals.worker_ready.connect
def _start_sweeper(**_kwargs: object) -> None:
    threading.Thread(target=_sweep_forever, args=(_sweeper_stop,), name="sweeper", daemon=True).start()
    _presence.append(Presence(catalog(), "worker", _serving).start())


@signals.worker_shutdown.connect
def _stop_sweeper(**_kwargs: object) -> None:
    _sweeper_stop.set()
    while _presence:
        _presence.pop().close()
