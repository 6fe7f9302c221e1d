"""The configuration file: defaults, overrides, and errors that name file, line and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from virtwarden import config
from virtwarden.errors import ConfigError, UnknownStorage

REPO = Path(__file__).resolve().parent.parent


def test_embedded_defaults_describe_one_machine():
    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": "/srv/vw"})
    assert cfg.catalog_url == "sqlite:////srv/vw/catalog.db"
    assert cfg.storage["local"].path == "/srv/vw/repository" and cfg.storage["local"].create
    assert [h.uri for h in cfg.hosts.values()] == ["qemu:///system"]
    assert cfg.scratch_dir(next(iter(cfg.hosts))) == Path("/srv/vw/scratch")


def test_environment_overrides_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("database_url: sqlite:////a.db\nbroker_url: redis://file/0\n")
    cfg = config.load(str(f), env={"VIRTWARDEN_DATABASE_URL": "postgresql://db/x",
                                   "VIRTWARDEN_BROKER_URL": "redis://env/1"})
    assert (cfg.catalog_url, cfg.broker_url) == ("postgresql://db/x", "redis://env/1")


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("storage: {x: {type: nfs, path: /x}}\n")
    assert list(config.load(env={"VIRTWARDEN_CONFIG": str(f)}).storage) == ["x"]


def test_example_configuration_is_valid():
    cfg = config.load(str(REPO / "deploy" / "config.example.yaml"), env={})
    assert cfg.storage["offsite"].sse == "AES256"


def test_api_limits_and_catalog_keep_periods_default_to_what_an_operator_expects(tmp_path):
    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": str(tmp_path)})
    assert (cfg.api.metrics_require_token, cfg.api.max_body_bytes, cfg.api.max_alerts_per_payload) == (
        True, 1024 * 1024, 500)
    keep = cfg.catalog
    assert (keep.audit_days, keep.events_days, keep.alerts_days, keep.idempotency_days) == (365, 90, 90, 7)
    assert (keep.jobs_days, keep.slots_days, keep.points_days, keep.drills_days) == (90, 90, 90, 365)
    f = tmp_path / "c.yaml"
    f.write_text("catalog:\n  events_days: null\n  audit_days: 0\n")
    with pytest.raises(ConfigError, match="c.yaml:3: catalog.audit_days: Input should be greater than or equal to 1"):
        config.load(str(f), env={})
    f.write_text("catalog:\n  jobs_days: 7\n")
    with pytest.raises(ConfigError, match="catalog.jobs_days: Input should be greater than or equal to 8"):
        config.load(str(f), env={})
    f.write_text("catalog:\n  jobs_days: 10\n  idempotency_days: 30\n")
    with pytest.raises(ConfigError, match=r"jobs_days \(10\) is shorter than idempotency_days \(30\): a request "
                                          "repeated with its Idempotency-Key must find its job"):
        config.load(str(f), env={})
    f.write_text("catalog:\n  events_days: null\napi:\n  rate_per_second: 2.5\n")
    cfg = config.load(str(f), env={})
    assert (cfg.catalog.events_days, cfg.api.rate_per_second) == (None, 2.5)



def test_agent_drill_scheduler_listener_and_libvirt_timings_default_to_todays_values(tmp_path):
    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": str(tmp_path)})
    assert (cfg.agent.call_timeout_seconds, cfg.agent.thaw_grace_seconds, cfg.agent.thaw_retry_seconds) == (10, 120, 1)
    assert (cfg.drill.poll_seconds, cfg.drill.agent_ping_seconds) == (0.5, 2)
    assert cfg.scheduler.tick_seconds == 30
    assert (cfg.listener.backoff_min_seconds, cfg.listener.backoff_max_seconds) == (1, 60)
    assert (cfg.libvirt.open_timeout_seconds, cfg.libvirt.keepalive_interval_seconds,
            cfg.libvirt.keepalive_count) == (30, 5, 5)
    f = tmp_path / "c.yaml"
    f.write_text("agent:\n  thaw_grace_seconds: 5\nscheduler:\n  tick_seconds: 0.5\n")
    cfg = config.load(str(f), env={})
    assert (cfg.agent.thaw_grace_seconds, cfg.scheduler.tick_seconds) == (5, 0.5)


@pytest.mark.parametrize("text, expected", [
    ("hosts:\n  a: {uri: x, gruop: y}\n", "c.yaml:2: hosts.a.gruop: unknown key (did you mean 'group'?)"),
    ("brokr_url: x\n", "c.yaml:1: brokr_url: unknown key (did you mean 'broker_url'?)"),
    ("storage:\n  s3:\n    type: s3\n    bucket: b\n    part_size_mib: 1\n",
     "c.yaml:5: storage.s3.part_size_mib: Input should be greater than or equal to 5"),
    ("storage:\n  n:\n    type: nfs\n", "c.yaml:2: storage.n.path: Field required"),
    ("storage:\n  z: {type: ftp}\n", "c.yaml:2: storage.z: 'type' must be one of 'nfs', 's3'"),
    ("worker:\n  lease_seconds: -1\n", "c.yaml:2: worker.lease_seconds: Input should be greater than 0"),
    ("agent:\n  call_timeout_seconds: 0.5\n",
     "c.yaml:2: agent.call_timeout_seconds: Input should be greater than or equal to 1"),
    ("listener:\n  backof_min_seconds: 2\n",
     "c.yaml:2: listener.backof_min_seconds: unknown key (did you mean 'backoff_min_seconds'?)"),
    ("libvirt:\n  keepalive_count: 0\n",
     "c.yaml:2: libvirt.keepalive_count: Input should be greater than or equal to 1"),
    ("- a\n- b\n", "c.yaml:1: the configuration file must hold one YAML mapping"),
    ("hosts: {a: [}\n", "c.yaml:1: YAML syntax"),
])
def test_bad_configuration_is_reported_precisely(tmp_path, text, expected):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(str(f), env={})
    assert expected in str(e.value).replace(str(tmp_path) + "/", "")


def test_missing_file_and_unknown_storage(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        config.load(str(tmp_path / "nope.yaml"), env={})
    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": str(tmp_path)})
    with pytest.raises(UnknownStorage, match=r"storage 'locl' is not configured \(did you mean 'local'\?\)"):
        cfg.storage_target("locl")
