"""Private Redis Clusters and Sentinel groups on loopback, for tests and benchmarks: real `redis-server`
processes (each in its own process group, killed on exit), on free ports, in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from backends.valkey import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def cluster_port(taken: set[int] | None = None) -> int:
    """A free port whose cluster bus port (+10000) is free and valid too, clear of `taken` ports' buses."""
    taken = taken or set()
    for _ in range(200):
        p = random.randint(20000, 45000)
        if {p, p + 10000, p - 10000} & taken:
            continue
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise RuntimeError("no free cluster port")


def cli(port: int, *args: str, timeout: float = 10.0) -> str:
    out = subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    return out.stdout + out.stderr


def redis_up(port: int) -> bool:
    """A Redis-protocol server answers PING on this loopback port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@dataclass
class Servers:
    """The processes started so far: `stop` kills each one's process group."""

    root: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    args: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def start(self, port: int, *args: str, sentinel: bool = False) -> None:
        self.args[port] = args
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER]
        if sentinel:
            conf = d / "sentinel.conf"
            conf.write_text(args[0])
            cmd += [str(conf), "--sentinel"]
            args = args[1:]
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--logfile", str(d / "log"), "--repl-diskless-sync-delay", "0", *args]
        self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
        wait_for(lambda: redis_up(port), 10, f"redis-server on {port}")

    def kill(self, port: int) -> None:
        """SIGKILL the server on `port` (its process group): a crash, no shutdown."""
        proc = self.procs.pop(port)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def restart(self, port: int) -> None:
        """Start the server on `port` again, as it was (a cluster node reads its nodes.conf back)."""
        self.start(port, *self.args[port])

    def stop(self) -> None:
        for port in list(self.procs):
            with contextlib.suppress(Exception):
                self.kill(port)


@dataclass
class Cluster:
    servers: Servers
    ports: list[int]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def masters(self) -> dict[int, int]:
        """master port -> its replica's port (from CLUSTER NODES on a live node)."""
        live = next(p for p in self.ports if p in self.servers.procs)
        rows = [line.split() for line in cli(live, "CLUSTER", "NODES").splitlines() if line.strip()]
        ids = {r[0]: int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows}
        out: dict[int, int] = {}
        for r in rows:
            if "slave" in r[2] and r[3] in ids and "fail" not in r[2]:
                out[ids[r[3]]] = ids[r[0]]
        return out

    def owner(self, slot: int) -> int:
        """The port of the master that serves `slot`."""
        live = next(p for p in self.ports if p in self.servers.procs)
        for line in cli(live, "CLUSTER", "NODES").splitlines():
            r = line.split()
            if len(r) < 9 or "master" not in r[2] or "fail" in r[2]:
                continue
            for rng in r[8:]:
                lo, _, hi = rng.partition("-")
                if not lo.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return int(r[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(slot)

    def ok(self) -> bool:
        return all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in self.ports if p in self.servers.procs)


@contextlib.contextmanager
def private_cluster(root: Path, node_timeout_ms: int = 1000) -> Iterator[Cluster]:
    """3 masters + 3 replicas (`redis-cli --cluster create ... --cluster-replicas 1`), state ok."""
    servers = Servers(root)
    try:
        ports: list[int] = []
        for _ in range(6):
            ports.append(cluster_port(set(ports)))
        for p in ports:
            servers.start(p, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf",
                          "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                          "--cluster-replica-validity-factor", "0")
        out = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                              "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                             timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError("redis-cli --cluster create failed:\n" + out.stdout[-2000:] + out.stderr[-2000:])
        cluster = Cluster(servers, ports)
        wait_for(cluster.ok, 30, "cluster_state:ok")
        wait_for(lambda: len(cluster.masters()) == 3, 30, "3 masters with a replica each")
        wait_for(lambda: all("master_link_status:up" in cli(r, "INFO", "replication")
                             for r in cluster.masters().values()), 30, "replicas in sync")
        yield cluster
    finally:
        servers.stop()


@dataclass
class SentinelGroup:
    servers: Servers
    master: int
    replica: int
    sentinels: list[int]
    service: str = "tgmaster"

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.service}/0"


@contextlib.contextmanager
def private_sentinel(root: Path, n_sentinels: int = 2) -> Iterator[SentinelGroup]:
    """1 master + 1 replica + `n_sentinels` sentinels (quorum 1), each sentinel seeing the replica."""
    servers = Servers(root)
    try:
        master, replica = free_port(), free_port()
        servers.start(master)
        servers.start(replica, "--replicaof", "127.0.0.1", str(master))
        group = SentinelGroup(servers, master, replica, [free_port() for _ in range(n_sentinels)])
        conf = (f"sentinel monitor {group.service} 127.0.0.1 {master} 1\n"
                f"sentinel down-after-milliseconds {group.service} 1000\n"
                f"sentinel failover-timeout {group.service} 5000\n")
        for p in group.sentinels:
            servers.start(p, conf, sentinel=True)
        wait_for(lambda: "master_link_status:up" in cli(replica, "INFO", "replication"), 20, "replica in sync")
        wait_for(lambda: all(f"{master}" in cli(p, "SENTINEL", "get-master-addr-by-name", group.service)
                             for p in group.sentinels), 20, "sentinels see the master")
        yield group
    finally:
        servers.stop()
