import os
from pathlib import Path

import pytest

import twotower  # noqa: F401  before any test imports torch: it sets OpenMP's wait policy (twotower/openmp.py)

DATA_DIR = Path(os.environ.get("TWOTOWER_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real datasets not found under {DATA_DIR} (set TWOTOWER_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    """A one-epoch run on a tiny generated dataset (no files needed), for tests that only read a
    run directory or copy it before changing it."""
    from twotower import RunConfig, train

    out = tmp_path_factory.mktemp("synthetic") / "run"
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 100},
                               "model": {"dim": 8}, "train": {"epochs": 1, "batch_size": 256}, "eval": {"ks": [10]}})
    train(cfg, out, quiet=True, log=lambda m: None)
    return out


@pytest.fixture
def native_on(monkeypatch):
    """The compiled paths switched on for this test whatever ``TWOTOWER_NATIVE`` says, so that the
    tests of a kernel against its reference run in both CI passes (the second has it set to 0)."""
    from twotower import native

    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "_configured", True)
