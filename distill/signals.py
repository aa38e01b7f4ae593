"""SIGTERM and Ctrl-C in every phase of a run: stop soon, say where, leave nothing half-written.

Two modes, one at a time:
- outside the training loop (data loading, tokenisation, teacher loading, the final eval, the
  export, the report), a signal raises `Interrupted` in the main thread at once: nothing there
  needs a step boundary, and the run must not go on for minutes after a SIGTERM;
- inside the loop, the engine installs its own handler that only sets a flag, and saves a
  checkpoint at the next step boundary, where every rank's state is consistent
  (engine.Distiller.install_signal_handlers); `Signals.resume()` puts the raising handler back
  after the loop.
A launcher (deepspeed, torchrun) forwards the signal to every rank, so every rank raises.
"""
from __future__ import annotations

import signal
import threading

# The shell's convention: 128 + the signal's number.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A signal arrived outside the training loop; `phase` says what the run was doing."""

    def __init__(self, signum: int, phase: str):
        super().__init__(f"{signal.Signals(signum).name} while {phase}")
        self.signum, self.phase = signum, phase

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + self.signum)


class Signals:
    """The raising handlers for one run; `enter(...)` names what the run is doing."""

    def __init__(self):
        self.current = "starting"
        self._saved: dict[int, object] = {}
        # signal.signal only works in the main thread; elsewhere (a caller's worker thread) the
        # caller's own handling stays in charge.
        self.active = threading.current_thread() is threading.main_thread()

    def _raise(self, signum, _frame):
        raise Interrupted(signum, self.current)

    def install(self) -> "Signals":
        if self.active:
            for sig in _SIGNALS:
                self._saved.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._raise)
        return self

    resume = install  # after the loop, whose flag handler replaced ours

    def restore(self) -> None:
        """The handlers that were there before `install` (a caller such as the demo keeps its own)."""
        if self.active:
            for sig, old in self._saved.items():
                signal.signal(sig, old)
            self._saved.clear()

    def enter(self, text: str, key: str | None = None) -> None:
        """Name the phase from here on; `key` (faults.PHASES) lets a test signal the run there."""
        import os

        from distill import faults

        self.current = text
        if key is not None:
            rank = int(os.environ.get("RANK") or 0)
            faults.at("phase", step=rank, rank=rank, path=key)  # tests only
