"""Preemption notices (SIGTERM, SIGUSR1): remembered, acted on at the next step boundary.

Installed as early as possible by the command line, because a scheduler may signal a rank that is
still importing torch, and the default action would kill it without a checkpoint.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: int | None = None


def _handle(signum, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handle)


def received() -> int | None:
    return _received


def reset() -> None:
    global _received
    _received = None
