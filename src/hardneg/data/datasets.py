"""``load_dataset``: every supported dataset into one in-memory :class:`ArrayDataset`.

Where the files are looked for (``data_dir``; default ``$HARDNEG_DATA_DIR`` or
``~/.cache/hardneg/data``):

=================  ==========================================================================
cifar10            ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}``
cifar100           ``<data_dir>/cifar-100-python/{train, test}``
stl10              ``<data_dir>/stl10_binary/{train,test,unlabeled}_X.bin``, ``{train,test}_y.bin``
tiny-imagenet      ``<data_dir>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG,
                   val/images/*.JPEG, val/val_annotations.txt}`` (split "test" = the val set)
imagefolder        ``<data_dir>/{train,test|val}/<class>/<images>``, or ``<data_dir>/<class>/...``
                   (then only split "train")
mnist1d            generated offline with the ``mnist1d`` package, cached as ``.npz`` in
                   ``<data_dir or ~/.cache/hardneg>/mnist1d/``
digits             scikit-learn's bundled 8x8 digits, fixed stratified 80/20 split (seed 0)
=================  ==========================================================================

``data_dir`` may also point at the dataset's own folder (e.g. ``.../cifar-10-batches-py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from hardneg.data.base import (
    ArrayDataset,
    DatasetFormatError,
    canonical_name,
    dataset_info,
)
from hardneg.data.formats import (
    IMAGE_EXTENSIONS,
    decode_images,
    list_images,
    read_cifar_batch,
    read_cifar_meta,
    read_stl10_images,
    read_stl10_labels,
    stl10_image_count,
)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they are expected (the message says what to do)."""


def default_data_dir() -> Path:
    env = os.environ.get("HARDNEG_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hardneg" / "data"


def default_cache_dir() -> Path:
    env = os.environ.get("HARDNEG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hardneg"


def _resolve(data_dir: str | os.PathLike | None, folder: str) -> tuple[Path, Path]:
    """(root to download into, dataset folder). Accepts data_dir = the dataset folder itself."""
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    base = base.resolve()
    if base.name == folder:
        return base.parent, base
    return base, base / folder


def _to_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    name: str,
    split: str,
    num_classes: int,
    classes: list[str] | None = None,
) -> ArrayDataset:
    return ArrayDataset(
        inputs=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        num_classes=num_classes,
        kind="image",
        name=name,
        split=split,
        classes=classes,
    )


def _download_failed(
    title: str, url: str, root: Path, err: BaseException, missing: Path
) -> DatasetNotFoundError:
    # the missing file comes first: with a local copy that lacks one file (and the packaged
    # configs' download: true), that file, not the network, is what the user has to fix
    return DatasetNotFoundError(
        f"{title}: {missing} is missing, and the download from {url} into {root} failed "
        f"({type(err).__name__}: {err}). Download it by hand and extract it into {root}."
    )


def _layout_hint(root: Path, folder: Path, url: str, missing: Path) -> str:
    """What the user probably has instead of the extracted files (appended to the not-found
    message): the archive downloaded but not extracted, or extracted once too often."""
    archive = root / url.rsplit("/", 1)[-1]
    if archive.is_file():
        return (
            f" Found the archive {archive}, not extracted: extract it there, or pass "
            "download=True (torchvision checks it and extracts it)."
        )
    nested = folder / folder.name / missing.relative_to(folder)
    if nested.exists():
        return (
            f" Found {nested}: the archive was extracted into a folder of its own name; "
            f"point data_dir at {folder / folder.name}."
        )
    return ""


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": dict(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        label_key="labels",
        meta="batches.meta",
        meta_key="label_names",
        num_classes=10,
        binary_folder="cifar-10-batches-bin",
    ),
    "cifar100": dict(
        title="CIFAR-100",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        label_key="fine_labels",
        meta="meta",
        meta_key="fine_label_names",
        num_classes=100,
        binary_folder="cifar-100-binary",
    ),
}


