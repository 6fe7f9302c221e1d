"""Quiesce through a real qemu-guest-agent: a Linux guest (tests/agentguest.py) has its
ext4 filesystem frozen around each backup and thawed after it, the point says
``quiesced``, and the point itself shows it: data the guest had only in its page cache
is in the restored image, and the filesystem there is clean (no journal to replay).
A guest without an agent gets a ``crash`` point that says so; ``quiesce: always``
without one fails and changes nothing; an agent that does not answer in time never
leaves the guest frozen.

Backups run through the CLI and a real worker (the ``vw`` harness)."""
from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.harness import wait_for

pytestmark = [pytest.mark.libvirt, pytest.mark.cli_in_process]
BLOCK = 4096  # the guest filesystem's block size (tests/agentguest.make_ext4_disk)

# What qemu-ga (verbose) and its freeze hook print on the serial console, in this order,
# for one freeze and thaw. qemu-ga stops logging while frozen and says so both ways.
FREEZE_THEN_THAW = ['"execute":"guest-fsfreeze-freeze"', "vw-hook: freeze",
                    "disabling logging due to filesystem freeze",
                    "logging re-enabled due to filesystem unfreeze", "vw-hook: thaw"]


def _policy(vw, tmp_path: Path, strategy: str = "bitmap", quiesce: str = "auto") -> None:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "q.yaml").write_text(
        "apiVersion: virtwarden/v1\nkind: Policy\nmetadata:\n  name: q\n"
        f"spec:\n  selector:\n    domains: ['vwtest-*']\n  backup:\n    target: nfs\n"
        f"    strategy: {strategy}\n    quiesce: {quiesce}\n")
    vw.extra["policy_dir"] = str(pdir)


def _backup(vw, domain: str) -> dict:
    r = vw.cli("backup", domain, "--policy", "q", "--wait", "--json")
    assert r.code == 0, r.err + r.out
    job = r.json()
    assert job["state"] == "succeeded", job
    return job["result"]


def _manifest(vw, point_id: str) -> dict:
    repo = Path(vw.storage["nfs"]["path"])
    return json.loads(next(repo.rglob(f"{point_id}/manifest.json")).read_text())


def _worker_log(vw) -> str:
    return "".join(w.log.read_text() for w in vw.workers)


