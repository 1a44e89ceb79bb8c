"""Shared helpers of the hardening measurements (cancel latency, weights under writes, soak).

Each script calls `bootstrap()` before importing psycopg: outside the scripts' own virtual
environment (target/hardening-venv) it creates that environment with psycopg from PyPI when
missing and runs itself again inside it.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VENV = os.path.join(REPO_ROOT, "target", "hardening-venv")
MB = 1 << 20


def bootstrap(extra=()):
    """Makes `import psycopg` (and the modules named in `extra`, PyPI names = module names)
    work, re-running the calling script inside VENV if needed."""
    try:
        import psycopg  # noqa: F401
        for name in extra:
            __import__(name)
        return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python")
    if os.environ.get("PG_GPT3_BOOTSTRAPPED"):
        raise SystemExit(f"psycopg or {list(extra)} is missing from {VENV}: delete it and run again")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "psycopg[binary]>=3.1,<4", *extra], check=True)
    os.environ["PG_GPT3_BOOTSTRAPPED"] = "1"
    os.execv(python, [python] + sys.argv)


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Server:
    """The server the measurement runs on, and a fresh database of its own in it.

    Without PG_GPT3_DSN a throwaway cluster is started with scripts/cluster.sh (PG_GPT3_RUN and
    PG_GPT3_PORT, defaulting to per-script values) and stopped at the end; a cluster directory
    the script created is removed too. With PG_GPT3_DSN that server is used: it must run on this
    host, because memory is read from /proc/<backend pid>.
    """

    def __init__(self, name, default_port, keep=False):
        import psycopg
        from psycopg.conninfo import make_conninfo
        # A SIGTERM (timeout, kill) ends the script through its `finally`: the cluster stops.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        self.keep = keep
        self.tmpdirs = []
        self.run_dir = None
        self.created_dir = False
        dsn = os.environ.get("PG_GPT3_DSN")
        if dsn:
            self.admin_dsn = dsn
        else:
            self.run_dir = os.environ.get("PG_GPT3_RUN", f"/tmp/pg_gpt3_hardening_{name}")
            port = os.environ.get("PG_GPT3_PORT", str(default_port))
            self.created_dir = not os.path.exists(self.run_dir)
            self._env = dict(os.environ, PG_GPT3_RUN=self.run_dir, PG_GPT3_PORT=port)
            log(f"starting a throwaway cluster in {self.run_dir} on port {port}")
            subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "cluster.sh"), "start"],
                           env=self._env, check=True, stdout=subprocess.DEVNULL)
            self.admin_dsn = f"host={self.run_dir}/sock port={port} user=postgres dbname=postgres"
        self.dbname = f"pg_llm_hardening_{name}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as c:
            pid = c.info.backend_pid
            if not os.path.exists(f"/proc/{pid}/smaps_rollup"):
                raise SystemExit("the server must run on this host (backend memory is read from /proc)")
            c.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{self.dbname}"')
        self.dsn = make_conninfo(self.admin_dsn, dbname=self.dbname)
        with self.connect() as c:
            c.execute("CREATE EXTENSION pg_llm")
            self.data_dir = c.execute("SHOW data_directory").fetchone()[0]
            self.db_oid = c.execute(
                "SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
            self.ext_version = c.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'pg_llm'").fetchone()[0]

    def connect(self):
        import psycopg
        return psycopg.connect(self.dsn, autocommit=True)

    def cache_dir(self):
        """This database's weight files: $PGDATA/pg_llm_cache/<database oid>."""
        return os.path.join(self.data_dir, "pg_llm_cache", str(self.db_oid))

    def cache_files(self):
        try:
            return sorted(os.listdir(self.cache_dir()))
        except FileNotFoundError:
            return []

    def checkpoint_file(self, model):
        """Exports `model` once (pg_llm_export_safetensors_bytes) into a file the server can read.
        Returns (path, config.json). The imports read it on the server (the path form, or
        pg_read_binary_file for the bytes form): libpq takes minutes to send a 500 MB parameter
        (its send buffer is shifted after every partial write), which would measure the client."""
        import tempfile
        with self.connect() as c:
            data = c.execute("SELECT pg_llm_export_safetensors_bytes(%s)", (model,)).fetchone()[0]
            config = c.execute("SELECT pg_llm_export_config(%s)", (model,)).fetchone()[0]
        tmp = tempfile.mkdtemp(prefix="pg_llm_hardening_")
        self.tmpdirs.append(tmp)
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, "model.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o644)
        log(f"{model} exported: {len(data) / MB:.0f} MB in {path}")
        return path, config

    def close(self):
        import psycopg
        for tmp in self.tmpdirs:
            shutil.rmtree(tmp, ignore_errors=True)
        if not self.keep:
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            except psycopg.Error as e:
                log(f"could not drop {self.dbname}: {e}")
        if self.run_dir is not None:
            cmd = "destroy" if self.created_dir and not self.keep else "stop"
            subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "cluster.sh"), cmd],
                           env=self._env, check=False, stdout=subprocess.DEVNULL)


