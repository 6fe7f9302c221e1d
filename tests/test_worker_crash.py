"""A worker SIGKILLed in the middle of a backup: the job is taken over, nothing half
written is ever listed as usable, no scratch files stay behind, and the chain is right."""
from __future__ import annotations

import pytest
from virtwarden.catalog import jobs as job_rows

from tests.faults import pause_env, stopped_at
from tests.guests import images_equal
from tests.harness import s3_storage_entry, wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
MiB = 1024 * 1024



def test_sigkill_during_backup_is_recovered(vw, guest_factory, s3_settings, tmp_path):
    vw.storage["s3"] = s3_storage_entry(s3_settings)  # 5 MiB parts: vda is five of them
    g = guest_factory(disks=2, size_mib=64)
    g.write_random("vda", 0, 24 * MiB)
    g.write_random("vdb", 0, 8 * MiB)
    cat = vw.catalog()
    first = vw.start_worker(env=pause_env("storing", tmp_path / "faults"))

    r = vw.cli("backup", g.name, "--target", "s3", "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    stopped_at("storing", tmp_path / "faults")  # its first part is stored, its upload unfinished
    first.kill()

    # Nothing of the interrupted attempt is usable.
    listed = vw.cli("backups", g.name, "--json").json()
    assert listed and all(p["status"] == "writing" for p in listed)

    vw.start_worker()  # a new worker: its reaper finds the expired lease and requeues
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 240, "the job to finish")
    assert done.state == "succeeded", done.error
    assert done.attempts == 2

    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["status"] for p in listed] == ["failed", "complete"]
    assert listed[1]["level"] == "full"
    assert not any(vw.scratch.iterdir()), list(vw.scratch.iterdir())
    # The dead attempt's uploads are gone, finished or not.
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_settings.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_settings.bucket).get("Contents", [])]
    assert not [k for k in keys if listed[0]["id"] in k]
    assert not s3.list_multipart_uploads(Bucket=s3_settings.bucket).get("Uploads")

    # The chain goes on correctly after the takeover.
    expected_full = g.shadow_copy("vda", tmp_path / "full-vda.raw")
    g.write("vda", 10 * MiB, MiB, pattern=0x77)
    r = vw.cli("backup", g.name, "--target", "s3", "--wait", "--json")
    assert r.code == 0, r.err
    assert r.json()["result"]["level"] == "incremental"
    out = tmp_path / "restored"
    assert vw.cli("restore", g.name, "--point", "latest", "--to-dir", str(out), "--wait").code == 0
    assert images_equal(out / "vda.qcow2", g.shadow_copy("vda", tmp_path / "now-vda.raw"))
    out_full = tmp_path / "restored-full"
    assert vw.cli("restore", g.name, "--point", listed[1]["id"], "--to-dir", str(out_full), "--wait").code == 0
    assert images_equal(out_full / "vda.qcow2", expected_full)


def test_an_unknown_job_kind_fails_clearly(vw):
    """A job row naming a kind this worker does not know fails with that said; it does
    not look like a crash."""
    from virtwarden.catalog import jobs as rows
    from virtwarden.worker.runner import execute

    from virtwarden import config

    vw.write_config()
    cfg = config.load(str(vw.config_path))
    cat = vw.catalog()
    unknown = rows.create(cat, kind="teleport", domain="d", host="local", params={})
    assert execute(cfg, unknown.id, cat=cat).state == "failed"
    assert rows.get(cat, unknown.id).error == "job kind 'teleport' is unknown"


def test_a_restore_killed_after_copying_into_scratch_leaves_no_copy_behind(vw, guest_factory, tmp_path):
    """The attempt that dies holds copies of the point's artifacts in scratch space; once
    the job has ended (here: the retry restored the point), no attempt's copy is left."""
    from virtwarden.tasks.restore import FETCHED

    from tests.faults import kill_env

    g = guest_factory(disks=1, size_mib=64)
    g.write_random("vda", 0, 8 * MiB)
    vw.start_worker()
    assert vw.cli("backup", g.name, "--wait").code == 0
    vw.close()
    vw.workers.clear()
    cat = vw.catalog()
    vw.start_worker(env=kill_env(FETCHED, tmp_path / "faults"))
    r = vw.cli("restore", g.name, "--to-dir", str(tmp_path / "out"), "--json")
    assert r.code == 0, r.err
    job_id = r.json()["id"]
    done = wait_for(lambda: (j := job_rows.get(cat, job_id)).finished and j, 120, "the restore to finish")
    assert (tmp_path / "faults" / f"{FETCHED}.pid").exists(), "the first attempt was not killed"
    assert done.state == "succeeded", done.error
    assert done.attempts == 2
    assert images_equal(tmp_path / "out" / "vda.qcow2", g.shadow_copy("vda", tmp_path / "vda.raw"))
    assert not list(vw.scratch.glob("job-*")), list(vw.scratch.iterdir())
