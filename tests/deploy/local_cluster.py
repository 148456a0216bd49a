"""A real one-node Ray cluster for tests: `ray start --head` on loopback, token authentication on.

Why a cluster and not `ray.init(address="local")`: what users run on a cluster goes through the Ray
Jobs API (`ray job submit --working-dir .` packs and uploads the repository, the job's driver runs
inside the cluster) and `serve deploy` (a REST call to the dashboard). Only a cluster started with
`ray start` has the dashboard, the job manager and the runtime-env agent that those need.

Other agents' Ray instances run on the same machine, so this cluster takes nothing shared:
* every port it opens is one the OS just handed out (GCS, dashboard, dashboard agent, runtime-env
  agent, metrics, node manager, object manager, Ray client server, the workers' port range);
* its own temp dir (sessions, logs, sockets) and its own HOME (`~/.ray/auth_token`, the model cache);
* it runs in a process group of its own (`ray start --block` in a new session) and is stopped by
  signalling that group, plus any stray process whose command line names its private temp dir.
  Never `ray stop`: that would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's bin: `ray`, `serve` and the `python` jobs run with
# Variables a developer's shell may carry that would point this cluster (or its CLI calls) elsewhere.
_INHERITED_NOT_WANTED = ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                         "RAY_AUTH_TOKEN_PATH", "PYTHONPATH")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the OS reports free now (all sockets held open until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(size: int, *, low: int = 20000, high: int = 60000, attempts: int = 200) -> tuple[int, int]:
    """A run of `size` consecutive ports that are all free now, for Ray's worker processes."""
    import random

    rng = random.Random()
    for _ in range(attempts):
        start = rng.randrange(low, high - size)
        held = []
        try:
            for port in range(start, start + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                held.append(s)
            return start, start + size - 1
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports between {low} and {high}")


@dataclass
class LocalCluster:
    """A running head node; `cli()` runs `ray`/`serve` commands as a user with the cluster's token would."""

    root: Path  # private temp dir: Ray's --temp-dir, the cluster's HOME, logs
    dashboard_url: str
    gcs_address: str
    env: dict[str, str]  # environment of the cluster's processes
    process: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    def user_env(self, **extra: str) -> dict[str, str]:
        """A user's shell: the same HOME (so the same ~/.ray/auth_token), no cluster-side settings."""
        env = _clean_env()
        env.update(HOME=str(self.home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
        return env

    def run_shell(self, command: str, *, timeout: float, env: dict[str, str] | None = None,
                  cwd: Path = REPO) -> subprocess.CompletedProcess:
        """A README command line, run by bash from the repository root as a user would paste it."""
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=env or self.user_env(), text=True,
                              capture_output=True, timeout=timeout)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the head's own log and of the job/serve logs, for assertion messages."""
        parts = []
        logs = sorted(self.temp_dir.glob("session_*/logs/*"), key=lambda p: p.stat().st_mtime)
        for path in [self.root / "ray-start.log", *logs[-4:]]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop this cluster only: its process group, then strays that name its temp dir."""
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (strays := _processes_naming(str(self.temp_dir))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _processes_naming(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_local_cluster(*, num_cpus: int, env: dict[str, str] | None = None, timeout: float = 120) -> LocalCluster:
    """Start a head node with token authentication on private ports; returns once its dashboard answers.

    `env` is added to the cluster's environment, as an operator sets it on real nodes (for example the
    S3 endpoint and credentials that an instance profile provides on AWS)."""
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    home = root / "home"
    home.mkdir()
    names = ["gcs", "dashboard", "dashboard_agent_listen", "dashboard_agent_grpc", "runtime_env_agent",
             "metrics_export", "node_manager", "object_manager", "ray_client_server"]
    ports = dict(zip(names, free_ports(len(names))))
    worker_low, worker_high = free_port_range(64)
    cluster_env = _clean_env()
    cluster_env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{cluster_env.get('PATH', '')}",
                       RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                       # Ray replaces a loopback --node-ip-address with the machine's address unless it
                       # is told that this machine is no multi-node cluster (services.get_node_ip_address).
                       RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **(env or {}))
    # The token, made the way the README tells users to: `ray get-auth-token --generate` (~/.ray/auth_token).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=cluster_env, check=True,
                   capture_output=True, timeout=60)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={root / 'ray'}",
        f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
        f"--ray-client-server-port={ports['ray_client_server']}",
        f"--min-worker-port={worker_low}", f"--max-worker-port={worker_high}",
    ]
    log = open(root / "ray-start.log", "wb")
    process = subprocess.Popen(command, env=cluster_env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    cluster = LocalCluster(root=root, dashboard_url=f"http://127.0.0.1:{ports['dashboard']}",
                           gcs_address=f"127.0.0.1:{ports['gcs']}", env=cluster_env, process=process, ports=ports)
    try:
        _wait_for_dashboard(cluster, timeout)
    except BaseException:
        log_text = cluster.log_tail()
        cluster.stop()
        raise RuntimeError(f"the local Ray cluster did not start:\n{log_text}") from None
    return cluster


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _INHERITED_NOT_WANTED}


def _wait_for_dashboard(cluster: LocalCluster, timeout: float) -> None:
    """Up means the dashboard's job API answers and the head's dashboard agent, which runs submitted
    jobs, is healthy: the dashboard answers "No available agent to submit job" until it is."""
    deadline = time.monotonic() + timeout
    token = (cluster.home / ".ray" / "auth_token").read_text().strip()
    urls = [f"{cluster.dashboard_url}/api/jobs/",
            f"http://127.0.0.1:{cluster.ports['dashboard_agent_listen']}/api/local_raylet_healthz"]
    while time.monotonic() < deadline:
        if cluster.process.poll() is not None:
            raise RuntimeError(f"ray start exited with {cluster.process.returncode}")
        if all(_answers(url, token) for url in urls):
            return
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {cluster.dashboard_url} did not answer within {timeout:.0f} s")


def _answers(url: str, token: str) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group `start_new_session` made: this cluster's processes only
    except ProcessLookupError:
        pass


def _processes_naming(marker: str) -> list[int]:
    """Ids of live processes whose command line contains `marker` (this cluster's private temp dir)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(entry.name))
    return found
