"""A two-node Ray cluster and an S3 endpoint on 127.0.0.1, for development, tests and benchmarks.

`LocalCluster(state_dir).up()` starts `ray start --head` (with the dashboard, for `ray job submit`),
a second node joining it, and moto's S3 server, each as its own process group, Ray's files in a
temp dir of its own; `down()` stops exactly those groups, by the pids recorded in
`<state_dir>/cluster.json` (never by name: `ray stop` would stop every Ray process of the user), and
removes that temp dir. Each pid is recorded with its process's start time and command line, and a group
is signalled only while its leader still matches both: after a reboot (or once a process has ended) the
pid can be someone else's, and that one is skipped with a one-line warning naming it. Ray 2.60
authenticates with a token: a fresh one is written to `<state_dir>/auth_token` and every process gets
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH. The nodes also get the S3 endpoint and its (dummy) credentials in their
environment, so jobs read and write s3:// URLs with no storage options. `env()` is what a shell
exports to use the cluster: deploy/local/up.sh prints it.

    python -m actstore.testing.cluster up .cluster     # prints the exports
    python -m actstore.testing.cluster down .cluster
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

from actstore.errors import ConfigError

log = logging.getLogger(__name__)

BUCKET = "actstore"
"""The bucket up() creates."""
STATE = "cluster.json"
TOKEN = "auth_token"
OWN_FILES = frozenset({STATE, TOKEN, "head.log", "worker.log", "s3.log"})
"""What a cluster leaves in its state folder: a folder holding anything else is not one of ours."""
_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
START_TOLERANCE = 1.0
"""Seconds two readings of one process's start time may differ by (Linux derives it from the boot time, which
it rereads and may round differently); a reused pid's process starts later than that."""


def free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768 up on Linux): a
    port the kernel hands out for port 0 is where every other process's next connection or `bind(0)` lands too (Ray's
    workers make many), so a Ray agent told to listen on one could find it taken a moment later."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


