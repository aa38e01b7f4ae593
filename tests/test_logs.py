"""distill.logs: library noise goes to the log file, not the console; the first-run compile notice.

The DeepSpeed messages are the real ones, emitted by a fresh interpreter: "Setting accelerator to
CPU" while deepspeed is imported, "... built successfully" by init_distributed (the op's load() is
stubbed so nothing is compiled), "Attempting to get learning rate ..." by a WarmupDecayLR.
"""
import json
import logging
import os
import subprocess
import sys

import pytest

from distill import logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATOR = "Setting accelerator to CPU"
BUILT = "deepspeed_shm_comm_op built successfully"
SCHEDULER = "Attempting to get learning rate from scheduler before it has started"

RUN = r"""
import os, sys, warnings
import torch
log_path = sys.argv[1]
from distill.logs import quiet_libraries
lib = quiet_libraries()
assert quiet_libraries() is lib  # a second call (main() run twice) adds nothing
import deepspeed
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder.load = lambda self, verbose=False: None  # build_shm_op still prints; nothing compiles
from distill.distributed import init_distributed
init_distributed()
from deepspeed.runtime.lr_schedules import WarmupDecayLR
WarmupDecayLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), total_num_steps=10)
import logging
logging.getLogger("DeepSpeed").error("a library error line")
warnings.warn_explicit("a library warning", UserWarning, torch.__file__, 1)
warnings.warn("our own warning")
print("our own line")
assert os.listdir(".") == [] and not os.path.exists(os.path.dirname(log_path)), "written before attach_file"
lib.attach_file(log_path)
lib.close()
"""


