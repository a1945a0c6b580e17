"""fetch_medmnist without a network: no-internet, success, md5 mismatch, already present."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from medfed.common.data.fetch import MEDMNIST_MD5, fetch_medmnist, file_md5, medmnist_url
from medfed.common.errors import ConfigError, DataError

FAKE = b"not really an npz, but bytes to download" * 1000


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def served(monkeypatch):
    """urlopen serving FAKE; records the URLs asked for."""
    calls = []

    def urlopen(url, timeout):
        calls.append((url, timeout))
        return FakeResponse(FAKE)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_no_internet(monkeypatch, tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        fetch_medmnist("pneumoniamnist", tmp_path / "data")
    msg = str(e.value)
    assert msg.startswith("no internet: could not reach zenodo.org")
    assert "copy it by hand into" in msg and str(tmp_path / "data") in msg
    assert MEDMNIST_MD5["pneumoniamnist"][28] in msg
    assert leftovers(tmp_path / "data") == []


@pytest.mark.parametrize(
    "error, match",
    [
        (urllib.error.HTTPError("u", 404, "Not Found", {}, None), "HTTP 404"),
        (TimeoutError("timed out"), "timed out after 30 s"),
        (ConnectionResetError("reset"), "could not download"),
    ],
)
def test_other_network_failures(monkeypatch, tmp_path, error, match):
    def fail(url, timeout):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(DataError, match=match):
        fetch_medmnist("breastmnist", tmp_path)
    assert leftovers(tmp_path) == []


def test_success_then_cached(monkeypatch, tmp_path, served):
    monkeypatch.setitem(MEDMNIST_MD5, "breastmnist", {28: hashlib.md5(FAKE).hexdigest()})
    path = fetch_medmnist("breastmnist", tmp_path / "new" / "dir", timeout=5)
    assert path == tmp_path / "new" / "dir" / "breastmnist.npz"
    assert path.read_bytes() == FAKE
    assert served == [("https://zenodo.org/records/10519652/files/breastmnist.npz?download=1", 5)]
    assert leftovers(path.parent) == ["breastmnist.npz"]  # no temp file left
    assert fetch_medmnist("breastmnist", path.parent) == path
    assert len(served) == 1  # already present with the right md5: not downloaded again


def test_md5_mismatch_leaves_nothing(tmp_path, served):
    with pytest.raises(DataError, match="md5 .* not the official"):
        fetch_medmnist("octmnist", tmp_path, size=64)
    assert leftovers(tmp_path) == []
    assert served[0][0].endswith("/octmnist_64.npz?download=1")


def test_existing_file_with_wrong_md5_is_not_overwritten(tmp_path, served):
    target = tmp_path / "pneumoniamnist.npz"
    target.write_bytes(b"mine")
    with pytest.raises(DataError, match="exists but its md5"):
        fetch_medmnist("pneumoniamnist", tmp_path)
    assert target.read_bytes() == b"mine" and served == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown MedMNIST subset 'chestmnist'.*pneumoniamnist"):
        fetch_medmnist("chestmnist", tmp_path)
    with pytest.raises(ConfigError, match="size=32"):
        fetch_medmnist("breastmnist", tmp_path, size=32)
    with pytest.raises(ConfigError, match="timeout"):
        fetch_medmnist("breastmnist", tmp_path, timeout=0)


def test_table_and_urls():
    expected = {"pneumoniamnist", "breastmnist", "bloodmnist", "dermamnist", "octmnist",
                "organamnist", "pathmnist", "retinamnist", "tissuemnist", "organcmnist",
                "organsmnist"}
    assert set(MEDMNIST_MD5) == expected
    for sums in MEDMNIST_MD5.values():
        assert sorted(sums) == [28, 64, 128, 224]
        assert all(len(s) == 32 and int(s, 16) >= 0 for s in sums.values())
    assert medmnist_url("pathmnist", 224).endswith("/files/pathmnist_224.npz?download=1")


@pytest.mark.parametrize("name", ["pneumoniamnist", "breastmnist"])
def test_shared_copies_are_the_official_files(shared_data, name, served):
    path = shared_data / name / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert file_md5(path) == MEDMNIST_MD5[name][28]
    assert fetch_medmnist(name, path.parent) == path  # present and verified: no download
    assert served == []
