"""``hardneg cache``: what hardneg keeps in its cache folder, and ``--clear`` to remove it.

    hardneg cache            # each entry with its size
    hardneg cache --clear    # remove them (each is rebuilt on its next use)

The cache folder is ``$HARDNEG_CACHE_DIR``, or ``~/.cache/hardneg``. hardneg writes there:

* ``tu/NAME-DIGEST/``: a TU graph set processed by PyTorch Geometric, one per file contents
  (:func:`hardneg.graph.data.load_tu`), and ``tu/.NAME-XXXXXXXX/``, a processing that was killed;
* ``mnist1d/mnist1d_KEY.npz``: the generated mnist1d data, one per generation settings, and
  ``mnist1d/tmp*.npz.tmp``, a write that was killed.

Only entries of these forms are removed, and only in a folder that holds nothing but ``tu/``,
``mnist1d/`` and ``data/`` (a mistyped ``HARDNEG_CACHE_DIR``, such as the home folder, is
refused). ``data/`` (downloaded data sets, the default ``$HARDNEG_DATA_DIR``) is never removed;
neither is a leftover younger than an hour (another process may be writing it). Clear it while
no hardneg job reads the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

#: the cache's sub-folders and the names hardneg gives its entries there
ENTRY_PATTERNS = {
    "tu": re.compile(r"[^./][^/]*-[0-9a-f]{16}"),
    "mnist1d": re.compile(r"mnist1d_[0-9a-f]{12}\.npz"),
}
LEFTOVER_PATTERNS = {  # tempfile.mkdtemp / mkstemp names of a killed writer
    "tu": re.compile(r"\.[^/]+-[a-z0-9_]{8}"),
    "mnist1d": re.compile(r"tmp[A-Za-z0-9_]+\.npz\.tmp"),
}
KEPT = ("data",)  # the default data folder: downloads, not a cache
LEFTOVER_AGE_S = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clear",
        action="store_true",
        help="remove the entries listed (processed graph sets, generated mnist1d data); "
        "data/ is kept",
    )


@dataclass(frozen=True)
class Entry:
    path: Path
    size: int  # bytes
    leftover: bool  # a killed writer's temporary


def cache_folder() -> Path:
    from hardneg.data import default_cache_dir

    return default_cache_dir()


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for parent, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(parent, f)).st_size for f in files)
    return total


def foreign_entries(root: Path) -> list[str]:
    """Names at the top of ``root`` that hardneg does not write: if any, it is not hardneg's
    cache folder and nothing is removed from it."""
    known = {*ENTRY_PATTERNS, *KEPT}
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in root.iterdir()
        if p.name not in known or p.is_symlink() or not p.is_dir()
    )


def cache_entries(root: Path) -> list[Entry]:
    """hardneg's entries in the cache folder ``root`` (nothing else under it is listed)."""
    entries = []
    for sub, pattern in ENTRY_PATTERNS.items():
        folder = root / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink():
                continue
            if pattern.fullmatch(path.name):
                entries.append(Entry(path, folder_size(path), leftover=False))
            elif LEFTOVER_PATTERNS[sub].fullmatch(path.name):
                entries.append(Entry(path, folder_size(path), leftover=True))
    return entries


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def entries_text(number: int) -> str:
    return f"{number} {'entry' if number == 1 else 'entries'}"


def clear(root: Path, entries: list[Entry], now: float) -> list[Entry]:
    """Remove ``entries`` (of :func:`cache_entries`) but recent leftovers; returns the removed."""
    removed = []
    for entry in entries:
        if entry.leftover and now - entry.path.lstat().st_mtime < LEFTOVER_AGE_S:
            continue  # another process may be writing it right now
        if not entry.path.resolve().is_relative_to(root.resolve()):
            raise ValueError(f"{entry.path} is outside the cache folder {root}; nothing removed")
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink()
        removed.append(entry)
    return removed


def run(args: argparse.Namespace) -> int:
    root = cache_folder()
    where = "HARDNEG_CACHE_DIR" if os.environ.get("HARDNEG_CACHE_DIR") else "default"
    if not root.exists():
        print(f"hardneg's cache folder {root} ({where}) does not exist: nothing cached")
        return 0
    if not root.is_dir():
        raise ValueError(f"the cache folder {root} ({where}) is not a folder")
    foreign = foreign_entries(root)
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if foreign and args.clear:
        raise ValueError(
            f"{root} ({where}) is not hardneg's cache folder: it holds {shown}, which hardneg "
            "does not write; nothing removed (set HARDNEG_CACHE_DIR to hardneg's own folder)"
        )
    entries = cache_entries(root)
    if args.clear:
        removed = clear(root, entries, time.time())
        size = sum(e.size for e in removed)
        print(f"removed {entries_text(len(removed))} ({human_size(size)}) from {root}")
        kept = len(entries) - len(removed)
        if kept:
            print(
                f"kept {entries_text(kept)} younger than an hour, unfinished (a process may be "
                "writing them)"
            )
        return 0
    print(f"hardneg's cache folder: {root} ({where})")
    for entry in entries:
        name = entry.path.relative_to(root).as_posix()
        print(f"{human_size(entry.size):>10}  {name}{'  (unfinished)' if entry.leftover else ''}")
    total = sum(e.size for e in entries)
    if entries:
        print(
            f"{human_size(total):>10}  in {entries_text(len(entries))}; hardneg cache --clear "
            "removes them (each is rebuilt on its next use)"
        )
    else:
        print("no entries")
    if (root / "data").is_dir():
        print("data/ holds downloaded data sets (the default data folder): never removed")
    if foreign:
        print(f"not hardneg's, so --clear refuses this folder: {shown}")
    return 0
