"""What differs between the redis-py and msgpack releases cached_aside supports,
decided once (not per call), and the one warning when the hit path cannot run at
full speed on what is installed. No I/O here."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import redis

# The redis-py these paths are checked on (noxfile.py's cells), and what to install.
REDIS_PY_ADVICE = "pip install 'redis>=5.0.8'"
logger = logging.getLogger("cached_aside")


def _connected(connection: Any) -> bool:
    """redis-py 8's `is_connected`; before it (5.x to 7.x) a sync connection has
    only its socket, None when closed."""
    return bool(connection._sock is not None)


def _is_connected(connection: Any) -> bool:
    return bool(connection.is_connected)


def connection_open_test(kind: Any) -> Any:
    """How to tell a sync connection of this class is open, on this redis-py."""
    return _is_connected if hasattr(kind, "is_connected") else _connected


def connection_getter(pool: Any) -> tuple[Any, ...]:
    """What `pool.get_connection` takes: redis-py before 5.3 requires a command name
    (any: a pool ignores it), 5.3 and later deprecate passing one."""
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    required = parameter is not None and parameter.default is inspect.Parameter.empty
    return ("_",) if required else ()


def held_path_problem(connection_class: Any = None) -> str | None:
    """Why the held-connection path cannot run on this redis-py (None: it runs).
    Checked once per pool; a reason is logged once per process."""
    needed = ("pack_command", "send_packed_command", "read_response", "connect", "disconnect")
    kind = connection_class or redis.Connection
    missing = [name for name in needed if not hasattr(kind, name)]
    # Before redis-py 8 a sync connection tells it is open only by its `_sock`.
    if not hasattr(kind, "is_connected") and not issubclass(
        kind, redis.connection.AbstractConnection
    ):
        missing.append("is_connected")
    if missing:
        return (
            f"redis-py {redis.__version__}: {kind.__name__} has no {', '.join(missing)}; "
            f"every call takes the client's slower path ({REDIS_PY_ADVICE})"
        )
    return None


def msgpack_problem() -> str | None:
    """Why every hit decodes slowly (None: msgpack's compiled extension is in use).
    Without a wheel for this Python, pip builds msgpack from source, and when the
    build fails it installs the pure-Python fallback without a word."""
    import msgpack

    if msgpack.Packer.__module__ == "msgpack.fallback":
        version = ".".join(map(str, msgpack.version))
        return (
            f"msgpack {version} is its pure-Python fallback (no compiled wheel for this "
            "Python): every hit decodes slower (pip install --force-reinstall 'msgpack>=1.1')"
        )
    return None


_warned: set[str] = set()


def warn_once(problem: str, what: str = "the held-connection hot path is off") -> None:
    if problem not in _warned:
        _warned.add(problem)
        logger.warning("%s: %s", what, problem)


def check_codec() -> None:
    problem = msgpack_problem()
    if problem is not None:
        warn_once(problem, "the hit path is slower")