def _write_blocks(g, path: str, token: str, blocks: int) -> bytes:
    """Write ``blocks`` 4 KiB blocks to ``path`` in the guest, each unique and saying
    which it is (made in the guest: the verbose agent echoes every byte it is sent to
    the slow serial console), without sync. Returns the bytes written."""
    g.check_sh(f"awk -v t={token} -v n={blocks} 'BEGIN {{ for (i = 0; i < n; i++) {{ "
               f"h = sprintf(\"VWQ:%s:%06d:\", t, i); s = h; while (length(s) < {BLOCK}) s = s s; "
               f"printf \"%s\", substr(s, 1, {BLOCK}) }} }}' > {path}", timeout=120)
    out = []
    for i in range(blocks):
        head = f"VWQ:{token}:{i:06d}:"
        out.append((head * (BLOCK // len(head) + 1))[:BLOCK].encode())
    return b"".join(out)


def _blocks_on_disk(raw: Path, data: bytes) -> int:
    """How many of ``data``'s blocks the raw image holds, byte for byte, at block
    boundaries (where ext4 puts file data)."""
    want = {data[i:i + BLOCK] for i in range(0, len(data), BLOCK)}
    found = set()
    with open(raw, "rb") as f:
        while block := f.read(BLOCK):
            if block in want:
                found.add(block)
    return len(found)


def _raw(image: Path, dest: Path, force_share: bool = False) -> Path:
    cmd = ["qemu-img", "convert", *(["-U"] if force_share else []), "-O", "raw", str(image), str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


def _live_raw(g, dest: Path) -> Path:
    """What vda holds right now, as the host sees it (the running chain, read shared)."""
    for disk in ET.fromstring(g.xml()).iterfind("devices/disk"):
        if disk.find("target").get("dev") == "vda":
            return _raw(Path(disk.find("source").get("file")), dest, force_share=True)
    raise KeyError("vda")


def _fs_state(raw: Path) -> tuple[bool, int]:
    """(the journal needs recovery, e2fsck -fn exit code) of an ext4 image."""
    head = subprocess.run(["dumpe2fs", "-h", str(raw)], check=True, capture_output=True, text=True).stdout
    features = next(line for line in head.splitlines() if line.startswith("Filesystem features:"))
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    return "needs_recovery" in features.split(), fsck.returncode


def _in_order(text: str, marks: list[str]) -> bool:
    at = 0
    for mark in marks:
        at = text.find(mark, at)
        if at < 0:
            return False
        at += len(mark)
    return True


def _thawed_and_writable(g) -> None:
    assert g.freeze_status() == "thawed"
    assert g.check_sh("echo still-writable > /mnt/after && sync && cat /mnt/after", timeout=30) == "still-writable\n"


# --- the agent calls themselves -------------------------------------------------------------------

def test_agent_calls_on_a_real_guest_and_on_one_without_agent(agent_guest_factory, guest_factory):
    from virtwarden.hypervisor import agent
    from virtwarden.hypervisor.libvirt_host import LibvirtHost

    from virtwarden.errors import AgentUnresponsive, HypervisorError

    g = agent_guest_factory()
    bare = guest_factory(disks=1, size_mib=16)
    with LibvirtHost("local", "qemu:///system") as hv:
        assert agent.connected(hv, g.name) and agent.ping(hv, g.name, 5)
        assert agent.freeze(hv, g.name, 10) == 1
        assert agent.freeze_status(hv, g.name, 5) == "frozen" == g.freeze_status()
        assert agent.thaw(hv, g.name, 10) == 1
        assert agent.freeze_status(hv, g.name, 5) == "thawed"
        assert _in_order(g.serial_log(), FREEZE_THEN_THAW)

        assert not agent.connected(hv, bare.name) and not agent.ping(hv, bare.name, 2)
        with pytest.raises(HypervisorError, match=f"freezing the guest's filesystems .*'{bare.name}'.*not configured"):
            agent.freeze(hv, bare.name, 2)

        g.stall_next_freeze(6)
        with pytest.raises(AgentUnresponsive, match="freezing the guest's filesystems .agent timeout 2s."):
            agent.freeze(hv, g.name, 2)
        assert not agent.ping(hv, g.name, 1)  # still inside the freeze request
        wait_for(lambda: agent.ping(hv, g.name, 1), 60, "the agent to answer after the late freeze", poll=0)
        assert agent.freeze_status(hv, g.name, 5) == "frozen"  # the late freeze happened
        assert agent.thaw(hv, g.name, 5) == 1

        g.stop_agent(6)
        assert agent.connected(hv, g.name)  # the port stays open: only a ping tells
        assert not agent.ping(hv, g.name, 1)
    g.wait_answering(60)
    _thawed_and_writable(g)


# --- quiesced points --------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["bitmap", "blockcommit"])
def test_points_of_an_agent_guest_are_quiesced(vw, agent_guest_factory, tmp_path, strategy):
    """Full then incremental. Before each backup the guest writes a file that stays in
    its page cache (not on the disk: checked); the restored point holds every byte of
    it, and a clean filesystem, because the freeze flushed it at the point's instant."""
    _policy(vw, tmp_path, strategy)
    g = agent_guest_factory()
    vw.start_worker()
    files = {}
    for step in range(2):
        files[f"/mnt/file{step}"] = data = _write_blocks(g, f"/mnt/file{step}", f"{strategy}{step}", 256)
        assert _blocks_on_disk(_live_raw(g, tmp_path / f"live-{step}.raw"), data) == 0, "written back already"
        mark = len(g.serial_log())

        result = _backup(vw, g.name)

        assert result["consistency"] == "quiesced", result
        assert result["level"] == ("full" if step == 0 else "incremental"), result["reason"]
        assert _manifest(vw, result["point_id"])["consistency"] == "quiesced"
        assert _in_order(g.serial_log()[mark:], FREEZE_THEN_THAW), g.serial_log()[mark:]
        _thawed_and_writable(g)

        out = tmp_path / f"restored-{step}"
        r = vw.cli("restore", g.name, "--point", result["point_id"], "--to-dir", str(out), "--wait")
        assert r.code == 0, r.err
        raw = _raw(out / "vda.qcow2", tmp_path / f"restored-{step}.raw")
        for path, content in files.items():
            assert _blocks_on_disk(raw, content) == 256, f"point {step}: {path} incomplete"
        assert _fs_state(raw) == (False, 0), "a frozen ext4 has an empty journal and passes e2fsck"

    listed = vw.cli("backups", g.name, "--json").json()
    assert [p["consistency"] for p in listed] == ["quiesced", "quiesced"]
    log = _worker_log(vw)
    assert log.count("froze 1 filesystem(s)") == 2 and log.count("thawed 1 filesystem(s)") == 2


def test_without_the_freeze_the_same_data_is_not_in_the_point(vw, agent_guest_factory, tmp_path):
    """The control: quiesce: never on the same guest. The page cache is not written
    back, the point is crash-consistent and says so, the journal needs replaying."""
    _policy(vw, tmp_path, quiesce="never")
    g = agent_guest_factory()
    vw.start_worker()
    data = _write_blocks(g, "/mnt/file", "never", 256)
    mark = len(g.serial_log())

    result = _backup(vw, g.name)

    assert result["consistency"] == "crash"
    assert _manifest(vw, result["point_id"])["consistency"] == "crash"
    assert "guest-fsfreeze" not in g.serial_log()[mark:]
    out = tmp_path / "restored"
    assert vw.cli("restore", g.name, "--point", result["point_id"], "--to-dir", str(out), "--wait").code == 0
    raw = _raw(out / "vda.qcow2", tmp_path / "restored.raw")
    assert _blocks_on_disk(raw, data) == 0
    assert _fs_state(raw)[0], "a mounted ext4 copied without a freeze still needs journal recovery"


# --- no agent ---------------------------------------------------------------------------------------

def test_a_guest_without_agent_gets_a_crash_consistent_point(vw, guest_factory, tmp_path):
    _policy(vw, tmp_path, "blockcommit")
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()

    result = _backup(vw, g.name)

    assert result["consistency"] == "crash"
    assert vw.cli("backups", g.name, "--json").json()[0]["consistency"] == "crash"
    assert _manifest(vw, result["point_id"])["consistency"] == "crash"
    assert "not quiesced (the guest agent is not connected" in _worker_log(vw)


def test_quiesce_always_without_agent_fails_and_changes_nothing(vw, guest_factory, tmp_path):
    _policy(vw, tmp_path, quiesce="always")
    g = guest_factory(disks=1, size_mib=16)
    vw.start_worker()

    r = vw.cli("backup", g.name, "--policy", "q", "--wait")

    assert r.code != 0
    assert f"domain {g.name!r}: quiesce is 'always' but the filesystems cannot be frozen: " \
           "the guest agent is not connected" in r.err
    assert vw.cli("backups", g.name, "--json").json() == []
    assert g.dom.listAllCheckpoints() == []


# --- an agent that does not answer in time ------------------------------------------------------

def test_an_agent_that_stops_answering_gives_a_crash_point_and_no_freeze(vw, agent_guest_factory, tmp_path):
    """The agent is stopped (SIGSTOP) before the backup: it misses its ping, so no freeze
    is sent; the point is crash-consistent. Once the agent runs again, nothing is frozen
    and the filesystem takes writes."""
    _policy(vw, tmp_path)
    vw.extra["agent"] = {"call_timeout_seconds": 3}
    g = agent_guest_factory()
    vw.start_worker()
    mark = len(g.serial_log())
    g.stop_agent(8)  # past the ping (3 s) and the backup after it

    result = _backup(vw, g.name)

    assert result["consistency"] == "crash"
    assert "not quiesced (the guest agent did not answer a ping within 3s)" in _worker_log(vw)
    g.wait_answering(120)
    _thawed_and_writable(g)
    assert "guest-fsfreeze-freeze" not in g.serial_log()[mark:]


def test_a_freeze_answered_too_late_is_thawed(vw, agent_guest_factory, tmp_path):
    """The agent takes the freeze request and hangs in it (its freeze hook sleeps) past
    the timeout: the point is crash-consistent, and when the late freeze happens the job
    is still there to thaw it: the guest ends thawed and writable."""
    _policy(vw, tmp_path)
    vw.extra["agent"] = {"call_timeout_seconds": 3}
    g = agent_guest_factory()
    vw.start_worker()
    mark = len(g.serial_log())
    g.stall_next_freeze(10)  # past the freeze's and the first thaw's timeouts (3 + 3 s), with room

    result = _backup(vw, g.name)

    assert result["consistency"] == "crash"
    log = _worker_log(vw)
    assert "not quiesced (the freeze was not answered in time: " in log
    assert "(a freeze that had timed out ran late): thawing" in log
    assert "the guest agent reports its filesystems thawed" in log
    console = g.serial_log()[mark:]
    assert _in_order(console, ["vw-hook: stalling 10s", "disabling logging due to filesystem freeze",
                               "logging re-enabled due to filesystem unfreeze", "vw-hook: thaw"]), console
    _thawed_and_writable(g)
