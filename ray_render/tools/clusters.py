"""Real Ray clusters on one machine, for drills and tests: several nodes, lost nodes, and Ray's own autoscaler.

- `LocalCluster`: a head (no GPUs, a couple of CPUs) and worker nodes, each a `ray start --block` of its own with
  declared GPUs (`--num-gpus=1`), its own temp dir and ports. `add_worker()` starts one more node, `kill_worker(node)`
  SIGKILLs every process of that node at once (its raylet, its agents and the workers under them: a lost machine),
  `address` is the GCS address for `--address` / `RAY_ADDRESS`, `env` the environment a driver needs.
- `FakeAutoscalingCluster`: a head started with `--autoscaling-config` and `RAY_FAKE_CLUSTER=1`, so Ray's real
  autoscaler (`monitor.py`) adds worker nodes on this machine with its fake multi-node provider when work is
  pending (a GPU worker type, 0 to 3 nodes of 1 GPU by default) and removes idle ones.

Both are context managers whose exit stops exactly their own processes: the descendants of the `ray start --block`s
this module started (the autoscaler's nodes are started by its monitor, a descendant of the head's), found by pid,
plus any process whose command line or open files name the cluster's own temp root (one orphaned before the stop:
Ray's agents retitle themselves, but keep their logs open there). `ray stop` is never run: it ends every Ray on the
machine, whoever started it. Each `ray start --block` also dies with the thread that started it (Linux's
parent-death signal) and takes its node along, so a test process killed outright leaves no cluster behind.

Token auth (Ray 2.60 turns it on): each cluster gets a token of its own in `env` (`RAY_AUTH_MODE=token`,
`RAY_AUTH_TOKEN`), so neither it nor its clients read or write the shared `~/.ray/auth_token`. Clients must run with
`env` (a `ray-render run` subprocess, `ray job submit`); it also puts this checkout first on PYTHONPATH, so the
nodes' workers import the same `ray_render` as the driver.

    with LocalCluster(workers=2) as cluster:
        subprocess.run(["ray-render", "run", ..., "--address", cluster.address], env=cluster.env)
        cluster.kill_worker(cluster.workers[0])
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 120.0  # a `ray start` on a busy 2-core machine
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL what is left
KILL_TIMEOUT_S = 30.0  # SIGKILLed processes are gone well within this
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # per node: these nodes hold shard results, not images
_NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port")
_HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")
_CHECKOUT = str(Path(__file__).resolve().parents[2])  # the directory holding this `ray_render` package


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_binary() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it ends (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


@dataclass
class Node:
    """One `ray start --block` and everything under it."""

    name: str  # "head", "worker-1", ...
    temp_dir: str
    process: subprocess.Popen
    ports: dict[str, int]
    num_gpus: int
    head: bool = False
    node_id: str = ""  # Ray's node id, once the node registered
    killed: bool = False

    @property
    def log_path(self) -> str:
        return os.path.join(self.temp_dir, "ray-start.log")

    def pids(self) -> list[int]:
        """The `ray start` process and its descendants (its raylet, agents, the workers under the raylet)."""
        return [self.process.pid, *_descendants(self.process.pid)]

    def running(self, title_prefix: str) -> list[int]:
        """The pids of this node's processes whose command line starts with `title_prefix` (Ray retitles workers:
        `ray::RenderActor.render_shard` while an actor renders)."""
        return [pid for pid in _descendants(self.process.pid) if _cmdline(pid).startswith(title_prefix)]


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _naming(root: str) -> list[int]:
    """Processes whose command line or open files name `root` (a directory unique to one cluster of this module)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            if root in " ".join(process.info["cmdline"] or []) or \
                    any(opened.path.startswith(root) for opened in process.open_files()):
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _signal_all(pids: list[int], signum: int) -> int:
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, signum)
            sent += 1
        except (ProcessLookupError, PermissionError):
            continue
    return sent


def living_pids(pids: list[int]) -> list[int]:
    """The processes of `pids` still running (zombies count as gone)."""
    import psutil

    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            continue
    return living


def _raylets_first(pids: list[int]) -> list[int]:
    """`pids` with the raylets first: a node whose raylet goes first cannot report its workers' deaths, as when a
    machine vanishes."""
    raylets = [pid for pid in pids if os.path.basename(_cmdline(pid).split(" ", 1)[0]) == "raylet"]
    return raylets + [pid for pid in pids if pid not in raylets]


