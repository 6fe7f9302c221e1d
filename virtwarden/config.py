"""The configuration file, loaded once into a typed, frozen object.

One YAML file (``--config FILE`` or ``VIRTWARDEN_CONFIG``); ``VIRTWARDEN_DATABASE_URL``
and ``VIRTWARDEN_BROKER_URL`` override the file. Without a file the embedded defaults
describe one machine: the local libvirtd, an SQLite catalog and a local-directory
repository under ``data_dir``. Unknown keys and bad values are errors that name the key
and its line.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from virtwarden.errors import ConfigError
from virtwarden.validation import explain, suggest
from virtwarden.yamldoc import YamlSyntaxError, load_documents

DEFAULT_DATA_DIR = "/var/lib/virtwarden"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HOST_URI = "qemu:///system"
ENV_CONFIG = "VIRTWARDEN_CONFIG"
ENV_DATABASE_URL = "VIRTWARDEN_DATABASE_URL"
ENV_BROKER_URL = "VIRTWARDEN_BROKER_URL"
ENV_DATA_DIR = "VIRTWARDEN_DATA_DIR"
ENV_API_TOKEN = "VIRTWARDEN_API_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostConfig(_Strict):
    uri: str = DEFAULT_HOST_URI
    group: str = "default"
    # The hosts of this group see the same disk paths: live migration may proceed
    # where libvirt cannot detect shared storage itself (VIR_MIGRATE_UNSAFE).
    shared_storage: bool = False
    # Scratch space for backups and restores made on this host (default: data_dir/scratch).
    scratch_dir: str | None = None
    # Memory an evacuation leaves free for the host itself when it places guests here.
    memory_reserve_mib: int = Field(default=512, ge=0)
    # Cap on each live migration's transfer off this host (MiB/s); None: no cap.
    migration_bandwidth_mib: int | None = Field(default=None, ge=1)


class _Target(_Strict):
    """What every storage target has: its repository format and, for format 2, its key."""

    # 1: one qcow2 file per disk and point, an incremental needing the points before it.
    # 2: encrypted, deduplicated chunks (docs/repository-format.md); backups do not
    # write it yet: ``virtwarden key init`` prepares such a repository.
    format: Literal[1, 2] = 1
    # Format 2: storing plaintext must be asked for ("none").
    encryption: Literal["aes-256-gcm", "none"] = "aes-256-gcm"
    # Format 2: the key file (virtwarden key init|import), and a file whose first line is
    # its passphrase (else $VIRTWARDEN_KEY_PASSPHRASE, else a prompt on a terminal).
    key_file: str | None = None
    passphrase_file: str | None = None

    @model_validator(mode="after")
    def _format2_key(self) -> _Target:
        if self.format == 2 and self.encryption != "none" and not self.key_file:
            raise ValueError("format 2 with encryption needs key_file (made by: virtwarden key init STORAGE)")
        return self


class NfsStorage(_Target):
    """A mounted path (NFS, or any local filesystem)."""

    type: Literal["nfs"]
    path: str
    fsync: bool = True
    # Create ``path`` when missing. Right for a local directory; leave it off for a
    # mount point, so that an unmounted share is an error instead of a silent write
    # to the local disk underneath it.
    create: bool = False
    # Format 2: chunks read or written at a time by a backup, a restore or verify. Each is
    # a file of up to a chunk (512 KiB); on a local disk more threads only contend
    # (docs/benchmarks.md); a share far away may want more, as S3 does.
    chunk_concurrency: int = Field(default=4, ge=1, le=64)


class S3Storage(_Target):
    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # Server-side encryption: "AES256" or "aws:kms" (with kms_key_id).
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    part_size_mib: int = Field(default=64, ge=5, le=5120)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # Format 2: chunk objects (up to 512 KiB each) sent or fetched at a time. Each request
    # waits a round trip: with 20 ms of it, 4 at a time stored 36 MiB/s and restored
    # 71 MiB/s where 16 reached the endpoint's own pace (docs/benchmarks.md); memory is
    # about two chunks per request in flight.
    chunk_concurrency: int = Field(default=16, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1, le=20)
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)

    @field_validator("prefix")
    @classmethod
    def _strip_prefix(cls, v: str) -> str:
        return v.strip("/")


StorageConfig = Annotated[NfsStorage | S3Storage, Field(discriminator="type")]


class ApiConfig(_Strict):
    """``virtwarden api``. Every /v1 request needs a bearer token from ``token_file``
    (one per line, ``NAME:SCOPE,...:TOKEN [rate=R] [burst=B]``; see virtwarden/api/auth.py)
    or from $VIRTWARDEN_API_TOKEN (every scope); the API refuses to start without one."""

    listen: str = "127.0.0.1:8080"
    token_file: str | None = None
    # With a key, POSTs to ``signed_endpoints`` must carry
    # ``X-Virtwarden-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``.
    hmac_key_file: str | None = None
    # Alertmanager cannot sign its webhooks, so "alerts" is not signed unless listed here
    # (a sender that can sign: a relay of your own); its token's "alerts" scope guards it.
    signed_endpoints: tuple[Literal["restores", "alerts"], ...] = ("restores",)
    # A signature older or newer than this is refused (clock skew, or a replay after
    # the window in which seen signatures are remembered).
    signature_tolerance_seconds: int = Field(default=300, ge=5, le=3600)
    # /metrics needs a token with scope "read"; false opens it to anyone who can connect.
    metrics_require_token: bool = True
    # Larger request bodies are refused with 413 before they are read or parsed.
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    # An Alertmanager payload with more alerts is refused with 413; no alert is recorded
    # (set the receiver's max_alerts to this or less: Alertmanager truncates then).
    max_alerts_per_payload: int = Field(default=500, ge=1, le=100_000)
    # Each token's requests per second and burst (a token bucket), unless its line in
    # token_file says otherwise; per API process.
    rate_per_second: float = Field(default=10.0, gt=0)
    rate_burst: int = Field(default=100, ge=1)


class CatalogConfig(_Strict):
    """How long the catalog keeps rows that only grow (days; null keeps them forever).
    Every worker and scheduler deletes older ones every ``prune_seconds``; what stays
    whatever its age is in catalog/housekeeping.py."""

    audit_days: int | None = Field(default=365, ge=1)
    events_days: int | None = Field(default=90, ge=1)
    alerts_days: int | None = Field(default=90, ge=1)
    idempotency_days: int | None = Field(default=7, ge=1)
    # Finished jobs; schedule slots; rows of deleted or failed restore points; drills
    # (the newest of each domain stays). 8 days at least: the scheduler looks 7 back.
    jobs_days: int | None = Field(default=90, ge=8)
    slots_days: int | None = Field(default=90, ge=8)
    points_days: int | None = Field(default=90, ge=1)
    drills_days: int | None = Field(default=365, ge=1)
    # Rows of snapshots deleted (or found missing), by when that was noticed; journal rows
    # of blockcommit overlays that were merged or abandoned.
    snapshots_days: int | None = Field(default=90, ge=1)
    overlays_days: int | None = Field(default=90, ge=1)
    prune_seconds: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _jobs_outlive_keys(self) -> CatalogConfig:
        if self.jobs_days is not None and (self.idempotency_days is None or self.idempotency_days > self.jobs_days):
            raise ValueError(f"jobs_days ({self.jobs_days}) is shorter than idempotency_days "
                             f"({self.idempotency_days}): a request repeated with its Idempotency-Key must find "
                             "its job")
        return self


class SecurityConfig(_Strict):
    """Who besides the owner may read what virtwarden writes (see virtwarden/permissions.py).
    Without these, every file virtwarden writes is 0600 in 0700 directories."""

    # May read the repository of every local-directory (nfs) target: files 0640 and
    # directories 0750 in this group (an off-site copy, an auditor).
    read_group: str | None = None
    # The group of virtwarden's unprivileged daemons (the API's user in the systemd
    # units): shares an SQLite catalog (0660, its directory 0770) and may read the
    # configuration, token and HMAC key files (0640) without a warning.
    service_group: str | None = None


class RestoreConfig(_Strict):
    """Where restores that come through the API or a runbook may write."""

    # The directories (and everything below them) that a restore into a directory
    # (to_dir) and the images of a new domain in a given directory (disk_dir) may go
    # to, when the API or a runbook asked for it. Checked after symbolic links are
    # resolved, when the request is made and again by the worker right before it
    # writes. None: <data_dir>/restores. [] refuses every such restore. Restores that
    # root starts with the command line may go to any new or empty directory.
    allowed_dirs: tuple[str, ...] | None = None

    @field_validator("allowed_dirs")
    @classmethod
    def _absolute_dirs(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for path in v or ():
            if not path.startswith("/") or "\0" in path:
                raise ValueError(f"{path!r} is not an absolute path")
            if path.strip("/") == "":
                raise ValueError("'/' would let restores write anywhere; name the directories restores go to")
            if ".." in path.split("/") or os.path.normpath(path) != path.rstrip("/"):
                raise ValueError(f"{path!r} is not a normalised path (no '..', '.' or '//')")
        return tuple(os.path.normpath(p) for p in v) if v is not None else None


class WorkerConfig(_Strict):
    concurrency: int = Field(default=2, ge=1, le=64)
    # A running job's lease; a job whose lease ran out belongs to a dead worker.
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # How often each worker looks for jobs whose lease ran out.
    reap_seconds: float = Field(default=15.0, gt=0)
    # How many times a job is started before it is marked failed for good.
    max_attempts: int = Field(default=3, ge=1, le=20)
    # After a transient failure (storage or libvirt unreachable) the next attempt waits
    # this long, times the attempt number.
    retry_delay_seconds: float = Field(default=30.0, ge=0)
    # Above the longest job: a task not acknowledged in time is delivered again.
    visibility_timeout_seconds: int = Field(default=43200, ge=3600)
    # A queued job whose message has not reached a worker this long after it was sent
    # is sent again (the broker may have lost it); the wait doubles with each resend.
    resend_seconds: float = Field(default=60.0, gt=0)
    # Points left "writing" by a job that ended (their worker died on its last attempt)
    # are unlisted and their stored pieces removed this often, by every worker.
    sweep_seconds: float = Field(default=300.0, gt=0)
    # After points of a format-2 target went (retention, prune, a failed backup), a
    # worker's sweep submits a gc job that deletes the chunks no point uses any more:
    # at most one per target this often. None: only `virtwarden storage gc` collects.
    gc_seconds: float | None = Field(default=3600.0, gt=0)


class AgentConfig(_Strict):
    """qemu-guest-agent calls made while a point is taken (tasks/quiesce.py)."""

    # Each call (ping, freeze, thaw, freeze status); a freeze flushes the guest's dirty
    # data first, so give it time. libvirt counts whole seconds: rounded up.
    call_timeout_seconds: float = Field(default=10.0, ge=1)
    # How long a thaw is retried after an agent call went unanswered (a freeze that may
    # still run late, or a thaw that was not answered).
    thaw_grace_seconds: float = Field(default=120.0, gt=0)
    # The pause between two of those retries.
    thaw_retry_seconds: float = Field(default=1.0, gt=0)


class DrillConfig(_Strict):
    """Restore drills (tasks/drill.py): how the running throwaway copy is watched."""

    # Seconds between two looks at the throwaway (console marker, agent, still running).
    poll_seconds: float = Field(default=0.5, gt=0)
    # How long one guest-ping of the throwaway may take (whole seconds, rounded up).
    agent_ping_seconds: float = Field(default=2.0, ge=1)


class SchedulerConfig(_Strict):
    """``virtwarden scheduler``."""

    # How often it reads the policies and starts the slots that came due.
    tick_seconds: float = Field(default=30.0, gt=0)
    # How many hosts' domains it lists at once each tick (a fleet's round trips overlap).
    hosts_in_parallel: int = Field(default=16, ge=1)
    # A host whose listing has not come back this long after the tick began (a hung
    # libvirtd) is left out of the tick, so that it never holds up the others' slots.
    host_timeout_seconds: float = Field(default=30.0, gt=0)


class LibvirtConfig(_Strict):
    """Every connection to a host's libvirtd (jobs, commands, scheduler): libvirt has no
    timeout of its own, so a stopped or hung libvirtd would hold a call for ever."""

    # Opening a connection that has not completed by then fails (the host is unavailable).
    open_timeout_seconds: float = Field(default=30.0, gt=0)
    # A keepalive probe after this many seconds of silence; after keepalive_count probes
    # without an answer libvirt closes the connection and the call waiting on it fails
    # (about interval x (count + 1) seconds). libvirtd's own defaults: 5 and 5.
    keepalive_interval_seconds: int = Field(default=5, ge=1)
    keepalive_count: int = Field(default=5, ge=1)


class ListenerConfig(_Strict):
    """``virtwarden listen``: reconnecting to a host whose libvirt connection was lost."""

    # Seconds before the first reconnect attempt, doubling up to backoff_max_seconds.
    backoff_min_seconds: float = Field(default=1.0, ge=0.1)
    backoff_max_seconds: float = Field(default=60.0, gt=0)


class Config(_Strict):
    data_dir: str = DEFAULT_DATA_DIR
    database_url: str | None = None
    broker_url: str = DEFAULT_BROKER_URL
    policy_dir: str | None = None
    hosts: dict[str, HostConfig] = Field(default_factory=dict)
    storage: dict[str, StorageConfig] = Field(default_factory=dict)
    api: ApiConfig = Field(default_factory=ApiConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    restore: RestoreConfig = Field(default_factory=RestoreConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    drill: DrillConfig = Field(default_factory=DrillConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    listener: ListenerConfig = Field(default_factory=ListenerConfig)
    libvirt: LibvirtConfig = Field(default_factory=LibvirtConfig)
    source: str = Field(default="<embedded defaults>", exclude=True)
    # The secrets the configuration file itself holds (names of settings, never values).
    file_secrets: tuple[str, ...] = Field(default=(), exclude=True)

    # Derived values, all from data_dir unless given.
    @property
    def catalog_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir) / 'catalog.db'}"

    @property
    def restore_roots(self) -> tuple[str, ...]:
        """The directories API- and runbook-originated restores may write under."""
        if self.restore.allowed_dirs is not None:
            return self.restore.allowed_dirs
        return (str(Path(self.data_dir) / "restores"),)

    @property
    def policies_path(self) -> Path:
        return Path(self.policy_dir or Path(self.data_dir) / "policies")

    def scratch_dir(self, host: str) -> Path:
        configured = self.hosts[host].scratch_dir if host in self.hosts else None
        return Path(configured or Path(self.data_dir) / "scratch")

    def host(self, name: str) -> HostConfig:
        from virtwarden.errors import UnknownHost

        try:
            return self.hosts[name]
        except KeyError:
            raise UnknownHost(
                f"host {name!r} is not configured{_did_you_mean(name, self.hosts)}"
                f" (configured: {', '.join(sorted(self.hosts)) or 'none'})"
            ) from None

    def storage_target(self, name: str) -> NfsStorage | S3Storage:
        from virtwarden.errors import UnknownStorage

        try:
            return self.storage[name]
        except KeyError:
            raise UnknownStorage(
                f"storage {name!r} is not configured{_did_you_mean(name, self.storage)}"
                f" (configured: {', '.join(sorted(self.storage)) or 'none'})"
            ) from None


def local_host_name() -> str:
    return socket.gethostname().split(".")[0] or "local"


def embedded_defaults(data_dir: str | None = None) -> dict:
    data_dir = data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR
    return {
        "data_dir": data_dir,
        "hosts": {local_host_name(): {"uri": DEFAULT_HOST_URI}},
        "storage": {"local": {"type": "nfs", "path": str(Path(data_dir) / "repository"), "create": True}},
    }


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the configuration from ``path`` (or $VIRTWARDEN_CONFIG, or the embedded defaults)."""
    env = dict(os.environ) if env is None else env
    path = path or env.get(ENV_CONFIG)
    if path:
        raw, doc = _read(path)
    else:
        raw, doc = embedded_defaults(env.get(ENV_DATA_DIR)), None
    raw = dict(raw)
    in_file = {key: raw.get(key) for key in ("database_url", "broker_url")}
    if env.get(ENV_DATABASE_URL):
        raw["database_url"] = env[ENV_DATABASE_URL]
    if env.get(ENV_BROKER_URL):
        raw["broker_url"] = env[ENV_BROKER_URL]
    if not raw.get("hosts"):
        raw["hosts"] = embedded_defaults(raw.get("data_dir"))["hosts"]
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(explain(e, Config, path or "<embedded defaults>", doc))) from None
    secrets = secrets_in(cfg.model_copy(update={"database_url": in_file["database_url"],
                                                "broker_url": in_file["broker_url"] or ""})) if path else ()
    return cfg.model_copy(update={"source": path or "<embedded defaults>", "file_secrets": secrets})


