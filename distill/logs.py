"""Library noise: what DeepSpeed, torch, transformers and datasets log goes to a file, not the console.

    lib = quiet_libraries()      # first thing in a run, before deepspeed is imported
    ...                          # check user input; nothing is written to disk yet
    lib.attach_file(path)        # buffered and later library lines go to `path`
    ...
    lib.close()

What `quiet_libraries()` does to records of the loggers in LIBRARY_LOGGERS and their children:
- They go to a handler of ours instead of the libraries' own console handlers (DeepSpeed's stdout
  one, torch's per-module stderr ones, transformers' and datasets' stderr ones), also those set up
  after this call: the switch is in Logger.callHandlers, which every record passes.
- Until `attach_file` the last BUFFER_LINES lines are kept in memory (so a run that stops on bad
  input writes nothing); then they, and every later record, go to the file.
- The library loggers' level is held at LIBRARY_LEVEL (INFO), so their INFO lines (DeepSpeed's
  config, transformers' loading steps) reach the file too: libraries set their own level when
  imported (DeepSpeed and transformers to WARNING). Not DEBUG: DeepSpeed's ZeRO-3 logs every
  parameter fetch and release at DEBUG (hundreds of lines per forward of a 4-layer toy teacher).
- Records of level ERROR and above still reach the console, one line each on stderr: an error
  from a library is something the user has to see.
- Records of WARNING and up are also handed to `forward`, when set: the run's train.log.
Python warnings raised from inside these libraries' files go to the same log. Warnings that a
library attributes to our own files (stacklevel), and everything our code prints, are untouched.

Bare print()s: DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
successfully" from deepspeed.comm.torch.build_shm_op in every init_distributed, cached or not.
`library_prints("deepspeed")` around that one call sends what is printed there to the log.
Compiling an op (the first run on a machine) prints nothing: torch runs ninja with its output
captured unless verbose, and puts it in the exception if the build fails.

SEQ2SEQ_DISTILL_VERBOSE=1 (or true/yes/on) shows everything again: libraries print to the console
as they would without us, no level is changed, prints inside `library_prints` reach stdout; the file still
gets a copy of what the libraries log.

`ops_build_notice()` says, before DeepSpeed starts compiling its C++ ops (a minute or two each,
once per machine), that it is about to, so the silent first run is explained.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import os
import sys
import warnings
from typing import Any

from distill.kernel_ops import env_flag

# The loggers (with their children) libraries log to. "DeepSpeed" is the logger
# deepspeed.utils.logging creates on import (its own stdout StreamHandler, level WARNING); a few
# deepspeed modules use logging.getLogger(__name__), hence "deepspeed" too.
LIBRARY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "torch.utils.cpp_extension",
                   "transformers", "datasets", "huggingface_hub", "accelerate")
# Python warnings whose file lies in one of these packages go to the log.
WARNING_PACKAGES = ("deepspeed", "torch", "transformers", "datasets", "huggingface_hub", "accelerate")
VERBOSE_ENV = "SEQ2SEQ_DISTILL_VERBOSE"
LIBRARY_LEVEL = logging.INFO
CONSOLE_LEVEL = logging.ERROR
BUFFER_LINES = 10000
FILE_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"

_active: LibraryLog | None = None
_original_call_handlers = logging.Logger.callHandlers


def verbose_requested() -> bool:
    return env_flag(VERBOSE_ENV)


class _Router(logging.Handler):
    """Every record to the buffer or file; ERROR and up also to stderr (not in verbose mode, where
    the library's own handlers print)."""

    def __init__(self, log: LibraryLog):
        super().__init__(logging.DEBUG)
        self.log = log
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.console = logging.Formatter("%(name)s %(levelname)s: %(message)s")

    def emit(self, record):
        try:
            self.log._write(self.format(record))
            if self.log.forward is not None and record.levelno >= logging.WARNING:
                self.log.forward.handle(record)  # the run's train.log (distill/run_log.py)
            if not self.log.verbose and record.levelno >= CONSOLE_LEVEL:
                print(self.console.format(record), file=sys.stderr, flush=True)
        except Exception:  # a logging failure must not end the run (logging's own rule)
            self.handleError(record)


class _LineWriter(io.TextIOBase):
    """A stdout stand-in: each printed line becomes an INFO record of `source` in the log."""

    def __init__(self, log: LibraryLog, source: str, echo):
        self.log, self.source, self.echo, self.pending = log, source, echo, ""

    def writable(self):
        return True

    def write(self, text):
        if self.echo is not None:
            self.echo.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._record(line)
        return len(text)

    def flush(self):
        if self.echo is not None:
            self.echo.flush()

    def finish(self):
        if self.pending:
            self._record(self.pending)
            self.pending = ""

    def _record(self, line):
        if line.strip():
            record = logging.LogRecord(self.source, logging.INFO, "print", 0, line, None, None)
            self.log.handler.handle(record)


class LibraryLog:
    """The library log of this process. Made by quiet_libraries(); see the module docstring."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.handler = _Router(self)
        self.buffer: collections.deque[str] = collections.deque(maxlen=BUFFER_LINES)
        self.dropped = 0
        self.path: str | None = None
        self._file = None
        self._saved: dict[str, int] = {}
        self._asked_level: dict[str, int] = {}
        self._showwarning = None
        self._hf_bars = False  # whether transformers showed its progress bars before _start
        self.forward: logging.Handler | None = None  # gets the records of WARNING and up too
        self.closed = False

    # ---- records -----------------------------------------------------------------------------
    def _write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            if len(self.buffer) == self.buffer.maxlen:
                self.dropped += 1
            self.buffer.append(line)

    def lines(self) -> list[str]:
        """The buffered lines (those not yet in a file)."""
        return list(self.buffer)

    def attach_file(self, path: str) -> None:
        """From now on library lines go to `path` (appended), the buffered ones first."""
        if self.closed:
            raise RuntimeError("LibraryLog is closed; call quiet_libraries() again")
        with self.handler.lock:
            if self._file is not None:
                self._file.close()
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")
            self.path = path
            if self.dropped:
                self._file.write(f"({self.dropped} earlier library lines dropped: the buffer keeps "
                                 f"the last {BUFFER_LINES})\n")
            self._file.writelines(line + "\n" for line in self.buffer)
            self._file.flush()
            self.buffer.clear()
            self.dropped = 0

    # ---- taking over the library loggers -----------------------------------------------------
    def _start(self) -> None:
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = logger.level
            if self.verbose:
                continue
            logger.setLevel(LIBRARY_LEVEL)
            # An instance attribute shadows Logger.setLevel: a library that sets its level later
            # (DeepSpeed and transformers do on import) leaves it at LIBRARY_LEVEL; close()
            # deletes the attribute and sets the level the library last asked for.
            logger.setLevel = functools.partial(self._asked_level.__setitem__, name)
        logging.Logger.callHandlers = _call_handlers
        # transformers' own progress bars ("Loading weights", "Writing model shards") say nothing
        # the log lines around them do not; ours (training, tokenizing, generating) stay.
        from transformers.utils import logging as hf_logging

        self._hf_bars = hf_logging.is_progress_bar_enabled()
        if not self.verbose:
            hf_logging.disable_progress_bar()
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        self._warning_dirs = _package_dirs(WARNING_PACKAGES)

    def _handle(self, logger: logging.Logger, record: logging.LogRecord) -> None:
        """Logger.callHandlers while this log is open: library records come here first."""
        if _is_library(record.name):
            self.handler.handle(record)
            if not self.verbose:
                return
        _original_call_handlers(logger, record)

    def _warning(self, message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(self._warning_dirs):
            return self._showwarning(message, category, filename, lineno, file, line)
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        self.handler.handle(logging.LogRecord("py.warnings", logging.WARNING, filename, lineno, text, None, None))
        if self.verbose:
            self._showwarning(message, category, filename, lineno, file, line)

    def close(self) -> None:
        """Give the loggers, warnings and console back to the libraries; close the file."""
        global _active
        if self.closed:
            return
        if logging.Logger.callHandlers is _call_handlers:
            logging.Logger.callHandlers = _original_call_handlers
        if warnings.showwarning == self._warning:
            warnings.showwarning = self._showwarning
        if self._hf_bars:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        for name, level in self._saved.items():
            logger = logging.getLogger(name)
            if logger.__dict__.pop("setLevel", None) is not None:
                logger.setLevel(self._asked_level.get(name, level))
        with self.handler.lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self.closed = True
        if _active is self:
            _active = None


def _call_handlers(logger: logging.Logger, record: logging.LogRecord) -> None:
    # Logger.handle calls this once per record, on the logger the record was made on, before any
    # handler of that logger or its parents: the one place where every library record passes,
    # whatever handlers and propagation the libraries set up (torch gives many of its loggers
    # their own stderr handler and no propagation).
    if _active is not None:
        _active._handle(logger, record)
    else:
        _original_call_handlers(logger, record)


@functools.lru_cache(maxsize=None)
def _is_library(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in LIBRARY_LOGGERS)


def _package_dirs(names) -> tuple[str, ...]:
    """Install folders of the named top-level packages, found without importing them."""
    import importlib.util

    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.abspath(location), ""))
    return tuple(dirs)


def quiet_libraries() -> LibraryLog:
    """Route the libraries' logs into the library log of this process (see the module docstring).

    Call it before deepspeed is imported: DeepSpeed logs "Setting accelerator to CPU" while it is
    imported. Calling it again while the log is open returns the same LibraryLog.
    """
    global _active
    if _active is None:
        _active = LibraryLog(verbose_requested())
        _active._start()
    return _active


def active() -> LibraryLog | None:
    return _active


@contextlib.contextmanager
def library_prints(source: str):
    """Lines print()ed to stdout inside the block go to the library log as records of `source`.

    Only for a call into a library that prints (DeepSpeed's init_distributed); our own output never
    runs inside it. Without an open library log the block runs unchanged; in verbose mode the lines
    reach stdout as well.
    """
    log = _active
    if log is None:
        yield
        return
    writer = _LineWriter(log, source, sys.stdout if log.verbose else None)
    try:
        with contextlib.redirect_stdout(writer):
            yield
    finally:
        writer.finish()


# ---- the first-run compile notice ---------------------------------------------------------------

def ops_build_notice(ds_config: dict[str, Any] | None = None) -> str | None:
    """One line to print before DeepSpeed compiles ops that are not yet cached, else None.

    The ops are those a run builds: the communication op deepspeed.init_distributed loads
    (ShareMemCommBuilder, as deepspeed.comm.torch.build_shm_op does) and the optimizer op the
    student engine builds for `ds_config` (FusedAdam, or CPUAdam with offload_optimizer; None
    means Adam/AdamW without offload, as ds_configs/zero2.json). Nothing is compiled here: an op
    counts as cached when DeepSpeed already loaded it in this process, ships it prebuilt, or its
    library file in torch's build folder is newer than its sources (ninja's test; a rebuild ninja
    starts for other reasons, such as changed compiler flags, goes unannounced).
    It imports deepspeed: call it after quiet_libraries().
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    builders = []
    comm = acc.create_op_builder("ShareMemCommBuilder")
    if comm is not None and deepspeed.ops.__compatible_ops__.get(comm.NAME, False):
        builders.append(comm)
    optimizer = _optimizer_builder(ds_config)
    if optimizer is not None:
        builder = acc.create_op_builder(optimizer)
        if builder is not None:
            builders.append(builder)
    missing = [b for b in builders if not op_is_cached(b)]
    if not missing:
        return None
    ops = ", ".join(b.name for b in missing)
    return (f"first run on this machine: DeepSpeed is compiling its {acc.device_name().upper()} ops ({ops}); this "
            f"takes a minute or two each, once (cached in {extensions_dir()})")


def _optimizer_builder(ds_config: dict[str, Any] | None) -> str | None:
    conf = ds_config if ds_config is not None else {"optimizer": {"type": "AdamW"}}
    optimizer = conf.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return None  # other optimizers: not announced
    if (optimizer.get("params") or {}).get("torch_adam"):
        return None  # plain torch.optim.Adam(W): nothing to build
    offload = (conf.get("zero_optimization") or {}).get("offload_optimizer") or {}
    # DeepSpeed's engine: ZeRO-Offload (cpu or nvme) uses DeepSpeedCPUAdam, otherwise FusedAdam.
    return "CPUAdamBuilder" if offload.get("device") in ("cpu", "nvme") else "FusedAdamBuilder"


def extensions_dir() -> str:
    """The folder torch.utils.cpp_extension builds JIT ops in (its _get_build_directory, minus the
    folder it creates): $TORCH_EXTENSIONS_DIR as given, else ~/.cache/torch_extensions/py311_cpu style."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return root
    if torch.version.hip is not None:
        device = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        device = "cu" + torch.version.cuda.replace(".", "")
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{device}")


def op_is_cached(builder) -> bool:
    """Whether builder.load() would find the op without compiling it (see ops_build_notice)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from torch.utils.cpp_extension import LIB_EXT

    if builder.name in builder._loaded_ops:
        return True
    if installed_ops.get(builder.name, False) and accelerator_name == get_accelerator()._name:
        return True
    library = os.path.join(extensions_dir(), builder.name, builder.name + LIB_EXT)
    if not os.path.isfile(library):
        return False
    built = os.path.getmtime(library)
    sources = [builder.deepspeed_src_path(s) for s in builder.sources()]
    return all(os.path.getmtime(s) <= built for s in sources if os.path.isfile(s))
