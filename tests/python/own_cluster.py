"""Throwaway PostgreSQL clusters of a test's own (whatever PG_GPT3_DSN says), for tests that
need server settings of their own: a standby, shared_preload_libraries. Needs the PostgreSQL
server binaries with pg_llm installed (as the test command installs them); run as root, the
clusters run as the OS user postgres, as scripts/cluster.sh runs its own."""
import os
import shutil
import subprocess
import time
from pathlib import Path


def bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def as_postgres(cmd):
    return (["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []) + [str(c) for c in cmd]


def run(cmd):
    subprocess.run(as_postgres(cmd), check=True, capture_output=True, text=True)


def fresh_root(root: Path) -> Path:
    """An empty `root` with a socket directory, owned by postgres; returns the socket dir."""
    shutil.rmtree(root, ignore_errors=True)
    sock = root / "sock"
    sock.mkdir(parents=True)
    if os.getuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    return sock


class Cluster:
    """The cluster in `root/name` on `port`, its socket in `root/sock`."""

    def __init__(self, root: Path, name: str, port: int, options: str = ""):
        self.root, self.name, self.port, self.options = root, name, port, options
        self.data = root / name

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root / 'sock'} port={self.port} user=postgres dbname={dbname}"

    def initdb(self) -> None:
        run([bindir() / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C.UTF-8"])

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root / 'sock'} -c listen_addresses='' "
                   f"-c shared_buffers=64MB {self.options}")
        run([bindir() / "pg_ctl", "-D", self.data, "-l", self.root / f"{self.name}.log", "-w",
             "-t", "60", "-o", options, "start"])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(as_postgres([bindir() / "pg_ctl", "-D", self.data, "-m", "immediate",
                                        "-w", "stop"]), capture_output=True)

    def log(self) -> str:
        path = self.root / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def wait_healthy(url: str, cluster: "Cluster", timeout_s: float = 30) -> None:
    """Waits until the HTTP endpoint at `url` answers /health with 200 (pg_llm's workers of
    `cluster` are up, whose log the failure shows)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no endpoint at {url}:\n" + cluster.log()
        time.sleep(0.1)
