"""Readers for the on-disk formats of the real datasets, with per-file validation.

Each reader returns numpy arrays (images ``uint8 [N, C, H, W]``, labels ``int64 [N]``) and
raises :class:`~hardneg.data.base.DatasetFormatError` naming the file and the problem when a
file is corrupt, truncated, has the wrong shape or labels out of range.

Why not read through ``torchvision.datasets.CIFAR10``/``STL10``: their constructors verify the
MD5 of every file and, on any mismatch, say only "Dataset not found or corrupted"; the formats
themselves are simple (a pickled dict per CIFAR batch, raw ``uint8`` arrays for STL-10), so we
read the very same files here, with messages that name the file, and use torchvision only to
download and extract the archives. CIFAR pickles are read with a restricted unpickler that only
rebuilds numpy arrays, so a tampered data file cannot execute code.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hardneg.data.base import DatasetFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# ----------------------------------------------------------------------------- CIFAR pickles

_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} (only numpy arrays, lists and dicts are expected)"
        )


def _load_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except OSError as err:
        raise DatasetFormatError(f"{path}: cannot read the file ({err})") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DatasetFormatError(
            f"{path}: corrupt or truncated pickle ({type(err).__name__}: {err}); "
            "delete the file and download the dataset again"
        ) from None


def _check_labels(path: Path, labels: np.ndarray, num_classes: int, low: int = 0) -> np.ndarray:
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < low or hi >= low + num_classes:
        bad = labels[(labels < low) | (labels >= low + num_classes)]
        raise DatasetFormatError(
            f"{path}: label out of range: expected {low}..{low + num_classes - 1} "
            f"({num_classes} classes), found {int(bad[0])} ({bad.size} bad label(s))"
        )
    return labels.astype(np.int64) - low


def read_cifar_batch(
    path: str | os.PathLike, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (``data_batch_1``, ``test_batch``, ``train``, ``test``...).

    The file is a pickled dict with ``data`` (``uint8 [N, 3072]``, channel-major 3x32x32) and a
    list of labels under ``label_key`` (``labels`` for CIFAR-10, ``fine_labels`` for CIFAR-100).
    """
    path = Path(path)
    obj = _load_pickle(path)
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if not isinstance(obj, dict) or "data" not in obj or label_key not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DatasetFormatError(
            f"{path}: not a CIFAR batch: expected a dict with 'data' and '{label_key}', found {found}"
        )
    data = obj["data"]
    if not isinstance(data, np.ndarray):
        raise DatasetFormatError(f"{path}: 'data' must be a numpy array, got {type(data).__name__}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: 'data' has shape {data.shape}, expected (N, 3072) = N images of 3x32x32"
        )
    if data.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
    try:
        labels = np.asarray(obj[label_key])
    except Exception as err:  # noqa: BLE001
        raise DatasetFormatError(
            f"{path}: '{label_key}' is not a list of integers ({err})"
        ) from None
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetFormatError(
            f"{path}: {data.shape[0]} images but '{label_key}' has shape {labels.shape}"
        )
    labels = _check_labels(path, labels, num_classes)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def read_cifar_meta(path: str | os.PathLike, key: str) -> list[str] | None:
    """Class names from ``batches.meta`` / ``meta`` (optional file: ``None`` when absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    obj = _load_pickle(path)
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetFormatError(f"{path}: expected a dict with '{key}'")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in obj[key]]


# ----------------------------------------------------------------------------- STL-10 binaries

STL10_SIZE = 96


def stl10_image_count(path: str | os.PathLike) -> int:
    """Number of images in an STL-10 ``*_X.bin`` file (validates its size)."""
    path = Path(path)
    per_image = 3 * STL10_SIZE * STL10_SIZE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise DatasetFormatError(
            f"{path}: file size {size} bytes is not a positive multiple of {per_image} "
            f"(3x{STL10_SIZE}x{STL10_SIZE} bytes per image): the file is truncated or not an "
            "STL-10 image file; delete it and download the dataset again"
        )
    return size // per_image


def read_stl10_images(
    path: str | os.PathLike, out: np.ndarray | None = None, chunk: int = 2048
) -> np.ndarray:
    """``*_X.bin``: raw ``uint8``, each image 3x96x96 stored channel-major and column-major.

    Returns ``uint8 [N, 3, 96, 96]`` (row-major). With ``out`` (a ``[N, 3, 96, 96]`` uint8
    array, e.g. a slice of a larger one) the images are written there; the file is read in
    chunks so the peak memory is the output plus one chunk (the unlabeled split is 2.7 GB).
    """
    path = Path(path)
    n = stl10_image_count(path)
    if out is None:
        out = np.empty((n, 3, STL10_SIZE, STL10_SIZE), dtype=np.uint8)
    elif out.shape != (n, 3, STL10_SIZE, STL10_SIZE) or out.dtype != np.uint8:
        raise ValueError(f"out has shape {out.shape}, expected {(n, 3, STL10_SIZE, STL10_SIZE)}")
    per_image = 3 * STL10_SIZE * STL10_SIZE
    try:
        with open(path, "rb") as f:
            for i in range(0, n, chunk):
                k = min(chunk, n - i)
                raw = np.fromfile(f, dtype=np.uint8, count=k * per_image)
                if raw.size != k * per_image:
                    raise DatasetFormatError(f"{path}: file ended early (truncated while reading)")
                out[i : i + k] = raw.reshape(k, 3, STL10_SIZE, STL10_SIZE).transpose(0, 1, 3, 2)
    except OSError as err:
        raise DatasetFormatError(f"{path}: cannot read the file ({err})") from None
    return out


def read_stl10_labels(path: str | os.PathLike, count: int) -> np.ndarray:
    """``*_y.bin``: one ``uint8`` per image, classes 1..10 (returned as 0..9)."""
    path = Path(path)
    try:
        labels = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DatasetFormatError(f"{path}: cannot read the file ({err})") from None
    if labels.shape[0] != count:
        raise DatasetFormatError(
            f"{path}: {labels.shape[0]} labels for {count} images in the matching *_X.bin file "
            "(truncated or mismatched file)"
        )
    return _check_labels(path, labels, 10, low=1)


# ----------------------------------------------------------------------------- image files


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, sorted), by extension."""
    found: list[Path] = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    found.sort()
    return found