class LocalCluster:
    """A head without GPUs plus `workers` GPU nodes (`worker_gpus` declared GPUs each), all on this machine.

    `start()` (or `with`) starts the head, then the workers; `add_worker()` starts another, `kill_worker(node)`
    SIGKILLs one, `stop()` ends every process this cluster started and removes its temp dirs.
    """

    def __init__(self, workers: int = 0, *, head_cpus: int = 2, worker_cpus: int = 1, worker_gpus: int = 1,
                 dashboard: bool = False, env: dict | None = None, temp_root: str = "/tmp") -> None:
        self.initial_workers = workers
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.worker_gpus = worker_gpus
        self.dashboard = dashboard  # `ray job submit` needs it; a driver with --address does not
        # A short root: Ray's unix socket paths must stay under about 100 characters.
        self.root = tempfile.mkdtemp(prefix="rr-cl-", dir=temp_root)
        self.env = self._environment(env)
        self.head: Node | None = None
        self.workers: list[Node] = []
        self.node_ip = ""
        self.gcs_port = free_port()
        self._lock = threading.Lock()
        self._workers_started = 0
        self._stopped = False

    def _environment(self, extra: dict | None) -> dict:
        env = {key: value for key, value in os.environ.items()
               if key not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(part for part in (_CHECKOUT, env.get("PYTHONPATH")) if part)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this cluster's own: never the shared ~/.ray/auth_token
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.update(extra or {})
        return env

    # -- addresses ---------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The head's GCS address: `--address` of `ray-render run`, `RAY_ADDRESS`, `ray.init(address=...)`."""
        if not self.node_ip:
            raise RuntimeError("the cluster is not started")
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        if not self.dashboard:
            raise RuntimeError("this cluster was started without its dashboard (dashboard=False)")
        return f"http://127.0.0.1:{self.head.ports['dashboard-port']}"

    # -- starting ----------------------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the head, then the initial workers all at once (a `ray start` takes 5-10 s on a busy machine)."""
        try:
            self._start_node("head", head=True)
            spawned = [self._spawn_node(self._worker_name(), head=False) for _ in range(self.initial_workers)]
            self.workers += spawned  # stop() finds them even if one fails to start
            for node in spawned:
                self._await_node(node)
        except BaseException:
            self.stop()
            raise
        return self

    def _head_options(self) -> list[str]:
        return [f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                f"--include-dashboard={'true' if self.dashboard else 'false'}", "--dashboard-host=127.0.0.1"]

    def _start_node(self, name: str, head: bool) -> Node:
        node = self._spawn_node(name, head)
        if head:
            self.head = node  # stop() finds it even if it fails to start
        try:
            self._await_node(node)
        except BaseException:
            self._stop_nodes([node])
            raise
        return node

    def _spawn_node(self, name: str, head: bool) -> Node:
        """Run `ray start --block` for node `name`; returns at once (`_await_node` waits for it)."""
        temp_dir = os.path.join(self.root, name)
        os.makedirs(temp_dir)
        ports = {port: free_port() for port in (*_NODE_PORTS, *(_HEAD_PORTS if head else ()))}
        if head:
            ports["port"] = self.gcs_port
        command = [_ray_binary(), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                   f"--object-store-memory={OBJECT_STORE_BYTES}", "--min-worker-port=0", "--max-worker-port=0",
                   *[f"--{option}={port}" for option, port in ports.items()]]
        if head:
            command += ["--head", *self._head_options()]
            num_gpus = 0
        else:
            command += [f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                        f"--num-gpus={self.worker_gpus}", f"--labels=ray-render-node={name}"]
            num_gpus = self.worker_gpus
        main_thread = threading.current_thread() is threading.main_thread()
        with open(os.path.join(temp_dir, "ray-start.log"), "w") as log:
            # The parent-death signal fires when the starting *thread* ends: only the main thread lives as long as
            # the process. Nodes started from another thread go with stop() alone.
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent if main_thread else None)
        return Node(name, temp_dir, process, ports, num_gpus, head=head)

    def _await_node(self, node: Node) -> None:
        text = self._wait_started(node)
        if node.head:
            match = re.search(r"Local node IP: ([0-9a-fA-F.:]+)", text)
            if not match:
                raise RuntimeError(f"`ray start --head` printed no node IP: {text[-2000:]}")
            self.node_ip = match.group(1)
        node.node_id = self._node_id(node)

    def _wait_started(self, node: Node) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = re.sub(r"\x1b\[[0-9;]*m", "", Path(node.log_path).read_text(errors="replace"))
            if "Ray runtime started." in text:
                return text
            if node.process.poll() is not None:
                raise RuntimeError(f"`ray start` of {node.name} exited {node.process.returncode}: {text[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"`ray start` of {node.name} not started after {START_TIMEOUT_S:.0f} s: "
                                   f"{text[-3000:]}")
            time.sleep(0.2)

    def _node_id(self, node: Node) -> str:
        """Ray's id of `node`: its raylet's command line says it ("" if no raylet shows one within 30 s)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for pid in _descendants(node.process.pid):
                arguments = _cmdline(pid).split(" ")
                if os.path.basename(arguments[0]) == "raylet":
                    for argument in arguments:
                        if argument.startswith("--node_id="):
                            return argument.split("=", 1)[1]
            time.sleep(0.1)
        return ""

    def _worker_name(self) -> str:
        with self._lock:
            self._workers_started += 1
            return f"worker-{self._workers_started}"

    def add_worker(self) -> Node:
        """Start one more worker node (`worker_gpus` GPUs); returns it once its raylet is up."""
        node = self._start_node(self._worker_name(), head=False)
        with self._lock:
            self.workers.append(node)
        return node

    # -- faults ------------------------------------------------------------------------------------------------

    def kill_worker(self, node: Node) -> list[int]:
        """SIGKILL every process of `node` at once, its raylet first (a lost machine); returns their pids once they
        are all gone. Repeats for processes started meanwhile (a worker the raylet forked a moment before)."""
        killed: list[int] = []
        deadline = time.monotonic() + KILL_TIMEOUT_S
        node.killed = True
        while True:
            pids = list(dict.fromkeys([*node.pids(), *_naming(node.temp_dir)]))
            living = living_pids(pids)
            if not living:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {living} of {node.name} still alive {KILL_TIMEOUT_S:.0f} s after "
                                   f"SIGKILL")
            _signal_all(_raylets_first(living), signal.SIGKILL)
            killed += [pid for pid in living if pid not in killed]
            time.sleep(0.1)
        node.process.wait(timeout=KILL_TIMEOUT_S)
        return killed

    def alive_workers(self) -> list[Node]:
        return [node for node in self.workers if not node.killed]

    # -- stopping ----------------------------------------------------------------------------------------------

    def _stop_nodes(self, nodes: list[Node]) -> None:
        pids: list[int] = []
        for node in nodes:
            pids += node.pids()
        pids += _naming(self.root)  # anything orphaned before now (its parent died first)
        pids = list(dict.fromkeys(pids))
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while living_pids(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_all(living_pids(pids), signal.SIGKILL)
        for node in nodes:
            try:
                node.process.wait(timeout=KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        """End every process of this cluster (workers first, then the head) and remove its temp dirs. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        nodes = [*reversed(self.workers), *([self.head] if self.head else [])]
        try:
            self._stop_nodes(nodes)
            deadline = time.monotonic() + KILL_TIMEOUT_S
            while time.monotonic() < deadline:  # a process that was being started while we stopped
                left = living_pids(_naming(self.root))
                if not left:
                    break
                _signal_all(left, signal.SIGKILL)
                time.sleep(0.2)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class WorkerType:
    """One node type of the fake autoscaler: resources per node, and how many nodes."""

    name: str = "gpu"
    cpus: int = 1
    gpus: int = 1
    min_workers: int = 0
    max_workers: int = 3
    object_store_bytes: int = OBJECT_STORE_BYTES
    extra: dict = field(default_factory=dict)  # more custom resources


