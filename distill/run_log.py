"""The run's own lines: Python logging to the console and OUTPUT_DIR/train.log, and the progress.

    console = start("info")        # train(): before the run says anything
    ...                            # lines reach the console; the file's copy waits in memory
    attach_file(path)              # rank 0, once the input has passed (with library.log)
    console.close()

- Our lines are records of the logger "distill" (LOGGER), at the level --log-level names
  (`warning` keeps only warnings and errors, on the console and in the file alike). They never
  propagate to the root logger: a program that configured logging itself does not print them twice.
- The console: ERROR and up go to stderr, the rest to stdout, one line each, as the prints before
  them did. The stream is looked up at every line, so a redirected sys.stdout (pytest's capsys,
  contextlib.redirect_stdout) gets them; tqdm.write keeps a live bar below them intact.
- train.log: what the console shows, with time and level, plus the libraries' warnings (distill/logs.py
  forwards its records of WARNING and up to the handler `attach_file` returns) and the progress
  lines. Before `attach_file` it is kept in memory, so a run stopped by bad input writes nothing.
- Progress: `progress()` is a tqdm bar when stdout and stderr are both terminals. Otherwise each
  set_postfix (the loop calls it every --logging-steps) is one plain line, formatted by tqdm:
  a log file full of carriage returns helps no one. For the same reason datasets' bars
  ("tokenizing train") are switched off while a run without a terminal lasts.
- The rank prefix (`[rank N]` on lines every rank prints) is the caller's: train.Logger adds it.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import sys
import time

LOGGER = "distill"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FILE_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
BUFFER_LINES = 10000
# A line's `extra`: {"console": False} keeps it out of the console (the file still gets it).
FILE_ONLY = {"console": False}

_active: RunLog | None = None


def logger() -> logging.Logger:
    return logging.getLogger(LOGGER)


def terminal() -> bool:
    """Whether a live bar can be drawn: both streams are terminals (either one redirected to a
    file would collect the bar's carriage returns)."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


class _Console(logging.Handler):
    def emit(self, record):
        if getattr(record, "console", True) is False:
            return
        try:
            from tqdm import tqdm

            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            # the line and its newline in one write: ranks sharing a pipe do not splice lines
            tqdm.write(self.format(record) + "\n", file=stream, end="")
            stream.flush()
        except Exception:  # a console that went away must not end the run (logging's own rule)
            self.handleError(record)


class _File(logging.Handler):
    """train.log: records kept in memory until `attach`, then appended to the file."""

    def __init__(self, level: int):
        super().__init__(level)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.buffer: collections.deque[str] = collections.deque(maxlen=BUFFER_LINES)
        self.file = None
        self.closed = False

    def emit(self, record):
        if self.closed:  # a later run's records (the demo runs several) are not this run's
            return
        try:
            line = self.format(record)
            if self.file is None:
                self.buffer.append(line)
            else:
                self.file.write(line + "\n")
                self.file.flush()
        except Exception:
            self.handleError(record)

    def attach(self, path: str) -> None:
        with self.lock:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")
            self.file.writelines(line + "\n" for line in self.buffer)
            self.file.flush()
            self.buffer.clear()

    def close(self):
        with self.lock:
            self.closed = True
            if self.file is not None:
                self.file.close()
                self.file = None
        super().close()


class RunLog:
    """The console and file handlers of one run on the "distill" logger. Made by start()."""

    def __init__(self, level: str):
        self.level = LEVELS[level]
        self.console = _Console(self.level)
        self.file = _File(self.level)
        self._bars_off = False

    def _start(self) -> None:
        log = logger()
        for handler in list(log.handlers):  # an earlier run's, left by a crash: never two consoles
            if isinstance(handler, (_Console, _File)):
                log.removeHandler(handler)
        log.setLevel(self.level)
        log.propagate = False
        log.addHandler(self.console)
        log.addHandler(self.file)
        if not terminal():
            import datasets

            if not datasets.is_progress_bar_enabled():
                return
            datasets.disable_progress_bars()
            self._bars_off = True

    def close(self) -> None:
        global _active
        log = logger()
        for handler in (self.console, self.file):
            log.removeHandler(handler)
            handler.close()
        if self._bars_off:
            import datasets

            datasets.enable_progress_bars()
            self._bars_off = False
        if _active is self:
            _active = None


def start(level: str = "info") -> RunLog:
    """The run log of this run (see the module docstring); an open one is closed first."""
    global _active
    if _active is not None:
        _active.close()
    _active = RunLog(level)
    _active._start()
    return _active


def attach_file(path: str) -> logging.Handler | None:
    """From now on the run's lines also go to `path` (the lines so far first). Returns the file's
    handler, for distill/logs.py to forward the libraries' warnings to; None without a run log."""
    if _active is None:
        return None
    _active.file.attach(path)
    return _active.file


class Progress:
    """The training loop's progress: a tqdm bar on a terminal, plain lines elsewhere. The same
    calls as tqdm's (update, set_postfix, a with-block); a line per set_postfix goes to the run
    log, on the console only where no bar is drawn."""

    def __init__(self, *, total: int, initial: int = 0, desc: str = "", disable: bool = False):
        from tqdm.auto import tqdm

        self.total, self.n, self.initial, self.desc, self.disable = total, initial, initial, desc, disable
        self.started = time.time()
        self.bar = (tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
                    if not disable and terminal() else None)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **figures) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**figures)
        if not self.disable:
            logger().info(self.line(figures), extra=None if self.bar is None else FILE_ONLY)

    def line(self, figures: dict) -> str:
        from tqdm import tqdm

        postfix = ", ".join(f"{k}={v}" for k, v in figures.items())
        line = tqdm.format_meter(self.n, self.total, time.time() - self.started, prefix=self.desc,
                                 postfix=postfix, unit="step", initial=self.initial,
                                 bar_format="{desc}: step {n_fmt}/{total_fmt} ({percentage:.0f}%) "
                                            "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        return re.sub(r" {2,}", " ", line)  # tqdm pads the rate for a bar's fixed width

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def progress(**kwargs) -> Progress:
    return Progress(**kwargs)
