"""The native row step against the eager torch chunk step, its switch and its fallback."""
import os
import subprocess
import sys

import pytest
import torch

from kernels import chunked_kl_div, env_flag, fused_linear_distill_loss, native
from kernels._core import chunk_grad, chunk_step


def test_native_kernel_builds_here():
    # CI has a C compiler (DeepSpeed's CPU ops need one too): a kernel that does not build is
    # a failure, not a silent fallback.
    assert native.status() == "native"


def _blocks(seed, r=7, v=2053, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(r, v, generator=g) * scale
    t = torch.randn(r, v, generator=g) * scale
    lab = torch.randint(0, v, (r, 1), generator=g)
    mask = (torch.rand(r, 1, generator=g) > 0.3).float()
    return s, t, lab, mask


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("inv_t", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("with_labels, with_teacher", [(True, True), (False, True), (True, False)])
def test_rowstep_matches_eager_chunk_step(inv_t, with_labels, with_teacher, divergence, beta):
    if not with_teacher and divergence != "forward_kl":
        pytest.skip("without a teacher there is no divergence (the losses pass forward_kl)")
    s, t, lab, mask = _blocks(int(inv_t * 8) + 2 * with_labels + with_teacher)
    labels = lab if with_labels else None
    c_ce, c_kl = (0.3, 0.7) if with_labels else (0.0, 0.7)
    if not with_teacher:
        c_kl = 0.0
    # eager reference: no teacher means teacher := student (KL 0), as the fused loss does
    s_e, t_e = s.clone(), (t if with_teacher else s).clone()
    u = torch.empty_like(s)
    st = chunk_step(s_e, t_e, u, inv_t, labels=labels, divergence=divergence, beta=beta)
    g_e = chunk_grad(s_e, u, st, mask, c_ce, c_kl, labels=labels)
    s_n, t_n = s.clone(), t.clone() if with_teacher else None
    ce, kl = native.rowstep(native.get(), s_n, t_n, labels, mask, inv_t, c_ce, c_kl, True, divergence, beta)
    assert torch.allclose(kl, st["kl"].view(-1), atol=2e-5, rtol=1e-5)
    if with_labels:
        assert torch.allclose(ce, st["ce"].view(-1), atol=2e-5, rtol=1e-5)
    scale = g_e.abs().max()
    assert float((s_n - g_e).abs().max() / scale) < 1e-5
    assert torch.all(s_n[mask.view(-1) == 0] == 0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_no_grad_gives_the_same_values(divergence):
    s, t, lab, mask = _blocks(5)
    before = s.clone()
    s2 = s.clone()
    ce, kl = native.rowstep(native.get(), s2, t.clone(), lab, mask, 0.5, 0.5, 0.5, False, divergence)
    ce_g, kl_g = native.rowstep(native.get(), s.clone(), t.clone(), lab, mask, 0.5, 0.5, 0.5, True, divergence)
    assert torch.equal(ce, ce_g) and torch.equal(kl, kl_g)
    assert not torch.equal(s2, before)  # overwritten with exponentials, not a gradient
    assert torch.isfinite(s2).all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extreme_logits_stay_finite(divergence):
    s, t, lab, mask = _blocks(6, scale=1.0)
    s[:, ::3] = 1e4
    t[:, 1::3] = -1e4
    ce, kl = native.rowstep(native.get(), s, t, lab, torch.ones_like(mask), 0.5, 0.5, 0.5, True, divergence)
    assert torch.isfinite(ce).all() and torch.isfinite(kl).all() and torch.isfinite(s).all()


def test_status_and_switch(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.get() is None and native.status().startswith("eager")
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.status() == "native"


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), (None, False, False), ("", True, True), ("  ", False, False),
    ("1", False, True), (" On ", False, True), ("YES", False, True), ("true", False, True),
    ("0", True, False), ("off", True, False), ("No", True, False), ("FALSE", True, False)])
def test_env_flag(monkeypatch, value, default, expected):
    if value is None:
        monkeypatch.delenv("SEQ2SEQ_DISTILL_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("SEQ2SEQ_DISTILL_TEST_FLAG", value)
    assert env_flag("SEQ2SEQ_DISTILL_TEST_FLAG", default=default) is expected


@pytest.mark.parametrize("default", [True, False])
def test_env_flag_with_a_typo_keeps_the_default_and_says_so(monkeypatch, default):
    monkeypatch.setenv("SEQ2SEQ_DISTILL_TRITON", "ture")
    with pytest.warns(UserWarning, match=r"SEQ2SEQ_DISTILL_TRITON='ture' is not one of 1/true/yes/on or "
                                         r"0/false/no/off; using the default \((on|off)\)"):
        assert env_flag("SEQ2SEQ_DISTILL_TRITON", default=default) is default


def test_both_row_step_switches_read_env_flag(monkeypatch):
    from kernels import rowsteps

    monkeypatch.setenv(native.ENV_SWITCH, "off")
    assert not native.enabled() and native.status() == "eager (SEQ2SEQ_DISTILL_NATIVE=0)"
    monkeypatch.setenv(native.ENV_SWITCH, "")
    assert native.enabled()  # blank is unset: the default, on
    monkeypatch.setenv(rowsteps.TRITON_SWITCH, "no")
    assert rowsteps.describe(torch.device("cuda")) == "eager torch (SEQ2SEQ_DISTILL_TRITON not set)"


def test_no_compiler_falls_back_to_eager_with_same_results():
    """A machine without a C compiler still trains: the eager path, one log line, same loss."""
    code = r"""
import os, torch, shutil
import kernels.native as nat
nat._compiler = lambda: None
from kernels import fused_linear_distill_loss
g = torch.Generator().manual_seed(0)
h, w = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g)
th, tw = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
lab = torch.randint(0, 50, (9,), generator=g)
loss = fused_linear_distill_loss(h, w, lab, teacher_hidden=th, teacher_weight=tw, temperature=2.0)[0]
print(nat.status()); print(repr(loss.item()))
"""
    env = dict(os.environ, SEQ2SEQ_DISTILL_CACHE="/nonexistent-cache-dir")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split("\n")
    assert out[0] == "eager (no C compiler found ($CC, cc, gcc, clang))"
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g)
    th, tw = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
    lab = torch.randint(0, 50, (9,), generator=g)
    ref = fused_linear_distill_loss(h, w, lab, teacher_hidden=th, teacher_weight=tw, temperature=2.0)[0]
    assert abs(float(out[1]) - ref.item()) <= 1e-5 * abs(ref.item())


def test_broken_compiler_falls_back_with_a_warning(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc 1.0'\nexit 3\n")
    fake.chmod(0o755)
    code = "import kernels.native as n; print(n.status())"
    env = dict(os.environ, CC=str(fake), SEQ2SEQ_DISTILL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.startswith("eager (build or load failed: RuntimeError:")
    assert "exited 3" in proc.stdout
    assert "using the eager torch path" in proc.stderr
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written left


def test_library_is_cached_by_source_and_cpu(tmp_path):
    code = "import kernels.native as n; print(n.status()); print(sorted(p.name for p in n.cache_dir().iterdir()))"
    env = dict(os.environ, SEQ2SEQ_DISTILL_CACHE=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert first.splitlines()[0] == "native" and first == second
    names = eval(first.splitlines()[1])
    assert len(names) == 1 and names[0].startswith("rowstep-") and names[0].endswith(".so")


@pytest.mark.parametrize("bad", [50, -3])
def test_out_of_range_label_is_a_clear_error(bad):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(50, 8, generator=g)
    lab = torch.tensor([1, bad, -100, 2])
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 50\) or ignore_index=-100; found {bad}"):
        fused_linear_distill_loss(h, w, lab, alpha=1.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_kl_native_equals_eager(monkeypatch, divergence):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 301, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 301, generator=g)
    out = {}
    for sw in ("1", "0"):
        monkeypatch.setenv(native.ENV_SWITCH, sw)
        s.grad = None
        loss = chunked_kl_div(s, t, temperature=2.0, chunk_size=4, divergence=divergence, beta=0.3)
        loss.backward()
        out[sw] = (loss.detach(), s.grad.clone())
    assert torch.allclose(out["1"][0], out["0"][0], rtol=1e-6)
    assert torch.allclose(out["1"][1], out["0"][1], rtol=1e-5, atol=1e-9)


def test_triton_switch_without_triton_falls_back_with_a_warning():
    code = r"""
import sys, torch
sys.modules["triton"] = None  # as if not installed
from kernels import rowsteps
print(rowsteps.pick(torch.device("cuda")))
print(rowsteps.describe(torch.device("cuda")))
print(rowsteps.describe(torch.device("cpu")))
"""
    env = dict(os.environ, SEQ2SEQ_DISTILL_TRITON="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.splitlines() == ["None", "eager torch", "native"]
    assert proc.stderr.count("Triton row step is unavailable") == 1  # said once, not per chunk


def test_cuda_without_switch_uses_eager_torch(monkeypatch):
    from kernels import rowsteps

    monkeypatch.delenv(rowsteps.TRITON_SWITCH, raising=False)
    assert rowsteps.pick(torch.device("cuda")) is None
    assert rowsteps.describe(torch.device("cuda")) == "eager torch (SEQ2SEQ_DISTILL_TRITON not set)"