class LocalCluster:
    """Head + one worker node (`nodes=1`: the head alone), each with `cpus_per_node` logical CPUs and a
    resource naming it, + moto's S3."""

    def __init__(self, state_dir: str | Path, cpus_per_node: int = 2, object_store_mb: int = 256,
                 timeout: float = 120.0, nodes: int = 2) -> None:
        if nodes not in (1, 2):
            raise ConfigError(f"LocalCluster: nodes must be 1 or 2, got {nodes}")
        self.dir = Path(state_dir).resolve()
        self.cpus, self.object_store_mb, self.timeout, self.nodes = cpus_per_node, object_store_mb, timeout, nodes
        self.state: dict[str, Any] = {}

    # what a client sets ------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for drivers, `ray job submit` and the nodes themselves."""
        s = self.state
        return {"RAY_ADDRESS": f"127.0.0.1:{s['gcs_port']}",
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{s['dashboard_port']}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.dir / TOKEN), "AWS_ENDPOINT_URL": s["s3"],
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def dashboard(self) -> str:
        """The address `ray job submit --address` takes."""
        return f"http://127.0.0.1:{self.state['dashboard_port']}"

    def alive_nodes(self) -> int:
        """Alive nodes, as the dashboard's node summary (from the GCS) counts them."""
        return sum(n["raylet"].get("state") == "ALIVE" for n in self._api("/nodes?view=summary")["data"]["summary"])

    # lifecycle ----------------------------------------------------------------------------
    def up(self) -> LocalCluster:
        """Start everything (refused when this state dir already has a running cluster); down() on failure."""
        if (self.dir / STATE).exists():
            raise ConfigError(f"{self.dir}: holds a cluster already ({STATE}); run down first")
        foreign = sorted(p.name for p in self.dir.iterdir() if p.name not in OWN_FILES) if self.dir.is_dir() else []
        if foreign or (self.dir.exists() and not self.dir.is_dir()):
            raise ConfigError(f"{self.dir}: not a cluster state folder (holds {', '.join(foreign[:3]) or 'a file'}); "
                              "choose an empty or new folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        token = self.dir / TOKEN
        token.write_text(uuid.uuid4().hex)
        token.chmod(0o600)
        # Ray's own files in a temp dir of this cluster's: `ray start` records the cluster it started in
        # <temp dir>/ray_current_cluster, which a later plain ray.init() would join (even once stopped)
        self.state = {"processes": [], "gcs_port": free_port(), "dashboard_port": free_port(),
                      "ray_temp": tempfile.mkdtemp(prefix="ray-actstore-", dir="/tmp")}
        try:
            self._start_s3()
            env = {**os.environ, **self.env()}
            env.pop("RAY_ADDRESS")
            env.pop("RAY_API_SERVER_ADDRESS")
            # jobs' entrypoints run in the head's environment: `actstore` and `python` are this venv's
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            ray = str(Path(sys.executable).parent / "ray")
            common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus), "--disable-usage-stats",
                      "--temp-dir", self.state["ray_temp"],
                      "--object-store-memory", str(self.object_store_mb << 20), "--block"]
            self._spawn([ray, "start", "--head", "--port", str(self.state["gcs_port"]), "--include-dashboard", "true",
                         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.state["dashboard_port"]),
                         "--resources", '{"node_head": 1}', *common, *_agent_ports()], env, "head")
            self._wait_nodes(1)
            self._wait_jobs()  # first: a node joining a head still starting its dashboard may time out
            if self.nodes == 2:
                self._spawn([ray, "start", "--address", self.env()["RAY_ADDRESS"], "--resources",
                             '{"node_worker": 1}', *common, *_agent_ports()], env, "worker")
                self._wait_nodes(2)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop the process groups this cluster started (and only those), then forget them."""
        state_file = self.dir / STATE
        if not self.state and state_file.exists():
            self.state = json.loads(state_file.read_text())
        for pid in self.state.get("pids", []):  # a state file of an older actstore: nothing to check them by
            log.warning("cluster down: pid %d not signalled: no start time or command line recorded; stop it "
                        "yourself if it is still the cluster's", pid)
        _stop_groups([p["pid"] for p in self.state.get("processes", []) if _still_ours(p)])
        if self.state.get("ray_temp"):
            shutil.rmtree(self.state["ray_temp"], ignore_errors=True)
        for name in (STATE, TOKEN):
            (self.dir / name).unlink(missing_ok=True)
        self.state = {}

    def __enter__(self) -> LocalCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # helpers ------------------------------------------------------------------------------
    def _spawn(self, cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.state["processes"].append(_record(proc.pid))  # Popen returns once the command is exec'd
        (self.dir / STATE).write_text(json.dumps(self.state))  # recorded at once: down() finds it whatever happens
        return proc

    def _start_s3(self) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        proc = self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], env, "s3")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = _RUNNING.search((self.dir / "s3.log").read_bytes())
            if m:
                self.state["s3"] = f"http://127.0.0.1:{int(m.group(1))}"
                (self.dir / STATE).write_text(json.dumps(self.state))
                import s3fs  # only S3 users need it

                s3fs.S3FileSystem(endpoint_url=self.state["s3"], key="testing", secret="testing").mkdir(BUCKET)
                return
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"moto server did not start; see {self.dir / 's3.log'}")

    def _api(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The dashboard's HTTP API with the token: a GET, or a POST of `body`. The waits below poll it
        rather than a `ray` command or a driver, each of which imports Ray (seconds per try)."""
        request = urllib.request.Request(
            self.dashboard + path, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {(self.dir / TOKEN).read_text()}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def _wait_nodes(self, n: int) -> None:
        """Until the dashboard (with the token) counts n alive nodes."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if self.alive_nodes() == n:
                    return
            except (OSError, ValueError, KeyError):  # the dashboard not up yet, or not answering in full
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Ray: {n} node(s) not up after {self.timeout:.0f} s; see the logs in {self.dir}")

    def _wait_jobs(self) -> None:
        """Until a job submitted to the dashboard succeeds: its HTTP server answers before the head's job
        agent has registered ("No available agent to submit job")."""
        deadline = time.monotonic() + self.timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                job = self._api("/api/jobs/", {"entrypoint": "true"})["submission_id"]
                while time.monotonic() < deadline:
                    status = self._api(f"/api/jobs/{job}")["status"]
                    if status == "SUCCEEDED":
                        return
                    if status in ("FAILED", "STOPPED"):
                        break
                    time.sleep(0.2)
                last = f"a job {status}"
            except (OSError, ValueError, KeyError) as e:
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"Ray job submission not ready at {self.dashboard}: {last[-300:]}")


def _agent_ports() -> list[str]:
    """Free ports for a node's agents: their defaults (e.g. 52365) are taken by any other Ray on this
    machine (a second node, a local ray.init()), and a head without its agent takes no jobs."""
    return [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                             "--runtime-env-agent-port", "--metrics-export-port") for arg in (flag, str(free_port()))]


def _record(pid: int) -> dict[str, Any]:
    """What identifies a process beyond its pid: its start time and command line."""
    p = psutil.Process(pid)
    deadline = time.monotonic() + 5.0
    while True:
        try:
            cmdline = p.cmdline()
        except psutil.ZombieProcess:  # it has already ended (a command that failed at once): its start time says it
            cmdline = []
            break
        if cmdline or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # in the middle of its exec a process shows no command line yet
    return {"pid": pid, "started": p.create_time(), "cmdline": cmdline}


def _still_ours(record: dict[str, Any]) -> bool:
    """Whether the process `record` names still runs as recorded (a zombie has no command line left: its start
    time says it); else a warning naming the pid, and it is not signalled."""
    pid = record["pid"]
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - record["started"]) > START_TOLERANCE:
            why = "another process has this pid now (it started at another time)"
        elif p.status() != psutil.STATUS_ZOMBIE and p.cmdline() != record["cmdline"]:
            why = f"another process has this pid now ({' '.join(p.cmdline())[:80]!r})"
        else:
            return True
    except psutil.NoSuchProcess:
        why = "it is not running" + (f" (processes of its group are: see `ps -g {pid}`)" if _group_exists(pid) else "")
    except psutil.AccessDenied:
        why = "another user's process has this pid now"
    log.warning("cluster down: pid %d not signalled: %s; recorded as %r", pid, why, " ".join(record["cmdline"])[:80])
    return False


def _stop_groups(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM the process groups led by `pids` (started with start_new_session) together, SIGKILL what is
    left after `grace` seconds, and return once they are gone. The grace is short: a head node's group
    outlives SIGTERM by more than 15 s (its `ray start --block` waits on its children), so a longer one
    only delays the same SIGKILL."""
    live = pids
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in live:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = [pid for pid in live if _group_exists(pid)]


def _group_exists(pid: int) -> bool:
    """Whether a process of the group is left; its leader is reaped first when it is a child of this process
    (up() and down() in one process), as a zombie leader would count."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("up", "down"):
        print("usage: python -m actstore.testing.cluster up|down STATE_DIR", file=sys.stderr)
        return 2
    cluster = LocalCluster(args[1])
    if args[0] == "down":
        cluster.down()
        return 0
    try:
        cluster.up()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"# {cluster.nodes} Ray node(s) and S3 (bucket s3://{BUCKET}) on 127.0.0.1; jobs: ray job submit -- ...")
    for k, v in cluster.env().items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
