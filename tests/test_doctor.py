"""The install trap: CUDA builds of torchvision/torchaudio/torchcodec next to a CPU torch."""

from hpcinfer import doctor


def _fake_versions(monkeypatch, versions):
    monkeypatch.setattr(doctor, "installed", lambda name: versions.get(name))


def test_cuda_companions_of_cpu_torch_are_named_with_the_fix(monkeypatch):
    _fake_versions(monkeypatch, {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchcodec": "0.17.0"})
    msg = doctor.conflict_message()
    assert "torchvision==0.28.0" in msg and "torchcodec==0.17.0" in msg and "torchaudio" not in msg.split("Fix")[0]
    assert msg.endswith("pip uninstall -y torchvision torchcodec")


def test_cpu_companions_or_gpu_torch_are_fine(monkeypatch):
    _fake_versions(monkeypatch, {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu"})
    assert doctor.conflict_message() is None
    _fake_versions(monkeypatch, {"torch": "2.9.1", "torchvision": "0.24.1"})
    assert doctor.conflict_message() is None


def test_this_environment_is_clean():
    """The README's install leaves a working environment (CI runs on it)."""
    assert doctor.conflict_message() is None
