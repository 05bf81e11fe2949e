import hashlib
import io
import logging
import urllib.error
import urllib.request
import zipfile

import pytest

from twotower.data import fetch
from twotower.data.fetch import ML100K_URL, fetch_movielens_100k
from twotower.data.paths import default_data_dir
from twotower.errors import DataError


def _fake_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t1\t5\t874965758\n2\t1\t3\t876893171\n")
        zf.writestr("ml-100k/u.item", "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
        zf.writestr("ml-100k/README", "fake\n")
    return buf.getvalue()


class _Response(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any test that reaches urlopen without patching it fails instead of touching the network."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise AssertionError(f"network access attempted: {url}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return calls


def _serve(monkeypatch, payload: bytes):
    seen = []

    def urlopen(url, timeout=None):
        seen.append((url, timeout))
        return _Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return seen


def test_existing_directory_is_found_without_network(tmp_path, no_network):
    target = tmp_path / "ml-100k"
    target.mkdir()
    (target / "u.data").write_text("1\t1\t5\t0\n")
    assert fetch_movielens_100k(tmp_path) == target
    assert no_network == []


def test_offline_returns_none_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data_dir = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="twotower.data.fetch"):
        assert fetch_movielens_100k(data_dir, progress=False) is None
    assert not data_dir.exists()  # created for the download, removed again
    assert len(caplog.records) == 1 and "no route to host" in caplog.records[0].getMessage()


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), OSError("network is unreachable")])
def test_timeout_and_oserror_return_none(tmp_path, monkeypatch, exc):
    def fail(url, timeout=None):
        raise exc

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    assert fetch_movielens_100k(tmp_path, progress=False) is None
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_raises_and_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, _fake_zip())  # real MD5 constant: the fake zip cannot match
    with pytest.raises(DataError) as info:
        fetch_movielens_100k(tmp_path, progress=False)
    err = info.value
    assert fetch.ML100K_MD5 in str(err) and hashlib.md5(_fake_zip()).hexdigest() in str(err)
    assert "retry" in err.fix.lower()
    assert list(tmp_path.iterdir()) == []


def test_right_checksum_downloads_and_extracts(tmp_path, monkeypatch, capsys):
    payload = _fake_zip()
    monkeypatch.setattr(fetch, "ML100K_MD5", hashlib.md5(payload).hexdigest())
    seen = _serve(monkeypatch, payload)
    data_dir = tmp_path / "nested" / "data"
    path = fetch_movielens_100k(data_dir, timeout=3.0, progress=True)
    assert path == data_dir / "ml-100k"
    assert seen == [(ML100K_URL, 3.0)]
    assert (path / "u.data").read_text().startswith("1\t1\t5")
    assert sorted(p.name for p in data_dir.iterdir()) == ["ml-100k"]  # no temp files left
    assert "downloaded" in capsys.readouterr().err
    # second call: found on disk, no network
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    assert fetch_movielens_100k(data_dir) == path


def test_incomplete_leftover_directory_is_replaced(tmp_path, monkeypatch):
    payload = _fake_zip()
    monkeypatch.setattr(fetch, "ML100K_MD5", hashlib.md5(payload).hexdigest())
    _serve(monkeypatch, payload)
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.item").write_text("partial")
    path = fetch_movielens_100k(tmp_path, progress=False)
    assert (path / "u.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k"]


def test_bad_zip_with_matching_checksum_raises(tmp_path, monkeypatch):
    payload = b"this is not a zip"
    monkeypatch.setattr(fetch, "ML100K_MD5", hashlib.md5(payload).hexdigest())
    _serve(monkeypatch, payload)
    with pytest.raises(DataError, match="not a valid zip"):
        fetch_movielens_100k(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TWOTOWER_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "twotower"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "twotower"


def test_default_data_dir_used_when_none(monkeypatch, tmp_path):
    monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path))
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("")
    assert fetch_movielens_100k() == tmp_path / "ml-100k"
