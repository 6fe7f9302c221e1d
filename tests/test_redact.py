"""mask() hides every password a URL, a libpq keyword string or a message can carry,
and nothing else (issue 10, finding 7: it left ``?password=`` in URLs)."""
from __future__ import annotations

import logging

import pytest
from virtwarden.catalog.store import mask as catalog_mask
from virtwarden.storage_backends.s3 import _mask as s3_mask
from virtwarden.worker.celery_app import mask as broker_mask

from virtwarden import config
from virtwarden.redact import MaskingFilter, has_password, mask


@pytest.mark.parametrize("url, shown", [
    ("postgresql+psycopg2://virtwarden:s3cr3t@db:5432/vw", "postgresql+psycopg2://virtwarden:***@db:5432/vw"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://default:hunter2@cache:6380/1?ssl_cert_reqs=required",
     "rediss://default:***@cache:6380/1?ssl_cert_reqs=required"),
    ("amqp://guest:guest@rabbit//", "amqp://guest:***@rabbit//"),
    ("postgresql://vw@db/vw?password=s3cr3t", "postgresql://vw@db/vw?password=***"),
    ("postgresql://vw@db/vw?sslmode=require&password=s3cr3t&connect_timeout=5",
     "postgresql://vw@db/vw?sslmode=require&password=***&connect_timeout=5"),
    ("postgresql://vw@db/vw?sslmode=verify-full&sslpassword=keypass", "postgresql://vw@db/vw?sslmode=verify-full&sslpassword=***"),
    ("https://minio:9000/?secret=abc;region=x", "https://minio:9000/?secret=***;region=x"),
    ("https://hooks.example/v1?token=abc#frag", "https://hooks.example/v1?token=***#frag"),
    ("https://s3.example/b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff00",
     "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("host=db user=vw password=s3cr3t dbname=vw", "host=db user=vw password=*** dbname=vw"),
    ("https://AKIA:wJalr%2FK@s3.example", "https://AKIA:***@s3.example"),
    ("redis://:pa/ss@cache:6379/0", "redis://:***@cache:6379/0"),  # an unencoded '/' in the password
    ("postgresql://u:p%40ss@db/vw", "postgresql://u:***@db/vw"),
    ("postgresql://u:p@ss@db/vw", "postgresql://u:***@db/vw"),  # an unencoded '@' too
])
def test_every_password_form_is_hidden(url, shown):
    assert mask(url) == shown
    assert has_password(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "sqlite:////var/lib/virtwarden/catalog.db",
    "qemu+ssh://root@kvm02/system",
    "qemu+tls://kvm02.example/system?no_verify=1",
    "http://minio:9000/bucket/a@b",  # an @ in the path after a port is not a password
    "postgresql://vw@db/vw?sslmode=require",
    "",
])
def test_what_holds_no_secret_is_unchanged(url):
    assert mask(url) == url
    assert not has_password(url)


def test_urls_inside_a_message_are_masked_and_the_rest_stays():
    text = ("broker redis://:hunter2@cache:6379/0 unreachable: Error 111 connecting; "
            "catalog postgresql://vw:s3cr3t@db/vw?password=again: timeout")
    out = mask(text)
    assert "hunter2" not in out and "s3cr3t" not in out and "again" not in out
    assert out.startswith("broker redis://:***@cache:6379/0 unreachable: Error 111 connecting; catalog")


def test_every_mask_of_the_product_is_this_one():
    url = "postgresql://vw:s3cr3t@db/vw?sslpassword=k"
    assert catalog_mask(url) == broker_mask(url) == mask(url) == "postgresql://vw:***@db/vw?sslpassword=***"
    assert s3_mask("https://key:secret@minio:9000/?token=t") == "https://minio:9000/?token=***"


def test_log_records_are_masked_whoever_logs_them(caplog):
    logger = logging.getLogger("some.library")
    handler = caplog.handler
    handler.addFilter(MaskingFilter())
    try:
        logger.warning("connecting to %s", "redis://:hunter2@cache:6379/0")
        try:
            raise RuntimeError("postgresql://vw:s3cr3t@db/vw refused")
        except RuntimeError:
            logger.exception("failed")
    finally:
        handler.removeFilter(handler.filters[-1])
    assert "hunter2" not in caplog.text and "s3cr3t" not in caplog.text
    assert "redis://:***@cache:6379/0" in caplog.text and "postgresql://vw:***@db/vw refused" in caplog.text


def test_the_configuration_names_the_secrets_its_file_holds(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("database_url: postgresql://vw:pw@db/vw\n"
                    "broker_url: redis://:pw@cache:6379/0\n"
                    "storage:\n"
                    "  offsite: {type: s3, bucket: b, access_key_id: AKIA, secret_access_key: k}\n"
                    "  local: {type: nfs, path: /srv/backup}\n")
    cfg = config.load(str(path), env={})
    assert cfg.file_secrets == ("storage.offsite.secret_access_key", "database_url", "broker_url")
    # A URL from the environment is not in the file; the file's own still is.
    env = {"VIRTWARDEN_BROKER_URL": "redis://:other@cache:6379/0"}
    assert config.load(str(path), env=env).file_secrets == cfg.file_secrets
    path.write_text("data_dir: /srv/vw\n")
    assert config.load(str(path), env={"VIRTWARDEN_DATABASE_URL": "postgresql://vw:pw@db/vw"}).file_secrets == ()


def test_uvicorns_access_log_keeps_its_arguments_and_loses_the_token(capsys):
    import logging.config

    from virtwarden.api.app import _masked_log_config

    logging.config.dictConfig(_masked_log_config())
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                                             "/v1/jobs/x?token=abc&password=p", "1.1", 404)
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert '"GET /v1/jobs/x?token=***&password=*** HTTP/1.1" 404' in out and "abc" not in out


def test_healthz_answers_without_a_token_and_without_the_brokers_password(tmp_path):
    from virtwarden.catalog.store import Catalog
    from virtwarden.worker import celery_app

    from virtwarden.api.app import Api, _health

    cfg = config.load(env={"VIRTWARDEN_DATA_DIR": str(tmp_path),
                           "VIRTWARDEN_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0"})
    celery_app.configure(cfg)
    reply = _health(Api(cfg, Catalog(cfg.catalog_url)))
    assert reply.status_code == 503
    body = reply.body.decode()
    assert "hunter2" not in body and "redis://:***@127.0.0.1:1/0" in body