def _load_cifar(name: str, split: str, data_dir, download: bool) -> ArrayDataset:
    spec = _CIFAR[name]
    root, folder = _resolve(data_dir, spec["folder"])
    files = [folder / f for f in spec[split]]
    absent = [f for f in files if not f.is_file()]
    if download and absent:
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            root.mkdir(parents=True, exist_ok=True)
            cls(root=str(root), train=True, download=True)
        except Exception as err:  # noqa: BLE001
            raise _download_failed(spec["title"], spec["url"], root, err, absent[0]) from None
    missing = [f for f in files if not f.is_file()]
    if missing:
        listed = ", ".join(spec["train"] + spec["test"])
        raise DatasetNotFoundError(
            f"{spec['title']} not found: missing {missing[0]}. Expected the python-version "
            f"batches ({listed}) in {folder}/. Download {spec['url']} and extract it into "
            f"{root}/, or pass download=True (config: data.download: true; hardneg eval: --download)."
            + _layout_hint(root, folder, spec["url"], missing[0])
            + (
                f" Found {root / spec['binary_folder']}: that is the binary version, this reads "
                "the python version."
                if (root / spec["binary_folder"]).is_dir()
                else ""
            )
        )
    parts = [read_cifar_batch(f, spec["label_key"], spec["num_classes"]) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    classes = read_cifar_meta(folder / spec["meta"], spec["meta_key"])
    if classes is not None and len(classes) != spec["num_classes"]:
        raise DatasetFormatError(
            f"{folder / spec['meta']}: {len(classes)} class names, expected {spec['num_classes']}"
        )
    return _to_dataset(images, labels, name, split, spec["num_classes"], classes)


# ----------------------------------------------------------------------------- STL-10

_STL_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
_STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _load_stl10(split: str, data_dir, download: bool) -> ArrayDataset:
    root, folder = _resolve(data_dir, "stl10_binary")
    parts = ["train", "unlabeled"] if split == "train+unlabeled" else [split]
    needed = []
    for p in parts:
        needed.append(folder / f"{p}_X.bin")
        if p != "unlabeled":
            needed.append(folder / f"{p}_y.bin")
    absent = [f for f in needed if not f.is_file()]
    if download and absent:
        import torchvision

        try:
            root.mkdir(parents=True, exist_ok=True)
            torchvision.datasets.STL10(root=str(root), split="train", download=True)
        except Exception as err:  # noqa: BLE001
            raise _download_failed("STL-10", _STL_URL, root, err, absent[0]) from None
    missing = [f for f in needed if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"STL-10 not found: missing {missing[0]}. Expected the binary version "
            f"(train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin) in {folder}/. "
            f"Download {_STL_URL} and extract it into {root}/, or pass download=True "
            "(config: data.download: true; hardneg eval: --download)."
            + _layout_hint(root, folder, _STL_URL, missing[0])
        )
    counts = [stl10_image_count(folder / f"{p}_X.bin") for p in parts]
    x = np.empty((sum(counts), 3, 96, 96), dtype=np.uint8)  # filled in place, no concatenation
    y = np.empty(sum(counts), dtype=np.int64)
    start = 0
    for p, n in zip(parts, counts):
        read_stl10_images(folder / f"{p}_X.bin", out=x[start : start + n])
        if p == "unlabeled":
            y[start : start + n] = -1
        else:
            y[start : start + n] = read_stl10_labels(folder / f"{p}_y.bin", n)
        start += n
    return _to_dataset(x, y, "stl10", split, 10, list(_STL_CLASSES))


# ----------------------------------------------------------------------------- Tiny-ImageNet

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _load_tiny_imagenet(
    split: str, data_dir, download: bool, image_size, num_workers
) -> ArrayDataset:
    root, folder = _resolve(data_dir, "tiny-imagenet-200")
    wnids_file = folder / "wnids.txt"
    if download and not wnids_file.is_file():
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            root.mkdir(parents=True, exist_ok=True)
            download_and_extract_archive(_TINY_URL, download_root=str(root), md5=_TINY_MD5)
        except Exception as err:  # noqa: BLE001
            raise _download_failed("Tiny-ImageNet-200", _TINY_URL, root, err, wnids_file) from None
    split_dir = folder / ("train" if split == "train" else "val")
    if not wnids_file.is_file() or not split_dir.is_dir():
        missing = wnids_file if not wnids_file.is_file() else split_dir
        raise DatasetNotFoundError(
            f"Tiny-ImageNet-200 not found: missing {missing}. Expected {folder}/ with wnids.txt, "
            "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt. "
            f"Download {_TINY_URL} and extract it into {root}/, or pass download=True "
            "(config: data.download: true; hardneg eval: --download)."
            + _layout_hint(root, folder, _TINY_URL, missing)
        )
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetFormatError(f"{wnids_file}: expected one unique WordNet id per line")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    paths, labels = [], []
    if split == "train":
        for w in classes:
            imgs = list_images(split_dir / w / "images")
            if not imgs:
                raise DatasetFormatError(_no_images(split_dir / w / "images"))
            paths += imgs
            labels += [index[w]] * len(imgs)
    else:
        ann = split_dir / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetNotFoundError(f"Tiny-ImageNet-200: missing {ann} (labels of the val set)")
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise DatasetFormatError(f"{ann}:{lineno}: expected '<file>\\t<wnid>\\t...'")
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in index:
                raise DatasetFormatError(
                    f"{ann}:{lineno}: label out of range: {wnid!r} is not in {wnids_file}"
                )
            p = split_dir / "images" / fname
            if not p.is_file():
                raise DatasetFormatError(f"{ann}:{lineno}: image {p} does not exist")
            paths.append(p)
            labels.append(index[wnid])
        if not paths:
            raise DatasetFormatError(f"{ann}: no annotations")
    images = decode_images(paths, image_size, num_workers=num_workers)
    return _to_dataset(images, np.asarray(labels), "tiny-imagenet", split, len(classes), classes)


# ----------------------------------------------------------------------------- ImageFolder


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _no_images(folder: Path) -> str:
    """Why ``folder`` gave no images: the extensions read, and those of the files found."""
    if not folder.is_dir():
        return f"{folder}: missing (the folder of this class's images)"
    found = sorted({p.suffix.lower() or p.name for p in folder.rglob("*") if p.is_file()})
    seen = f"it holds {', '.join(found[:8])} files" if found else "it is empty"
    return f"{folder}: no image files ({seen}); allowed extensions: {', '.join(IMAGE_EXTENSIONS)}"


def _load_imagefolder(split: str, data_dir, image_size, num_workers) -> ArrayDataset:
    if data_dir is None:
        raise ValueError(
            "imagefolder needs data_dir: a folder with train/<class>/<images> and "
            "test/<class>/<images> (or val/), or <class>/<images> for a train split only"
        )
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder: data_dir {root} does not exist")
    candidates = {"train": ["train"], "test": ["test", "val", "validation"]}[split]
    split_dir = next((root / c for c in candidates if (root / c).is_dir()), None)
    if split_dir is None:
        has_split_dirs = any((root / c).is_dir() for c in ("train", "test", "val", "validation"))
        if split == "train" and not has_split_dirs:
            split_dir = root
        else:
            raise DatasetNotFoundError(
                f"imagefolder: no '{split}' split under {root}: expected "
                f"{root / candidates[0]}/<class>/<images>"
                + (" (or val/)" if split == "test" else "")
            )
    # Class list from the train folder when there is one, so test labels line up with train's.
    class_root = root / "train" if (root / "train").is_dir() else split_dir
    classes = _class_dirs(class_root)
    if not classes:
        raise DatasetFormatError(f"{class_root}: no class folders (<class>/<images>)")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in _class_dirs(split_dir):
        if c not in index:
            raise DatasetFormatError(
                f"{split_dir / c}: class {c!r} is not among the {len(classes)} classes of {class_root}"
            )
        imgs = list_images(split_dir / c)
        if not imgs:
            # an empty class folder is a failed copy or files of another type, not a class
            # without images (torchvision's ImageFolder refuses it too)
            raise DatasetFormatError(_no_images(split_dir / c))
        paths += imgs
        labels += [index[c]] * len(imgs)
    if not paths:
        raise DatasetFormatError(f"{split_dir}: no image files in its class folders")
    images = decode_images(paths, image_size, num_workers=num_workers)
    return _to_dataset(images, np.asarray(labels), "imagefolder", split, len(classes), classes)


# ----------------------------------------------------------------------------- mnist1d

MNIST1D_ARGS = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


def _generate_mnist1d(args: dict) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError(
            "mnist1d needs the 'mnist1d' package: python3 -m pip install mnist1d"
        ) from err
    full = get_dataset_args(as_dict=True)
    full.update(args)

    class _Args:
        pass

    obj = _Args()
    obj.__dict__.update(full)
    # make_dataset seeds Python's and numpy's global RNGs; keep the caller's streams intact.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(obj)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x": d["x"].astype(np.float32),
        "y": d["y"].astype(np.int64),
        "x_test": d["x_test"].astype(np.float32),
        "y_test": d["y_test"].astype(np.int64),
    }


