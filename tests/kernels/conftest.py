"""Every kernel test runs twice: on the native CPU row step and on the eager torch path."""
import pytest

from kernels import native


@pytest.fixture(autouse=True, params=["native", "eager"])
def backend(request, monkeypatch):
    if request.param == "eager":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    else:
        monkeypatch.delenv(native.ENV_SWITCH, raising=False)
        # CI has a C compiler (DeepSpeed's CPU ops need one too): a native kernel that does not
        # build is a failure here, not a silent fallback.
        assert native.status() == "native", native.status()
    return request.param
