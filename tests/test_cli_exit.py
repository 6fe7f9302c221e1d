"""How the ``virtwarden`` process ends (``virtwarden.cli.main.leave``): at once, without
the interpreter's teardown, but with its exit code, every byte of its output and its
exit handlers; the interpreter's own exit while a thread still runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import REPO


def _python(code: str, **kw) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60, **kw)


def test_leave_keeps_the_code_the_output_and_the_exit_handlers(tmp_path: Path) -> None:
    marker = tmp_path / "handler-ran"
    r = _python(
        "import atexit, logging, sys\n"
        "from virtwarden.cli.main import leave\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "sys.stdout.write('x' * 300000)\n"  # more than a pipe holds and than the buffer: written at the end
        "logging.getLogger('t').warning('last words')\n"
        "leave(6)\n"
        "print('not reached')\n")
    assert r.returncode == 6
    assert r.stdout == b"x" * 300000
    assert b"last words" in r.stderr
    assert marker.read_text() == "ran"


def test_a_running_thread_is_waited_for(tmp_path: Path) -> None:
    """A thread that is not a daemon (a pool still writing) ends its work before the
    process does, as with the interpreter's own exit."""
    done = tmp_path / "thread-done"
    r = _python(
        "import threading, time\n"
        "from virtwarden.cli.main import leave\n"
        f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('done'))).start()\n"
        "leave(3)\n")
    assert r.returncode == 3
    assert done.read_text() == "done"


def test_the_command_ends_with_its_exit_code(tmp_path: Path) -> None:
    """``python -m virtwarden.cli`` goes through ``leave``: a usage error and an error
    line keep their exit codes and their words."""
    r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--config", str(tmp_path / "missing.yaml"), "jobs"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "missing.yaml" in r.stderr
    r = subprocess.run([sys.executable, "-m", "virtwarden.cli", "--version"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("virtwarden ")


def test_a_profiled_command_still_writes_its_profile(tmp_path: Path) -> None:
    """``python -m cProfile -o FILE -m virtwarden.cli ...`` writes the profile after the
    command returns: under a profiler the interpreter's own exit is taken."""
    out = tmp_path / "cli.prof"
    r = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "virtwarden.cli", "--version"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