def _valid_mnist1d(d, length: int) -> bool:
    try:
        return (
            d["x"].ndim == 2
            and d["x"].shape[1] == length
            and d["x_test"].shape[1] == length
            and d["y"].shape[0] == d["x"].shape[0]
            and d["y_test"].shape[0] == d["x_test"].shape[0]
            and bool(np.isfinite(d["x"]).all())
            and int(d["y"].min()) >= 0
            and int(d["y"].max()) < 10
        )
    except Exception:  # noqa: BLE001
        return False


def _load_mnist1d(split: str, data_dir, **overrides) -> ArrayDataset:
    args = dict(MNIST1D_ARGS)
    args.update(overrides)
    key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    cache = base / "mnist1d" / f"mnist1d_{key}.npz"
    data = None
    if cache.is_file():
        try:
            with np.load(cache) as z:
                data = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # noqa: BLE001 - a broken cache is regenerated
            data = None
        if data is not None and not _valid_mnist1d(data, args["final_seq_length"]):
            data = None
        if data is None:
            warnings.warn(f"{cache}: unreadable mnist1d cache, regenerating it", stacklevel=3)
    if data is None:
        data = _generate_mnist1d(args)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **data)
            os.replace(tmp, cache)
        except OSError as err:
            warnings.warn(f"could not cache mnist1d in {cache.parent}: {err}", stacklevel=3)
    x, y = (data["x"], data["y"]) if split == "train" else (data["x_test"], data["y_test"])
    return ArrayDataset(
        inputs=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1),
        labels=torch.from_numpy(np.asarray(y, dtype=np.int64)),
        num_classes=10,
        kind="signal",
        name="mnist1d",
        split=split,
        classes=[str(i) for i in range(10)],
    )


