"""A graceful stop for long runs: Ctrl-C or SIGTERM asks the loop to finish its step and save; a
second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class StopRequest:
    """Set by SIGINT/SIGTERM while `installed()` is active; the loop polls `requested`."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested = False
        self._say = say

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._say(f"{signal.Signals(signum).name}: finishing this step, writing a checkpoint, then stopping "
                  "(Ctrl-C again to abort without one)")

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals inside the block (only the main thread can; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
