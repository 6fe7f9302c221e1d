"""How a libvirt connection notices a libvirtd that stopped answering, where no daemon
is needed: the settings a process takes from its configuration, and libvirt's event
loop refusing to run in a child forked after its parent had started it. (The fault
itself, a SIGSTOPped libvirtd under a running job, is in test_host_faults.py.)"""
from __future__ import annotations

import os

from tests.conftest import need_module
from virtwarden import config, hypervisor


def test_a_process_takes_its_liveness_from_the_configuration(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"data_dir: {tmp_path}\nlibvirt:\n  open_timeout_seconds: 7\n  keepalive_interval_seconds: 2\n"
                 "  keepalive_count: 4\n")
    before = hypervisor.liveness()
    try:
        config.load_for_process(str(f))
        assert hypervisor.liveness() == hypervisor.Liveness(keepalive_interval=2, keepalive_count=4,
                                                            open_timeout=7.0)
    finally:
        hypervisor.configure(before)


def test_the_event_loop_does_not_run_in_a_child_forked_after_it_started():
    """A child forked after the loop started has libvirt's registration but not the
    thread running it: starting it again there is refused (so connections opened there
    go without keepalive and say so), never a second registration."""
    need_module("libvirt")
    from virtwarden.hypervisor import events

    assert events.start_loop()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        os.close(r)
        os.write(w, b"1" if events.start_loop() else b"0")
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as got:
        answer = got.read()
    os.waitpid(pid, 0)
    assert answer == b"0"
    assert events.start_loop()  # the parent's loop runs on
