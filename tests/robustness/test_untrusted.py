"""Loading a teacher never runs code from the checkpoint: pickles and custom modelling code."""
import json
import os
import pickle

import pytest
import torch

from distill.errors import UserError
from distill.models import load_teacher, load_teacher_config
from distill.toy import save_tiny_teacher

TEXTS = [f"a short sentence number {i}" for i in range(50)]


class _Payload:
    """Unpickling this creates `marker`: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_bin(path, marker, fmt):
    if fmt == "torch-zip":  # the format torch.save writes today
        torch.save({"model.shared.weight": _Payload(marker)}, path)
    else:  # a plain pickle, as old checkpoints were
        with open(path, "wb") as f:
            pickle.dump({"model.shared.weight": _Payload(marker)}, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # our hand-made legacy pickle
@pytest.mark.parametrize("fmt", ["torch-zip", "legacy-pickle"])
def test_malicious_bin_is_not_unpickled(tmp_path, fmt):
    teacher = save_tiny_teacher(str(tmp_path / "teacher"), "bart", TEXTS, layers=1)
    os.remove(os.path.join(teacher, "model.safetensors"))
    marker = tmp_path / "pwned"
    _write_bin(os.path.join(teacher, "pytorch_model.bin"), str(marker), fmt)

    # The payload is live: an unsafe load would run it.
    probe = tmp_path / "probe"
    _write_bin(str(tmp_path / "probe.bin"), str(probe), fmt)
    if fmt == "torch-zip":
        torch.load(str(tmp_path / "probe.bin"), weights_only=False)
    else:
        with open(tmp_path / "probe.bin", "rb") as f:
            pickle.load(f)
    assert probe.exists()

    with pytest.raises(UserError) as err:
        load_teacher(teacher, "bart")
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text and teacher in text
    assert "unpickling it could run code" in text and "safetensors" in text
    assert not marker.exists()


def test_safetensors_wins_over_bin(tmp_path):
    teacher = save_tiny_teacher(str(tmp_path / "teacher"), "bart", TEXTS, layers=1)
    marker = tmp_path / "pwned"
    _write_bin(os.path.join(teacher, "pytorch_model.bin"), str(marker), "torch-zip")
    model = load_teacher(teacher, "bart")
    assert model.config.model_type == "bart" and not marker.exists()


def test_custom_code_is_refused_without_trust_remote_code(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "distill-custom-seq2seq",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForSeq2SeqLM": "modeling_custom.CustomModel"}}))
    code = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)
    for load in (lambda: load_teacher_config(str(folder), "bart"), lambda: load_teacher(str(folder), "bart")):
        with pytest.raises(UserError) as err:
            load()
        text = str(err.value)
        assert "\n" not in text and "--trust-remote-code" in text and str(folder) in text
    assert not marker.exists()