class FakeAutoscalingCluster(LocalCluster):
    """A head without GPUs whose Ray autoscaler adds fake nodes of `worker_types` on this machine.

    The config is the fake multi-node provider's (Ray's `fake_multi_node/example.yaml`, which the wheel does not
    ship), pointed at this head's GCS port: the provider would otherwise join port 6379, another cluster's. The
    provider starts its nodes inside the head's monitor process, under the head's temp dir. Nodes idle for
    `idle_timeout_minutes` are removed; the autoscaler looks every second (`AUTOSCALER_UPDATE_INTERVAL_S=1`).
    """

    def __init__(self, worker_types: list[WorkerType] | None = None, *, head_cpus: int = 2,
                 idle_timeout_minutes: float = 0.5, env: dict | None = None, temp_root: str = "/tmp") -> None:
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}
        super().__init__(0, head_cpus=head_cpus, env=env, temp_root=temp_root)
        self.worker_types = worker_types or [WorkerType()]
        self.idle_timeout_minutes = idle_timeout_minutes
        self.config_path = os.path.join(self.root, "autoscaling.json")

    def autoscaling_config(self) -> dict:
        types = {"ray.head.default": {"resources": {"CPU": self.head_cpus, "GPU": 0}, "node_config": {},
                                      "max_workers": 0}}
        for kind in self.worker_types:
            resources = {"CPU": kind.cpus, "GPU": kind.gpus, "object_store_memory": kind.object_store_bytes,
                         **kind.extra}
            types[f"ray.worker.{kind.name}"] = {"resources": resources, "node_config": {},
                                                "min_workers": kind.min_workers, "max_workers": kind.max_workers}
        return {"cluster_name": f"fake-{os.path.basename(self.root)}",
                "max_workers": sum(kind.max_workers for kind in self.worker_types),
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                             "disable_launch_config_check": True, "gcs_address": self.address},
                "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
                "upscaling_speed": 1.0, "idle_timeout_minutes": self.idle_timeout_minutes, "docker": {},
                "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                "rsync_exclude": [], "rsync_filter": []}

    def start(self) -> FakeAutoscalingCluster:
        from ray._private.services import get_node_ip_address

        try:
            self.node_ip = get_node_ip_address()  # the provider's nodes join the head at this address
            Path(self.config_path).write_text(json.dumps(self.autoscaling_config(), indent=2))
            self._start_node("head", head=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _head_options(self) -> list[str]:
        return [*super()._head_options(), f"--autoscaling-config={self.config_path}"]

    def add_worker(self) -> Node:
        raise NotImplementedError("the autoscaler adds this cluster's nodes: ask for resources instead")

    def autoscaled_nodes(self) -> int:
        """How many nodes the autoscaler has running now: the raylets under the head's tree, less the head's own."""
        raylets = [pid for pid in _descendants(self.head.process.pid)
                   if os.path.basename(_cmdline(pid).split(" ", 1)[0]) == "raylet"]
        return max(0, len(raylets) - 1)
