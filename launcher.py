"""Start the service's processes on this machine: a private redis-server (or a Sentinel group of them: a master,
its replica and three sentinels), workers and web servers.

Used by the benchmark and the tests, which need real processes on free ports, never a developer's 6379,
and by `make run` (`python launcher.py redis-server PORT DIR`) for its private Redis.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_server_command(port, workdir, *extra):
    """Our one redis-server command line: loopback only, nothing saved to disk."""
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]


class RedisServer:
    """A redis-server of our own on a free loopback port, without persistence; it can stop and start again."""

    def __init__(self, workdir):
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed: `make install-system` installs it")
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self, *extra):
        command = redis_server_command(self.port, self.workdir, *extra)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for(self._answers, 10, "redis-server to start")

    def _answers(self):
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def stop(self):
        self.process.terminate()
        self.process.wait(10)

    def client(self, **kwargs):
        return redis.Redis.from_url(self.url, **kwargs)


class SentinelGroup:
    """A master, one replica and three sentinels watching them (quorum 2), each a redis-server of our own on a
    free loopback port; the sentinels take the master for down after `down_after_ms` of silence. `url` is the
    redis+sentinel:// URL of the group, under the name `service`."""

    def __init__(self, workdir, service="imgclf", down_after_ms=1000):
        self.workdir, self.service, self.down_after_ms = Path(workdir), service, down_after_ms
        self.master, self.replica = RedisServer(self.workdir / "master"), RedisServer(self.workdir / "replica")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = []
        self.url = f"redis+sentinel://{','.join(f'127.0.0.1:{port}' for port in self.sentinel_ports)}/{service}/0"

    def start(self):
        for server in (self.master, self.replica):
            server.workdir.mkdir(parents=True, exist_ok=True)
        self.master.start()
        self.replica.start("--replicaof", "127.0.0.1", str(self.master.port))
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"  # a sentinel rewrites its file with what it learns
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} 5000\n"
            )
            command = ["redis-server", str(conf), "--sentinel"]
            self.sentinels.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        wait_for(self._watched, 30, "the sentinels to see the replica and each other")

    def _watched(self):
        """Whether every sentinel knows the replica, with its link to the master up, and the two other sentinels."""
        try:
            for port in self.sentinel_ports:
                sentinel = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                master = sentinel.sentinel_master(self.service)
                replicas = sentinel.sentinel_slaves(self.service)
                if master["num-other-sentinels"] < 2 or not any(r["master-link-status"] == "ok" for r in replicas):
                    return False
            return True
        except redis.RedisError:
            return False

    def failover(self):
        """A failover by hand (SENTINEL FAILOVER): the replica is promoted while the master still runs, and the
        sentinels turn it into a replica only later (seconds: they read a replica's INFO every 10 s)."""
        redis.Redis(port=self.sentinel_ports[0], socket_timeout=5).sentinel_failover(self.service)

    def master_port(self):
        """The port of the master as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                sentinel = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                return int(sentinel.sentinel_get_master_addr_by_name(self.service)[1])
            except redis.RedisError:
                continue
        return None

    def stop(self):
        for process in [*self.sentinels, self.master.process, self.replica.process]:
            if process is not None and process.poll() is None:
                process.kill()
            if process is not None:
                process.wait(10)


class Processes:
    """Workers and web servers as real processes against one Redis, each logging to its own file."""

    def __init__(self, redis_url, logdir, **env):
        self.logdir = Path(logdir)
        self.env = {**os.environ, "REDIS_URL": redis_url, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", **env}
        self.processes = []
        self.port = None

    def _spawn(self, script, name, env):
        path = self.logdir / f"{name}.log"
        with open(path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / script)],
                cwd=ROOT,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process.log_path = path
        self.processes.append(process)
        return process

    @staticmethod
    def log_text(process):
        return process.log_path.read_text()

    def start_worker(self, **env):
        process = self._spawn("run_model_server.py", f"worker{len(self.processes)}", env)
        wait_for(lambda: "worker_ready" in self.log_text(process) or process.poll() is not None, 180, "a worker")
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{self.log_text(process)}")
        return process

    def start_web(self, **env):
        self.port = free_port()
        process = self._spawn("run_web_server.py", f"web{len(self.processes)}", {"PORT": str(self.port), **env})
        wait_for(lambda: listening(self.port) or process.poll() is not None, 30, "the web server")
        if process.poll() is not None:
            raise RuntimeError(f"the web server exited:\n{self.log_text(process)}")
        return process

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self, process):
        """SIGTERM, then wait for the graceful stop."""
        if process.poll() is None:
            process.terminate()
        process.wait(60)

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "redis-server":
        sys.exit("usage: python launcher.py redis-server PORT DIR [redis-server options]")
    command = redis_server_command(*sys.argv[2:])
    os.execvp(command[0], command)