def smaps(pid):
    """A process's memory in bytes from /proc/<pid>/smaps_rollup: rss, pss, private
    (Private_Clean + Private_Dirty: pages no other process maps at the moment, which includes a
    shared file's pages while this process is their only user) and anon (Anonymous: heap and
    other memory no file backs, where a private copy of the weights would live). None once the
    process is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {"rss": fields.get("Rss", 0), "pss": fields.get("Pss", 0),
            "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
            "anon": fields.get("Anonymous", 0)}


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryGuard(threading.Thread):
    """Sets `tripped` (and calls `on_trip`) when the host's MemAvailable falls below a floor,
    so that a measurement stops before the kernel's OOM killer hits this or anyone else's work."""

    def __init__(self, floor_bytes, on_trip):
        super().__init__(daemon=True)
        self.floor = floor_bytes
        self.on_trip = on_trip
        self.tripped = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.25):
            avail = mem_available()
            if avail < self.floor:
                self.tripped = f"MemAvailable {avail / MB:.0f} MB fell below {self.floor / MB:.0f} MB"
                log(f"memory guard: {self.tripped}; stopping the measurement")
                self.on_trip()
                return


def random_ids(rng, n, vocab=50257):
    return [rng.randrange(vocab) for _ in range(n)]


def sqlstate(exc):
    return getattr(getattr(exc, "diag", None), "sqlstate", None) or type(exc).__name__


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in r) + " |")
    return "\n".join(lines)


def emit(table, result):
    """Prints the markdown table, then one JSON line of all results (for tools). The host's load
    says how much else ran meanwhile (other work on the machine moves the figures)."""
    result = dict(result, host={"cpus": os.cpu_count(),
                                "loadavg": [round(x, 2) for x in os.getloadavg()]})
    print(table)
    print()
    print(json.dumps(result, sort_keys=True))
    sys.stdout.flush()


def seeded(seed):
    return random.Random(seed)


def mb(x):
    return f"{x / MB:.0f}"


class Looper(threading.Thread):
    """One connection running `step(conn)` in a loop until `stop` is set, at most once every
    `every` seconds. `step` returns how much it did (tokens, steps, writes), summed in `done`.
    Errors are recorded with their SQLSTATE and the loop goes on, on a new connection if the
    old one broke."""

    def __init__(self, server, role, step, stop, every=None):
        super().__init__(daemon=True)
        self.server, self.role, self.step, self.stop, self.every = server, role, step, stop, every
        self.conn = server.connect()
        self.pid = self.conn.info.backend_pid
        self.pids = [self.pid]
        self.done = 0
        self.calls = 0
        self.errors = []
        self.expected_cancels = 0   # cancels the measurement itself sent (at its end)
        self.first_start = None
        self.last_end = None
        self.lock = threading.Lock()

    def run(self):
        import psycopg
        while not self.stop.is_set():
            started = time.perf_counter()
            if self.first_start is None:
                self.first_start = started
            try:
                n = self.step(self.conn)
                with self.lock:
                    self.done += n
                    self.calls += 1
                    self.last_end = time.perf_counter()
            except psycopg.Error as e:
                if sqlstate(e) == "57014" and self.stop.is_set():
                    self.expected_cancels += 1
                else:
                    self.errors.append({"role": self.role, "t": round(time.time(), 1),
                                        "sqlstate": sqlstate(e), "error": str(e).splitlines()[0]})
                    log(f"{self.role}: {sqlstate(e)} {str(e).splitlines()[0]}")
                if self.conn.broken or self.conn.closed:
                    time.sleep(1)
                    try:
                        self.conn = self.server.connect()
                        self.pid = self.conn.info.backend_pid
                        self.pids.append(self.pid)
                    except psycopg.Error:
                        pass
            if self.every is not None:
                self.stop.wait(max(0.0, self.every - (time.perf_counter() - started)))
        self.conn.close()


def generate_step(model, prompt, new_tokens, seed):
    """A Looper step: one llm_generate_ids call of exactly `new_tokens` tokens (no EOS stop),
    a different seed each call."""
    counter = [seed]

    def step(conn):
        counter[0] += 1
        ids = conn.execute("SELECT llm_generate_ids(%s::int[], %s, 1.0, 50, 0.95, %s, -1, %s)",
                           (prompt, new_tokens, model, counter[0])).fetchone()[0]
        return len(ids)
    return step


def cancel_all(server, loopers):
    """Cancels whatever the loopers' connections are running (the end of a measurement)."""
    import psycopg
    try:
        with psycopg.connect(server.dsn, autocommit=True) as c:
            for lp in loopers:
                c.execute("SELECT pg_cancel_backend(%s)", (lp.pid,))
    except psycopg.Error as e:
        log(f"could not cancel: {e}")
