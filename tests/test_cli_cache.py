"""``hardneg cache``: lists hardneg's entries in ``$HARDNEG_CACHE_DIR`` with their sizes, and
``--clear`` removes those and nothing else: not ``data/``, not a file of another name, not what a
link points to, not a leftover another process may be writing, and nothing at all in a folder
that is not hardneg's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hardneg.cli import main

TU_ENTRY = "tu/TOY-0123456789abcdef"
MNIST1D_ENTRY = "mnist1d/mnist1d_0123456789ab.npz"
OLD_LEFTOVER = "tu/.TOY-ab_cd123"
NEW_LEFTOVER = "mnist1d/tmpk2j3h4.npz.tmp"


def write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder as hardneg leaves it, with sizes the tests know: a processed TU set
    (3000 + 250 bytes in two files), an mnist1d file (1500), a TU processing killed two hours
    ago (700), an mnist1d write under way (40), downloaded data and a stray file in tu/."""
    root = tmp_path / "cache"
    write(root / TU_ENTRY / "TOY" / "processed" / "data.pt", 3000)
    write(root / TU_ENTRY / "TOY" / "raw" / "TOY_A.txt", 250)
    write(root / MNIST1D_ENTRY, 1500)
    write(root / OLD_LEFTOVER / "TOY" / "raw" / "TOY_A.txt", 700)
    two_hours_ago = time.time() - 7200
    os.utime(root / OLD_LEFTOVER, (two_hours_ago, two_hours_ago))
    write(root / NEW_LEFTOVER, 40)
    write(root / "data" / "cifar-10-batches-py" / "data_batch_1", 5000)
    write(root / "tu" / "notes.txt", 10)
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(root))
    return root


def test_the_listing_gives_each_entry_with_its_size(cache, capsys):
    assert main(["cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"hardneg's cache folder: {cache} (HARDNEG_CACHE_DIR)"
    rows = [line.split() for line in out[1:5]]
    assert rows == [
        ["700", "B", OLD_LEFTOVER, "(unfinished)"],
        ["3.2", "kB", TU_ENTRY],  # 3250 bytes
        ["1.5", "kB", MNIST1D_ENTRY],
        ["40", "B", NEW_LEFTOVER, "(unfinished)"],
    ]
    assert out[5].split()[:5] == ["5.5", "kB", "in", "4", "entries;"]  # 5490 bytes
    assert "notes.txt" not in "\n".join(out) and "data/" in out[6]


def test_clear_removes_hardnegs_entries_only(cache, capsys):
    before = {p for p in cache.rglob("*") if p.is_file()}
    assert main(["cache", "--clear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"removed 3 entries (5.5 kB) from {cache}"  # 3250 + 700 + 1500 bytes
    assert out[1].startswith("kept 1 entry younger than an hour, unfinished")
    gone = {p for p in before if not p.exists()}
    removed = [cache / TU_ENTRY, cache / MNIST1D_ENTRY, cache / OLD_LEFTOVER]
    assert gone == {p for p in before if any(p == r or r in p.parents for r in removed)}
    assert not any(r.exists() for r in removed)
    assert (cache / NEW_LEFTOVER).is_file() and (cache / "tu" / "notes.txt").is_file()
    assert (cache / "data" / "cifar-10-batches-py" / "data_batch_1").is_file()
    assert main(["cache"]) == 0
    assert "(unfinished)" in capsys.readouterr().out  # the write under way, still listed


def test_clear_refuses_a_folder_that_is_not_hardnegs(tmp_path, monkeypatch, capsys):
    """HARDNEG_CACHE_DIR=$HOME by mistake: nothing is removed, not even its entry-like names."""
    home = tmp_path / "home"
    write(home / ".bashrc", 10)
    write(home / "Documents" / "thesis.tex", 10)
    write(home / TU_ENTRY / "TOY" / "processed" / "data.pt", 10)
    files = sorted(p for p in home.rglob("*"))
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(home))
    assert main(["cache", "--clear"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"hardneg cache: error: {home} (HARDNEG_CACHE_DIR) is not hardneg's cache folder: it "
        "holds .bashrc, Documents/, which hardneg does not write; nothing removed (set "
        "HARDNEG_CACHE_DIR to hardneg's own folder)\n"
    )
    assert sorted(p for p in home.rglob("*")) == files
    assert main(["cache"]) == 0  # listing is harmless, and says why --clear would refuse
    assert "not hardneg's, so --clear refuses this folder: .bashrc, Documents/" in (
        capsys.readouterr().out
    )


def test_links_are_neither_listed_nor_followed(cache, tmp_path, capsys):
    outside = tmp_path / "precious"
    write(outside / "TOY" / "processed" / "data.pt", 10)
    (cache / "tu" / "EVIL-fedcba9876543210").symlink_to(outside, target_is_directory=True)
    assert main(["cache"]) == 0
    assert "EVIL" not in capsys.readouterr().out
    assert main(["cache", "--clear"]) == 0
    assert (outside / "TOY" / "processed" / "data.pt").is_file()
    assert (cache / "tu" / "EVIL-fedcba9876543210").is_symlink()


def test_a_linked_subfolder_makes_the_folder_foreign(cache, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    write(outside / "TOY-0123456789abcdef" / "x", 10)
    os.rename(cache / "mnist1d", tmp_path / "moved")
    (cache / "mnist1d").symlink_to(outside, target_is_directory=True)
    assert main(["cache", "--clear"]) == 2
    assert "it holds mnist1d/" in capsys.readouterr().err
    assert (outside / "TOY-0123456789abcdef" / "x").is_file() and (cache / TU_ENTRY).is_dir()


def test_a_missing_cache_folder_has_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARDNEG_CACHE_DIR", str(tmp_path / "none"))
    assert main(["cache", "--clear"]) == 0
    assert "does not exist: nothing cached" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
