import os
from pathlib import Path

import pytest

DATA_DIR = Path(os.environ.get("TWOTOWER_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real datasets not found under {DATA_DIR} (set TWOTOWER_DATA)")
    return DATA_DIR