# ----------------------------------------------------------------------------- digits


def digits_split_indices(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Fixed stratified split (per class: shuffle with ``seed``, first round(f*n) go to test)."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    train_idx, test_idx = digits_split_indices(labels)
    idx = train_idx if split == "train" else test_idx
    return ArrayDataset(
        inputs=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx]),
        num_classes=10,
        kind="image",
        name="digits",
        split=split,
        classes=[str(i) for i in range(10)],
    )


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    *,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> ArrayDataset:
    """Load split ``split`` of dataset ``name`` into memory.

    ``download=True`` fetches CIFAR-10/100, STL-10 and Tiny-ImageNet through torchvision when
    their files are missing; otherwise a missing dataset raises one
    :class:`DatasetNotFoundError` (a ``FileNotFoundError``) that gives the URL and the exact
    path to extract it to. Corrupt files raise :class:`DatasetFormatError` (a ``ValueError``)
    naming the file. ``image_size`` resizes decoded JPEG/PNG datasets (tiny-imagenet,
    imagefolder: shorter side, then centre crop) once at load; ``num_workers`` sets the decoding
    threads.
    """
    key = canonical_name(name)
    info = dataset_info(key)
    if split not in info.splits:
        raise ValueError(
            f"dataset {key!r} has no split {split!r}; available: {', '.join(info.splits)}"
        )
    if data_dir is not None and Path(data_dir).expanduser().is_file():
        # e.g. the downloaded archive itself: every file was then looked for "inside" it
        raise DatasetNotFoundError(
            f"{key}: data_dir {data_dir} is a file, not a folder; point it at the folder the "
            "data set's archive was extracted into"
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
    if key in ("cifar10", "cifar100"):
        ds = _load_cifar(key, split, data_dir, download)
    elif key == "stl10":
        ds = _load_stl10(split, data_dir, download)
    elif key == "tiny-imagenet":
        ds = _load_tiny_imagenet(split, data_dir, download, image_size, num_workers)
    elif key == "imagefolder":
        ds = _load_imagefolder(split, data_dir, image_size, num_workers)
    elif key == "mnist1d":
        ds = _load_mnist1d(split, data_dir)
    else:
        ds = _load_digits(split)
    if (
        image_size is not None
        and key not in ("tiny-imagenet", "imagefolder", "mnist1d")
        and ds.image_size != image_size
    ):
        ds = _resize_dataset(ds, image_size)
    return ds


def decode_size(name: str, image_size: int | None) -> int | None:
    """The ``image_size`` to pass to :func:`load_dataset` for a training or evaluation run whose
    views are ``image_size`` px: only datasets without a native size (``imagefolder``, whose
    images may all differ) are resized at load; fixed-size datasets keep their pixels so that the
    random resized crop sees the full-resolution image (e.g. HCL's STL-10 recipe crops 96 px
    images to 32 px views)."""
    return image_size if dataset_info(canonical_name(name)).image_size is None else None


def _resize_dataset(ds: ArrayDataset, size: int) -> ArrayDataset:
    """Resize an in-memory uint8 image dataset once (bilinear, antialiased), in chunks."""
    import torch.nn.functional as F

    out = []
    for chunk in ds.inputs.split(4096):
        y = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return ArrayDataset(
        torch.cat(out), ds.labels, ds.num_classes, ds.kind, ds.name, ds.split, ds.classes
    )
