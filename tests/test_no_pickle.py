"""Nothing is unpickled from disk. A pickle that would run code on load (here: create a file) is
planted where each loader reads, and must be refused with an ArtifactError before it runs; and the
source must not grow a loader that unpickles."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower import RunConfig, train
from twotower.errors import ArtifactError

SRC = Path(__file__).resolve().parents[1] / "src" / "twotower"


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: if the marker exists, code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_optimizer_state_is_read_with_weights_only(tmp_path):
    from twotower.artifacts import load_torch_state

    marker = tmp_path / "ran"
    torch.save({"state": _Payload(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(ArtifactError, match="optimizer.pt"):
        load_torch_state(tmp_path / "optimizer.pt")
    assert not marker.exists()


def test_resume_refuses_a_planted_pickle_in_the_checkpoint(synthetic_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(synthetic_run, d)
    marker = tmp_path / "ran"
    torch.save({"0": _Payload(marker)}, d / "checkpoint" / "optimizer.pt")
    cfg = RunConfig.load(d / "config.json")
    with pytest.raises(ArtifactError, match="optimizer.pt"):
        train(cfg, d, resume=True, quiet=True, log=lambda m: None)
    assert not marker.exists()


def test_index_embeddings_holding_objects_are_refused_with_a_message(synthetic_run, tmp_path, capsys):
    from twotower.cli import main
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    d = tmp_path / "run"
    shutil.copytree(synthetic_run, d)
    build_run_index(Run(d), IndexParams(kind="flat"), sample=50, progress=False, log=lambda m: None)
    marker = tmp_path / "ran"
    np.save(d / "index" / "item_embeddings.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    user = str(Run(d).users.ids[0])
    assert main(["recommend", str(d), "--user", user, "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "item_embeddings.npy" in err and "never unpickled" in err and "twotower index" in err, err
    assert not marker.exists()


# Calls that unpickle, or can: each must not appear in the package (torch.load and np.load only
# with the safe flag on the same call).
FORBIDDEN = [
    (r"\bimport (c?pickle|dill|joblib|shelve|marshal)\b|\bfrom (c?pickle|dill|joblib|shelve) import", "a pickle module"),
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"read_pickle\(", "pandas.read_pickle"),
    (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
    (r"yaml\.(load|full_load|unsafe_load|load_all)\(", "a yaml loader other than safe_load"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"np\.load\((?![^)]*allow_pickle\s*=\s*False)", "np.load without allow_pickle=False"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
]


def test_the_package_has_no_unpickling_loader():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern, what in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(SRC)}:{line}: {what}")
    assert not found, "\n".join(found)
    # the check itself works: it finds what it forbids
    assert re.search(FORBIDDEN[5][0], "x = torch.load(p, map_location='cpu')")
    assert not re.search(FORBIDDEN[5][0], "x = torch.load(p, weights_only=True, map_location='cpu')")
