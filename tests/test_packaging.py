"""This project installs next to Hugging Face's `kernels` package, and both keep working.

The repository's kernels/ folder installs as `seq2seq_distill_kernels` (setup.py), so the
top-level name `kernels` stays Hugging Face's, which transformers imports for its hub kernels.
Run from the repository root, the folder is `kernels` and hides that package; it then serves
that package's names too (kernels/__init__.py). Each case runs in a fresh interpreter.

PyPI as this project reaches it serves Hugging Face's `kernels` up to HF_KERNELS, below
transformers' KERNELS_MIN_VERSION, and transformers takes its hub-kernels path (importing
get_kernel, kernelize, ... from `kernels`) only for a version in its range. So the copy these
tests install says it is KERNELS_MIN_VERSION in its metadata: everything transformers imports
from it exists in HF_KERNELS already. With a pin inside the range that step does nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
HF_KERNELS = "0.17.2"  # .ci/run installs the same release
OURS = "seq2seq_distill_kernels"


def _pip(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
                          capture_output=True, text=True, cwd=cwd)


def _claim_compatible_version(site: Path) -> None:
    """Make the installed kernels' metadata say a version transformers takes (see the docstring)."""
    from transformers.utils.import_utils import KERNELS_MIN_VERSION

    (info,) = site.glob("kernels-*.dist-info")
    if Version(HF_KERNELS) >= Version(KERNELS_MIN_VERSION):
        return
    meta = info / "METADATA"
    text = meta.read_text(encoding="utf-8")
    assert f"\nVersion: {HF_KERNELS}\n" in text
    meta.write_text(text.replace(f"\nVersion: {HF_KERNELS}\n", f"\nVersion: {KERNELS_MIN_VERSION}\n", 1),
                    encoding="utf-8")


@pytest.fixture(scope="module")
def hf_site(tmp_path_factory):
    """A folder holding Hugging Face's kernels (only it: its dependencies are installed or unused)."""
    site = tmp_path_factory.mktemp("hf_site")
    proc = _pip("install", "--no-deps", "--target", str(site), f"kernels=={HF_KERNELS}")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        # only an unreachable index skips; a pin PyPI does not have is a failure
        if any(s in proc.stderr for s in ("NewConnectionError", "Network is unreachable", "Max retries exceeded",
                                          "Temporary failure in name resolution", "ConnectTimeout")):
            pytest.skip(f"pip cannot fetch kernels=={HF_KERNELS} from PyPI: {last}")
        pytest.fail(f"pip install kernels=={HF_KERNELS} failed: {last}")
    _claim_compatible_version(site)
    return site


@pytest.fixture(scope="module")
def our_site(tmp_path_factory):
    """This project installed normally (`pip install .`, no dependencies) into a folder of its own.
    It is built from a copy of the sources so that the build leaves nothing in the repository."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(ROOT / "setup.py", src / "setup.py")
    for folder in ("distill", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path_factory.mktemp("our_site")
    proc = _pip("install", "--no-deps", "--no-build-isolation", "--target", str(site), str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return site


def _run(code: str, cwd, pythonpath=()):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "SEQ2SEQ_DISTILL_TRITON")}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# Shared by the cases: transformers' view of `kernels`, a model that loads and generates, our loss.
CHECKS = """
import inspect, math, torch
import transformers
from transformers.utils.import_utils import is_kernels_available

def hub_kernels_ok(hf_folder):
    # transformers imports its hub functions from `kernels` when modeling_utils loads
    import transformers.integrations.hub_kernels as hub
    assert is_kernels_available()
    for fn in (hub.get_kernel_hub, hub.register_kernel_mapping, hub.LayerRepository):
        assert inspect.getfile(fn).startswith(hf_folder), inspect.getfile(fn)

def model_runs():
    # what a distillation run does with transformers: load BART and T5 classes, generate
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    for cls, cfg in ((BartForConditionalGeneration, BartConfig(vocab_size=64, d_model=16, encoder_layers=1,
                      decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, max_position_embeddings=32)),
                     (T5ForConditionalGeneration, T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, decoder_start_token_id=0))):
        out = cls(cfg).eval().generate(torch.tensor([[5, 6, 7, 2]]), max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 1

def loss_ok(fused_linear_distill_loss):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g)
    th, tw = torch.randn(6, 4, generator=g), torch.randn(40, 4, generator=g)
    lab = torch.tensor([1, 2, -100, 3, 4, 5])
    loss = fused_linear_distill_loss(h, w, lab, teacher_hidden=th, teacher_weight=tw, temperature=2.0)[0]
    loss.backward()
    assert math.isfinite(loss.item()) and h.grad is not None
    return loss.item()
