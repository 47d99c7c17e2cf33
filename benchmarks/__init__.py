"""The benchmark suite (`python -m benchmarks`). With CACHED_ASIDE_BENCH_NO_HIREDIS=1
set, hiredis is hidden before redis-py is imported, so redis-py parses with its own
RESP reader: the "without hiredis" cell, in a shared environment that has hiredis.
"""

import os
import sys

NO_HIREDIS = "CACHED_ASIDE_BENCH_NO_HIREDIS"

if os.environ.get(NO_HIREDIS) == "1":
    # A None entry makes `import hiredis` raise ImportError, as if it were not installed.
    sys.modules["hiredis"] = None  # type: ignore[assignment]