def _run(tmp_path, verbose: bool):
    cwd, log_path = tmp_path / "cwd", tmp_path / "out" / "library.log"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in (logs.VERBOSE_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="default")
    if verbose:
        env[logs.VERBOSE_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", RUN, str(log_path)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr, log_path.read_text()


def test_deepspeed_messages_reach_the_file_not_the_console(tmp_path):
    out, err, text = _run(tmp_path, verbose=False)
    for message in (ACCELERATOR, BUILT, SCHEDULER, "a library warning"):
        assert message not in out and message not in err, message
        assert text.count(message) == 1, message
    assert out == "our own line\n"
    # errors from a library still reach the console, once, on stderr
    assert err.count("a library error line") == 1 and "DeepSpeed ERROR: a library error line" in err
    assert "our own warning" in err and "our own warning" not in text
    assert "INFO [DeepSpeed] Initializing TorchBackend" in text  # DeepSpeed's INFO lines too


def test_verbose_switch_prints_library_lines_again(tmp_path):
    out, err, text = _run(tmp_path, verbose=True)
    for message in (ACCELERATOR, BUILT, SCHEDULER):
        assert out.count(message) == 1, message  # DeepSpeed's own stdout handler and print
        assert text.count(message) == 1, message  # and the file keeps its copy
    assert "a library warning" in err and "our own warning" in err


@pytest.fixture
def library_log(monkeypatch):
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    if logs.active() is not None:
        logs.active().close()
    lib = logs.quiet_libraries()
    yield lib
    lib.close()


def test_handlers_of_libraries_are_bypassed_not_stacked_and_given_back(library_log, capsys):
    assert logs.quiet_libraries() is library_log
    # torch's style: a child logger with its own console handler and no propagation
    child = logging.getLogger("torch.distributed.test_logs")
    own = logging.StreamHandler(sys.stdout)
    child.addHandler(own)
    child.propagate = False
    deepspeed_logger = logging.getLogger("DeepSpeed")
    try:
        deepspeed_logger.setLevel(logging.WARNING)  # what DeepSpeed does when imported
        deepspeed_logger.info("an info line")
        child.warning("a child warning")
        child.error("a child error")
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == "torch.distributed.test_logs ERROR: a child error\n"
        lines = library_log.lines()
        assert [ln.split(" ", 2)[2] for ln in lines[-3:]] == [
            "INFO [DeepSpeed] an info line", "WARNING [torch.distributed.test_logs] a child warning",
            "ERROR [torch.distributed.test_logs] a child error"]

        library_log.close()
        assert logging.Logger.callHandlers is logs._original_call_handlers
        assert deepspeed_logger.level == logging.WARNING and "setLevel" not in vars(deepspeed_logger)
        child.warning("after close")
        assert capsys.readouterr().out == "after close\n"
        again = logs.quiet_libraries()
        assert again is not library_log and logs.active() is again
        again.close()
    finally:
        child.removeHandler(own)


def test_attach_file_flushes_the_buffer_then_appends(library_log, tmp_path):
    logging.getLogger("transformers.test_logs").warning("before")
    path = tmp_path / "run" / "library.log"
    assert not path.parent.exists()
    library_log.attach_file(str(path))
    logging.getLogger("datasets.test_logs").warning("after")
    assert library_log.lines() == []
    text = path.read_text()
    assert text.index("[transformers.test_logs] before") < text.index("[datasets.test_logs] after")


def test_library_prints_become_log_lines(library_log, capsys):
    with logs.library_prints("deepspeed"):
        print("DeepSpeed op built successfully")
        print("a partial", end="")
    print("ours")
    assert capsys.readouterr().out == "ours\n"
    assert [ln.split(" ", 2)[2] for ln in library_log.lines()[-2:]] == [
        "INFO [deepspeed] DeepSpeed op built successfully", "INFO [deepspeed] a partial"]


def test_library_prints_without_a_library_log_print(capsys):
    if logs.active() is not None:
        logs.active().close()
    with logs.library_prints("deepspeed"):
        print("still printed")
    assert capsys.readouterr().out == "still printed\n"


# ---- the first-run compile notice --------------------------------------------------------------

@pytest.fixture
def nothing_loaded(monkeypatch):
    """No op loaded in this process or shipped prebuilt: only the build folder decides."""
    from deepspeed import git_version_info
    from deepspeed.ops.op_builder.builder import OpBuilder

    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    monkeypatch.setattr(git_version_info, "installed_ops", {})


def _fake_build(root, name, mtime=None):
    folder = root / name
    folder.mkdir()
    library = folder / (name + ".so")
    library.write_bytes(b"")
    if mtime is not None:
        os.utime(library, (mtime, mtime))


def test_notice_names_the_ops_an_empty_cache_will_build(tmp_path, monkeypatch, nothing_loaded):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    notice = logs.ops_build_notice()
    assert notice.startswith("first run on this machine: DeepSpeed is compiling its CPU ops")
    assert "deepspeed_shm_comm" in notice and "fused_adam" in notice and str(tmp_path) in notice
    assert "\n" not in notice
    assert os.listdir(tmp_path) == []  # nothing built, not even a folder made
    with open(os.path.join(ROOT, "ds_configs", "zero2_offload.json")) as fh:
        offload = logs.ops_build_notice(json.load(fh))
    assert "cpu_adam" in offload and "fused_adam" not in offload
    assert "fused_adam" not in logs.ops_build_notice({"optimizer": {"type": "SGD"}})


def test_notice_is_none_once_built_and_back_when_sources_are_newer(tmp_path, monkeypatch, nothing_loaded):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _fake_build(tmp_path, "deepspeed_shm_comm")
    _fake_build(tmp_path, "fused_adam", mtime=0)  # older than DeepSpeed's sources: ninja rebuilds
    notice = logs.ops_build_notice()
    assert "fused_adam" in notice and "deepspeed_shm_comm" not in notice
    os.utime(tmp_path / "fused_adam" / "fused_adam.so")
    assert logs.ops_build_notice() is None


def test_extensions_dir_is_torchs_build_folder(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch's default root follows it
    assert os.path.join(logs.extensions_dir(), "op") == _get_build_directory("op", verbose=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert os.path.join(logs.extensions_dir(), "op") == _get_build_directory("op", verbose=False)


def test_notice_is_none_with_this_machines_cache(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    for op in ("FusedAdamBuilder", "ShareMemCommBuilder"):
        builder = get_accelerator().create_op_builder(op)
        if not os.path.isfile(os.path.join(logs.extensions_dir(), builder.name, builder.name + ".so")):
            pytest.skip(f"DeepSpeed's {builder.name} op is not built on this machine yet")
    assert logs.ops_build_notice() is None
