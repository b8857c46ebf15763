"""deploy/local/down.sh signals only the processes its state file recorded, as recorded: a pid that another
process has now (after a reboot, or once the cluster's process ended) is left alone, with a line naming it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from actstore.testing.cluster import STATE, LocalCluster

ROOT = Path(__file__).parents[1]


@pytest.fixture
def sleeper():
    """Someone else's process: a `sleep` in a process group of its own, as a cluster's processes are."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _write_state(folder: Path, processes: list[dict]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / STATE).write_text(json.dumps({"processes": processes}))


def _down_sh(folder: Path) -> str:
    r = subprocess.run(["bash", "deploy/local/down.sh"], env={**os.environ, "STATE_DIR": str(folder)}, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_down_leaves_a_pid_that_is_another_process_now(sleeper, tmp_path):
    p = psutil.Process(sleeper.pid)
    started, cmdline = p.create_time(), p.cmdline()
    stale = {"an hour earlier (a reboot ago)": {"pid": sleeper.pid, "started": started - 3600, "cmdline": cmdline},
             "another command": {"pid": sleeper.pid, "started": started, "cmdline": ["ray", "start", "--head"]}}
    for case, record in stale.items():
        _write_state(tmp_path / "state", [record])
        err = _down_sh(tmp_path / "state")
        assert sleeper.poll() is None, f"{case}: someone else's process was signalled"
        lines = [line for line in err.splitlines() if f"pid {sleeper.pid} not signalled" in line]
        assert len(lines) == 1, (case, err)
        assert not (tmp_path / "state" / STATE).exists()  # the stale record is forgotten


def test_down_stops_the_process_as_recorded(sleeper, tmp_path):
    p = psutil.Process(sleeper.pid)
    _write_state(tmp_path / "state", [{"pid": sleeper.pid, "started": p.create_time(), "cmdline": p.cmdline()}])
    LocalCluster(tmp_path / "state").down()
    assert not psutil.pid_exists(sleeper.pid) or psutil.Process(sleeper.pid).status() == psutil.STATUS_ZOMBIE


def test_up_records_start_time_and_command_line(tmp_path):
    """What down checks is what _spawn recorded: moto's server alone (no Ray), stopped by down."""
    cluster = LocalCluster(tmp_path / "state")
    cluster.dir.mkdir()
    cluster.state = {"processes": []}
    try:
        cluster._start_s3()
        (record,) = json.loads((tmp_path / "state" / STATE).read_text())["processes"]
        p = psutil.Process(record["pid"])
        assert record["cmdline"] == p.cmdline() and "moto.server" in record["cmdline"]
        assert record["started"] == pytest.approx(p.create_time(), abs=1.0)
    finally:
        cluster.down()
    assert not psutil.pid_exists(record["pid"])
