"""`timeout(seconds)`: asyncio.timeout where Python has it (3.11+), and on 3.10 the
same contract: the block is cancelled at the deadline, which leaves it as a
TimeoutError (an OSError, as on 3.11, and an asyncio.TimeoutError)."""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import Any

if sys.version_info >= (3, 11):  # pragma: no cover - one branch per Python
    timeout: Any = asyncio.timeout
else:  # pragma: no cover

    class DeadlineError(TimeoutError, asyncio.TimeoutError):
        """Python 3.10 keeps the two TimeoutErrors apart; 3.11 made them one."""

    class timeout:
        """asyncio.timeout's contract on 3.10: at the deadline the task is cancelled
        and the cancellation leaves the block as a TimeoutError. A cancellation
        from outside (the deadline not reached) stays a cancellation."""

        def __init__(self, delay: float | None) -> None:
            self._delay = delay
            self._handle: asyncio.TimerHandle | None = None
            self._task: asyncio.Task[Any] | None = None
            self._expired = False

        async def __aenter__(self) -> timeout:
            if self._delay is not None:
                self._task = asyncio.current_task()
                self._handle = asyncio.get_running_loop().call_later(self._delay, self._expire)
            return self

        def _expire(self) -> None:
            assert self._task is not None
            self._expired = self._task.cancel()

        async def __aexit__(
            self,
            kind: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
        ) -> None:
            if self._handle is not None:
                self._handle.cancel()
            if self._expired and kind is asyncio.CancelledError:
                raise DeadlineError("the deadline passed") from exc