def secrets_in(cfg: Config) -> tuple[str, ...]:
    """The settings of ``cfg`` that hold a secret: S3 secret keys, URLs with a password.
    Called on what the file says, before the environment overrides it."""
    from virtwarden.redact import has_password

    found = [f"storage.{name}.secret_access_key" for name, st in cfg.storage.items()
             if isinstance(st, S3Storage) and st.secret_access_key]
    found += [f"storage.{name}.endpoint_url" for name, st in cfg.storage.items()
              if isinstance(st, S3Storage) and has_password(st.endpoint_url)]
    found += [key for key, url in (("database_url", cfg.database_url), ("broker_url", cfg.broker_url))
              if has_password(url)]
    found += [f"hosts.{name}.uri" for name, h in cfg.hosts.items() if has_password(h.uri)]
    return tuple(found)


def _read(path: str):
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}") from None
    try:
        docs = load_documents(text, path)
    except YamlSyntaxError as e:
        raise ConfigError(str(e)) from None
    if len(docs) != 1 or not isinstance(docs[0].data, dict):
        raise ConfigError(f"{path}:1: the configuration file must hold one YAML mapping")
    return docs[0].data, docs[0]


def _did_you_mean(word: str, choices) -> str:
    return suggest(word, choices)


def load_for_process(path: str | None = None) -> Config:
    """``load``, then this process's file modes from ``security``, with a warning when
    the configuration file holds secrets that other users can read (as for the API's
    token file: the warning says how to close it, and the file is used). Every command
    and daemon loads its configuration this way."""
    from virtwarden import hypervisor, permissions

    cfg = load(path)
    permissions.configure(cfg.security.read_group, cfg.security.service_group)
    hypervisor.configure(hypervisor.Liveness(cfg.libvirt.keepalive_interval_seconds, cfg.libvirt.keepalive_count,
                                             cfg.libvirt.open_timeout_seconds))
    if cfg.file_secrets:
        permissions.warn_if_exposed(cfg.source, ", ".join(cfg.file_secrets))
    return cfg