"""


def test_installed_next_to_hf_kernels(our_site, hf_site, tmp_path):
    """pip install . next to Hugging Face's kernels, used from outside the repository."""
    out = _run(CHECKS + f"""
import kernels, distill, {OURS}
assert kernels.__file__.startswith({str(hf_site)!r}), kernels.__file__
assert callable(kernels.get_kernel) and not hasattr(kernels, "fused_linear_distill_loss")
assert {OURS}.__file__.startswith({str(our_site)!r}) and distill.__file__.startswith({str(our_site)!r})
assert {OURS}.native.status() == "native"
hub_kernels_ok({str(hf_site)!r})
model_runs()
expected = loss_ok({OURS}.fused_linear_distill_loss)

from distill.kernel_ops import kernels as used
assert used is {OURS}
from distill.objective import Objective
g = torch.Generator().manual_seed(0)
h, w = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(40, 8, generator=g)
th, tw = torch.randn(6, 4, generator=g), torch.randn(40, 4, generator=g)
lab = torch.tensor([1, 2, -100, 3, 4, 5])
loss = Objective(0.5, 2.0, "fused")(h, (w, None), lab, th, (tw, None))[0]
assert abs(loss.item() - expected) < 1e-6, (loss.item(), expected)
print("ok")
""", cwd=tmp_path, pythonpath=[our_site, hf_site])
    assert out.strip().endswith("ok")


def test_repository_root_with_hf_kernels(hf_site):
    """From the repository root (python main.py, pytest, launch.sh) the folder is `kernels` and
    hides Hugging Face's; the documented import and transformers' hub kernels both work."""
    out = _run(CHECKS + f"""
# as in python main.py: transformers imports `kernels` first (distill never does), finding the folder
hub_kernels_ok({str(hf_site)!r})
model_runs()
import kernels
from kernels import fused_linear_distill_loss  # README: the documented import
assert kernels.__file__ == {str(ROOT / "kernels" / "__init__.py")!r}, kernels.__file__
assert kernels.__path__ == [{str(ROOT / "kernels")!r}, {str(hf_site / "kernels")!r}]
assert callable(kernels.get_kernel) and kernels.__version__ == transformers.utils.import_utils.KERNELS_MIN_VERSION
import kernels.layer.mode  # its submodules import as kernels.*
loss_ok(fused_linear_distill_loss)
from distill.kernel_ops import kernels as used
assert used.__name__ == {OURS!r} and used is not kernels
print("ok")
""", cwd=ROOT, pythonpath=[hf_site])
    assert out.strip().endswith("ok")


def test_repository_root_without_hf_kernels():
    """Without Hugging Face's kernels (its metadata hidden here, in case the environment has it)
    the folder is plain `kernels`; transformers finds no hub kernels and loads models as usual."""
    out = _run(CHECKS + f"""
import importlib.metadata as md
_real = md.distribution
def _distribution(name):
    if name == "kernels":
        raise md.PackageNotFoundError(name)
    return _real(name)
md.distribution = _distribution

import kernels
from kernels import fused_linear_distill_loss
assert kernels.__path__ == [{str(ROOT / "kernels")!r}]
assert not is_kernels_available() and not hasattr(kernels, "get_kernel")
model_runs()
loss_ok(fused_linear_distill_loss)
print("ok")
""", cwd=ROOT)
    assert out.strip().endswith("ok")


def test_editable_install_exposes_only_the_unique_name(tmp_path):
    """`pip install -e .` (how CI and the README install) maps seq2seq_distill_kernels to the
    folder and leaves the top-level `kernels` to whatever else is installed."""
    # from outside the repository, where its seq2seq_distill.egg-info is not on sys.path
    out = json.loads(_run(f"""
import importlib.metadata as md, importlib.util as u, json
try:
    direct = json.loads(md.distribution("seq2seq-distill").read_text("direct_url.json") or "{{}}")
except md.PackageNotFoundError:
    direct = {{}}
ours, theirs = u.find_spec({OURS!r}), u.find_spec("kernels")
print(json.dumps(dict(editable=direct.get("dir_info", {{}}).get("editable", False), url=direct.get("url"),
                      ours=ours and ours.origin, kernels=theirs and theirs.origin)))
""", cwd=tmp_path))
    if not out["editable"] or out["url"] != ROOT.as_uri():
        pytest.skip(f"this checkout is not the project installed with pip install -e . here ({out}); CI installs it so")
    assert out["ours"] == str(ROOT / "kernels" / "__init__.py")
    assert out["kernels"] != str(ROOT / "kernels" / "__init__.py")


def test_checkout_without_install_loads_the_folder_under_the_unique_name(tmp_path):
    """distill/kernel_ops.py in a checkout that is not installed: the sibling folder, one copy."""
    code = f"""
import sys
class _NotInstalled:  # hides the editable install of this project, if any
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == {OURS!r}:
            raise ModuleNotFoundError("no module named " + name, name=name)
        return None
sys.meta_path.insert(0, _NotInstalled)
sys.path.insert(0, {str(ROOT)!r})
from distill.kernel_ops import kernels, env_flag
assert kernels.__name__ == {OURS!r} and sys.modules[{OURS!r}] is kernels
assert kernels.__file__ == {str(ROOT / "kernels" / "__init__.py")!r}
assert "torch" not in sys.modules  # the switches and the package itself import no torch
assert kernels.rowsteps.__name__ == {OURS!r} + ".rowsteps" and kernels.native.status() == "native"
print("ok")
"""
    assert _run(code, cwd=tmp_path).strip() == "ok"
