"""Every kernel test runs three times: on the native CPU row step, on the eager torch path, and
on the Triton row step under Triton's interpreter (the CUDA kernel's logic, run on the CPU)."""
import importlib.util
import os
import sys

import pytest

from kernels import native, rowsteps


def _import_triton_interpreted():
    """Triton decides when triton.language is first imported whether its own jit functions
    (tl.zeros, ...) run under the interpreter, and libraries import it early (torch.profiler
    through dynamo; trl through transformers, at the collection of test_kernels_trl.py). So it
    is imported here first, with TRITON_INTERPRET=1, before any test module: the Triton
    backend's tests then interpret whatever imported triton before them. Nothing in these
    CPU tests runs triton otherwise."""
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_interpreted()


@pytest.fixture(autouse=True, params=["native", "eager", "triton"])
def backend(request, monkeypatch):
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.delenv(rowsteps.TRITON_SWITCH, raising=False)
    if request.param == "eager":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    elif request.param == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed (CI installs it: .ci/run)")
        # read when the kernel is defined, i.e. at the first import of kernels.triton_rowstep
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv(rowsteps.TRITON_SWITCH, "1")
        # numpy (the interpreter) warns where a GPU silently gives -inf: the padded lanes'
        # sentinel times 1/T overflows, and exp(-inf) = 0 is what the kernel wants.
        import numpy as np

        old = np.seterr(over="ignore")
        request.addfinalizer(lambda: np.seterr(**old))
    import torch

    want = {"native": "native", "eager": "eager (SEQ2SEQ_DISTILL_NATIVE=0)", "triton": "triton (interpreted)"}
    # CI has a C compiler (DeepSpeed's CPU ops need one too) and triton: a row step that does
    # not load is a failure here, not a silent fallback.
    assert rowsteps.describe(torch.device("cpu")) == want[request.param]
    return request.param
