"""SIGTERM (what a scheduler, ``timeout`` or ``docker stop`` sends) handled as SIGINT (Ctrl-C) is: both raise
``Interrupted`` in the main thread, so that every ``finally`` runs (the output folder's lock, its staging folder
and temporary files are removed; the last good checkpoint stays) and the command ends with one line naming the
signal and, for ``fod train``, the epoch kept and how to continue (``hint``)."""
from __future__ import annotations

import signal
from typing import Callable, Optional


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal (``name``: SIGINT or SIGTERM)."""

    def __init__(self, name: str = "SIGINT"):
        super().__init__(name)
        self.name = name


_hint: list[Optional[Callable[[], str]]] = [None]


def set_hint(fn: Optional[Callable[[], str]]):
    """What the interrupted command kept and how to continue, asked for when a signal ends it."""
    _hint[0] = fn


def _raise(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def install() -> dict:
    """Raise Interrupted on SIGTERM and SIGINT (main thread only; elsewhere this does nothing). Returns the
    previous handlers, for ``restore``."""
    set_hint(None)
    try:
        return {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        return {}


def restore(previous: dict):
    for s, handler in previous.items():
        signal.signal(s, handler)


def message(exc: KeyboardInterrupt, hint: bool = True) -> tuple[str, int]:
    """(the line after "fod COMMAND: ", the exit code: 128 + the signal's number) of an interruption; ``hint``:
    with what set_hint said."""
    name = exc.name if isinstance(exc, Interrupted) else "SIGINT"
    hint = _hint[0]() if hint and _hint[0] is not None else ""
    return f"interrupted ({name})" + (f" {hint}" if hint else ""), 128 + int(signal.Signals[name])
