"""Run directories: atomic writes, a sha256 manifest, and refusal of damaged or mixed artifacts."""
import json
import shutil

import pytest

from twotower import RunConfig, train
from twotower.artifacts import atomic_path, verify_manifest, write_text
from twotower.errors import ArtifactError
from twotower.run import Run


def _cfg(dim=8):
    return RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 300, "synthetic_items": 200},
                                "model": {"dim": dim}, "train": {"epochs": 1, "batch_size": 256},
                                "eval": {"ks": [10]}})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "run"
    train(_cfg(), out, quiet=True, log=lambda m: None)
    return out


def test_manifest_lists_every_artifact(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())["sha256"]
    for name in ("config.json", "model.safetensors", "items.json", "users.json", "metrics.json", "known.safetensors"):
        assert len(m[name]) == 64
    verify_manifest(run_dir)
    assert len(Run(run_dir).recommend([0], k=3)) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_weights_are_refused(run_dir, tmp_path, damage):
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    w = d / "model.safetensors"
    data = w.read_bytes()
    if damage == "flip":
        w.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "truncate":
        w.write_bytes(data[: len(data) // 2])
    else:
        w.unlink()
    with pytest.raises(ArtifactError, match="model.safetensors"):
        Run(d)


def test_weights_from_another_run_are_refused(run_dir, tmp_path):
    other = tmp_path / "other"
    train(_cfg(dim=16), other, quiet=True, log=lambda m: None)
    d = tmp_path / "mixed"
    shutil.copytree(run_dir, d)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ArtifactError, match="another run"):
        Run(d)
    with pytest.raises(ArtifactError, match="do not match the run's config"):
        Run(d, verify=False)  # even unverified, a shape mismatch is a clear error, not a traceback


def test_unfinished_run_says_resume(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="--resume"):
        Run(d)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old" and len(list(tmp_path.iterdir())) == 1