def _resize_square(img, size: int):
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to square."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_8_bit(img, path: Path):
    """An 8-bit PIL image for ``img``. PIL's ``convert`` clips wider pixels to 255 instead of
    scaling them (a 16-bit grayscale PNG came out almost all white, a float TIFF in [0, 1] all
    black), so 16-bit grayscale is scaled here (v / 257, the full 16-bit range onto 0..255) and
    modes whose range is not known (32-bit integer ``I``, float ``F``) are refused."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DatasetFormatError(
            f"{path}: {kind} pixels (PIL mode {img.mode}) have no fixed range to scale to 8 bits; "
            "allowed: 8-bit images (RGB, RGBA, grayscale, palette, CMYK) and 16-bit grayscale; "
            "convert the file to 8-bit"
        )
    return img


def decode_image(path: Path, size: int | None, mode: str = "RGB") -> np.ndarray:
    """Decode one image file into ``uint8 [C, H, W]`` (optionally resized to ``size``).

    Any 8-bit PIL mode is converted to ``mode`` (RGBA drops its alpha channel, grayscale is
    replicated); 16-bit grayscale is scaled to 8 bits; 32-bit integer and float images are
    refused (:func:`_to_8_bit`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = _to_8_bit(img, path).convert(mode)
            if size is not None:
                img = _resize_square(img, size)
            arr = np.asarray(img, dtype=np.uint8)
    except DatasetFormatError:  # already names the file and the problem
        raise
    except UnidentifiedImageError:
        raise DatasetFormatError(
            f"{path}: not a readable image file (corrupt or wrong format)"
        ) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetFormatError(f"{path}: corrupt or truncated image ({err})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_images(
    paths: Sequence[Path], size: int | None, *, num_workers: int | None = None, mode: str = "RGB"
) -> np.ndarray:
    """Decode many files once into one ``uint8 [N, C, H, W]`` array.

    With ``size=None`` the images must all have the same size; otherwise a ``ValueError`` says
    to pass ``image_size``. Decoding runs in a thread pool (PIL releases the GIL).
    """
    if not paths:
        raise ValueError("no images to decode")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1 and len(paths) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(pool.map(lambda p: decode_image(p, size, mode), paths, chunksize=64))
    else:
        arrays = [decode_image(p, size, mode) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        examples = {}
        for p, a in zip(paths, arrays):
            examples.setdefault(a.shape, p)
        listed = "; ".join(f"{s[1]}x{s[2]} e.g. {p}" for s, p in list(examples.items())[:3])
        raise ValueError(
            f"images have different sizes ({listed}); resize them to one size (shorter side, "
            "then centre crop) with image_size=N (config: data.image_size=N; hardneg eval: "
            "--image-size N)"
        )
    return np.stack(arrays)
