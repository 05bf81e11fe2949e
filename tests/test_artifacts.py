"""Run directories: atomic writes, a sha256 manifest, and refusal of damaged or mixed artifacts."""
import json
import os
import shutil
from pathlib import Path
import stat

import numpy as np
import pytest

from twotower import RunConfig, train
from twotower.artifacts import atomic_path, committed_dir, replace_dir, save_numpy, settle_dir, staging_dir, write_text
from twotower.errors import ArtifactError
from twotower.run import Run
from twotower.run_dir import RunDir


def _cfg(dim=8):
    return RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 300, "synthetic_items": 200},
                                "model": {"dim": dim}, "train": {"epochs": 1, "batch_size": 256},
                                "eval": {"ks": [10]}})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "run"
    train(_cfg(), out, quiet=True, log=lambda m: None)
    return out


@pytest.mark.slow
def test_manifest_lists_every_artifact(run_dir):
    m = json.loads((run_dir / "manifest.json").read_text())["sha256"]
    for name in ("config.json", "model.safetensors", "items.json", "users.json", "metrics.json", "known.safetensors"):
        assert len(m[name]) == 64
    RunDir(run_dir).verify()
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


@pytest.mark.parametrize("name", ["config.json", "users.json", "items.json", "known.safetensors", "metrics.json",
                                  "item_embeddings.npy", "features.json", "features.safetensors"])
def test_every_artifact_in_the_manifest_is_verified(run_dir, tmp_path, name):
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) - 1])
    with pytest.raises(ArtifactError, match=f"{name} does not match its recorded sha256"):
        Run(d)


def test_index_from_another_run_is_refused(run_dir, tmp_path):
    """A whole index folder copied from a run with other weights (same data, same shapes, another
    seed) is refused by everything that loads an index, with the command that rebuilds it."""
    from twotower.cli import main
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index, load_run_index
    from twotower.serving.query import Recommender

    other = tmp_path / "other"
    cfg = _cfg()
    cfg.train.seed = 1
    train(cfg, other, quiet=True, log=lambda m: None)
    build_run_index(Run(other), IndexParams(kind="flat"), sample=50, progress=False, log=lambda m: None)
    d = tmp_path / "mixed"
    shutil.copytree(run_dir, d)
    shutil.copytree(other / "index", d / "index")
    Run(d)  # the run's own files are intact: only the index is foreign
    with pytest.raises(ArtifactError, match=r"built from other weights.*twotower index"):
        load_run_index(Run(d))
    with pytest.raises(ArtifactError, match="other weights"):
        Recommender.load(d)
    user = str(Run(d).users.ids[0])
    assert main(["recommend", str(d), "--user", user, "-k", "3"]) == 2


def test_artifacts_get_the_umask_mode_not_0600(tmp_path):
    """Temporary files are private (0600) where mkstemp makes them; the renamed artifact must not
    be, or a run trained by one account cannot be served by another."""
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        save_numpy(tmp_path / "b.npy", np.zeros(3))
    finally:
        os.umask(old)
    for name in ("a.json", "b.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def _folder(path, version: int, complete: bool = True):
    path.mkdir()
    (path / "weights").write_text(str(version))
    if complete:
        (path / "state.json").write_text(str(version))


def _cut_swap(tmp_path: Path, crash: str) -> tuple[Path, int]:
    """``checkpoint`` at version 1, then a swap to version 2 cut at ``crash``; returns the folder
    and the version that is complete."""
    final = tmp_path / "checkpoint"
    new, old = tmp_path / "checkpoint.new", tmp_path / "checkpoint.old"
    _folder(final, 1)
    if crash == "writing new":
        _folder(new, 2, complete=False)
    elif crash == "new complete":
        _folder(new, 2)
    elif crash == "between renames":
        os.replace(final, old)
        _folder(new, 2)
        return final, 2
    elif crash == "old not removed":
        os.replace(final, old)
        _folder(final, 2)
        return final, 2
    return final, 1


@pytest.mark.parametrize("crash", ["writing new", "new complete", "between renames", "old not removed"])
def test_checkpoint_folder_swap_survives_a_crash_at_each_step(tmp_path, crash):
    """A checkpoint is a folder whose files must change together. Whichever step of the swap a crash
    cuts, one complete version (old or new, never a mix) is found, and the next swap goes through."""
    final, expect = _cut_swap(tmp_path, crash)
    found = committed_dir(final, "state.json")
    assert (found / "weights").read_text() == (found / "state.json").read_text() == str(expect)
    staged = staging_dir(final, "state.json")
    assert (final / "state.json").read_text() == str(expect)  # the complete copy was put in place, not cleared
    (staged / "weights").write_text("3")
    (staged / "state.json").write_text("3")
    replace_dir(staged, final)
    assert (final / "weights").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("crash", ["writing new", "new complete", "between renames", "old not removed", "none"])
def test_settling_a_cut_swap_leaves_the_complete_copy_alone_in_place(tmp_path, crash):
    """What --resume does once every rank has read the checkpoint: a run resumed after its last
    checkpoint saves no other, so the copy a crash left beside it must be cleared there."""
    final, expect = _cut_swap(tmp_path, crash)
    assert settle_dir(final, "state.json") == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (final / "weights").read_text() == (final / "state.json").read_text() == str(expect)


def test_settling_with_no_complete_copy_touches_nothing(tmp_path):
    final = tmp_path / "checkpoint"
    _folder(tmp_path / "checkpoint.new", 2, complete=False)
    assert settle_dir(final, "state.json") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.new"]
