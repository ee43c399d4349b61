"""The real on-disk formats, written tiny into tmp_path and read through load_dataset's code path."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from _same import assert_same
from PIL import Image

from hardneg.data import DatasetFormatError, DatasetNotFoundError, load_dataset

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- writers


def write_cifar10(root, per_batch=4, bytes_keys=False):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = RNG.integers(0, 10, per_batch).tolist()
        d = {"data": data, "labels": lab, "batch_label": name}
        if bytes_keys:  # what pickle.load(encoding="bytes") would show for the py2 originals
            d = {k.encode(): v for k, v in d.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        images[name], labels[name] = data, lab
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return folder, images, labels


def write_cifar100(root, n=6):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name in ("train", "test"):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = RNG.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [0] * n}, f)
        out[name] = (data, fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    return folder, out


def write_stl10(root, n_train=3, n_test=2, n_unlabeled=4):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        imgs = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [N, C, H, W]
        # the binary stores each channel column-major (x outer, y inner)
        imgs.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels = None
        if split != "unlabeled":
            labels = RNG.integers(1, 11, n).astype(np.uint8)
            labels.tofile(folder / f"{split}_y.bin")
        out[split] = (imgs, labels)
    return folder, out


def _save(img: np.ndarray, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)


def write_tiny_imagenet(root, per_class=2, size=64):
    folder = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(per_class):
            img = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
            _save(img, folder / "train" / w / "images" / f"{w}_{i}.JPEG", format="JPEG")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate(["n03", "n01", "n02", "n01"]):
        img = RNG.integers(0, 256, (size, size), dtype=np.uint8)  # some are grayscale
        _save(
            img if i % 2 else np.stack([img] * 3, -1),
            folder / "val" / "images" / f"val_{i}.JPEG",
            format="JPEG",
        )
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder


def write_imagefolder(root, classes=("cat", "dog"), per_class=2, size=12, splits=("train", "test")):
    written = {}
    for split in splits:
        for c in classes:
            for i in range(per_class):
                img = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
                p = root / split / c / f"{i}.png"
                _save(img, p)
                written[p] = img
    return written


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_layout_and_pixels(tmp_path, bytes_keys):
    folder, images, labels = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    assert train.inputs.dtype == torch.uint8 and tuple(train.inputs.shape) == (20, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert train.kind == "image" and train.name == "cifar10" and len(train) == 20
    assert train.classes == [f"c{i}" for i in range(10)]
    # row layout: R plane, G plane, B plane, each row-major 32x32
    raw = images["data_batch_2"][1]
    x = train.inputs[4 + 1].numpy()
    for c, y, xx in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert x[c, y, xx] == raw[c * 1024 + y * 32 + xx]
    expected = sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(test) == 4 and test.labels.tolist() == labels["test_batch"]
    # data_dir may be the dataset folder itself
    assert torch.equal(load_dataset("cifar10", "test", data_dir=folder).inputs, test.inputs)


def test_cifar100_fine_labels(tmp_path):
    _, out = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", "test", data_dir=tmp_path)
    assert ds.num_classes == 100 and ds.labels.tolist() == out["test"][1]
    assert_same(ds.inputs.reshape(6, -1), torch.from_numpy(out["test"][0]))
    assert ds.classes[:2] == ["f0", "f1"]


def test_cifar_truncated_file_names_file(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    path = folder / "data_batch_3"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetFormatError, match="data_batch_3.*(corrupt|truncated)"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_cifar_garbage_file(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(os.urandom(100))
    with pytest.raises(DatasetFormatError, match="test_batch"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_wrong_shape(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DatasetFormatError, match=r"test_batch.*shape \(4, 100\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_label_count_mismatch(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, f)
    with pytest.raises(DatasetFormatError, match="test_batch.*4 images"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_cifar_label_out_of_range(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 10, 2]}, f)
    with pytest.raises(DatasetFormatError, match="test_batch.*label out of range.*found 10"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _Evil(), "labels": [0]}, f)
    with pytest.raises(DatasetFormatError, match="refusing to load posix.system|refusing"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


# ----------------------------------------------------------------------------- STL-10


def test_stl10_splits(tmp_path):
    _, out = write_stl10(tmp_path)
    train = load_dataset("stl10", "train", data_dir=tmp_path)
    assert tuple(train.inputs.shape) == (3, 3, 96, 96)
    assert_same(train.inputs, torch.from_numpy(out["train"][0]))
    assert train.labels.tolist() == (out["train"][1].astype(int) - 1).tolist()
    unl = load_dataset("stl10", "unlabeled", data_dir=tmp_path)
    assert len(unl) == 4 and (unl.labels == -1).all()
    both = load_dataset("stl10", "train+unlabeled", data_dir=tmp_path)
    assert len(both) == 7 and torch.equal(both.inputs[3:], unl.inputs)
    assert both.labels[:3].tolist() == train.labels.tolist()
    assert len(load_dataset("stl10", "test", data_dir=tmp_path)) == 2
    from hardneg.data.formats import read_stl10_images

    chunked = read_stl10_images(tmp_path / "stl10_binary" / "unlabeled_X.bin", chunk=3)
    assert np.array_equal(chunked, out["unlabeled"][0])


def test_stl10_truncated_images(tmp_path):
    folder, _ = write_stl10(tmp_path)
    p = folder / "train_X.bin"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match="train_X.bin.*not a positive multiple of 27648"):
        load_dataset("stl10", "train", data_dir=tmp_path)


def test_stl10_label_problems(tmp_path):
    folder, _ = write_stl10(tmp_path)
    np.array([1, 2], np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(DatasetFormatError, match="train_y.bin.*2 labels for 3 images"):
        load_dataset("stl10", "train", data_dir=tmp_path)
    np.array([1, 0, 3], np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(DatasetFormatError, match="train_y.bin.*label out of range.*found 0"):
        load_dataset("stl10", "train", data_dir=tmp_path)
    np.array([1, 11, 3], np.uint8).tofile(folder / "train_y.bin")
    with pytest.raises(DatasetFormatError, match="found 11"):
        load_dataset("stl10", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet(tmp_path):
    write_tiny_imagenet(tmp_path)
    train = load_dataset("tiny-imagenet", "train", data_dir=tmp_path, num_workers=1)
    assert tuple(train.inputs.shape) == (6, 3, 64, 64) and train.inputs.dtype == torch.uint8
    assert train.classes == ["n01", "n02", "n03"] and train.num_classes == 3
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    test = load_dataset("tiny-imagenet", "test", data_dir=tmp_path)
    assert test.labels.tolist() == [2, 0, 1, 0]
    assert tuple(test.inputs.shape) == (4, 3, 64, 64)  # grayscale JPEGs converted to RGB
    small = load_dataset("tiny-imagenet", "test", data_dir=tmp_path, image_size=32)
    assert tuple(small.inputs.shape) == (4, 3, 32, 32)


def test_tiny_imagenet_bad_annotation(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetFormatError, match=r"val_annotations.txt:5: label out of range.*n99"):
        load_dataset("tiny-imagenet", "test", data_dir=tmp_path)


def test_tiny_imagenet_truncated_jpeg(tmp_path):
    folder = write_tiny_imagenet(tmp_path)
    p = folder / "train" / "n01" / "images" / "n01_1.JPEG"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DatasetFormatError, match="n01_1.JPEG.*(corrupt|truncated)"):
        load_dataset("tiny-imagenet", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_exact_pixels(tmp_path):
    written = write_imagefolder(tmp_path)
    train = load_dataset("imagefolder", "train", data_dir=tmp_path)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [0, 0, 1, 1]
    expect = torch.from_numpy(written[tmp_path / "train" / "dog" / "1.png"]).permute(2, 0, 1)
    assert_same(train.inputs[3], expect)
    assert len(load_dataset("imagefolder", "test", data_dir=tmp_path)) == 4


def test_imagefolder_single_tree_and_sizes(tmp_path):
    _save(RNG.integers(0, 256, (10, 16, 3), dtype=np.uint8), tmp_path / "a" / "x.png")
    _save(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8), tmp_path / "b" / "y.jpg")
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_dataset("imagefolder", "train", data_dir=tmp_path)
    ds = load_dataset("imagefolder", "train", data_dir=tmp_path, image_size=8)
    assert tuple(ds.inputs.shape) == (2, 3, 8, 8) and ds.labels.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        load_dataset("imagefolder", "test", data_dir=tmp_path, image_size=8)


def test_imagefolder_corrupt_and_unknown_class(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "test" / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetFormatError, match="broken.png"):
        load_dataset("imagefolder", "test", data_dir=tmp_path)
    (tmp_path / "test" / "cat" / "broken.png").unlink()
    _save(np.zeros((12, 12, 3), np.uint8), tmp_path / "test" / "cow" / "0.png")
    with pytest.raises(DatasetFormatError, match="'cow' is not among the 2 classes"):
        load_dataset("imagefolder", "test", data_dir=tmp_path)


def test_a_class_folder_without_images_is_named_with_what_it_holds(tmp_path):
    # images of a type we do not read were skipped: the class was kept with no image at all
    write_imagefolder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "0.gif").write_bytes(b"GIF89a")
    (tmp_path / "train" / "bird" / "notes.txt").write_text("")
    with pytest.raises(
        DatasetFormatError,
        match=r"train/bird: no image files \(it holds \.gif, \.txt files\); allowed "
        r"extensions: \.jpg, \.jpeg, \.png",
    ):
        load_dataset("imagefolder", "train", data_dir=tmp_path)
    for f in (tmp_path / "train" / "bird").iterdir():
        f.unlink()
    with pytest.raises(DatasetFormatError, match=r"train/bird: no image files \(it is empty\)"):
        load_dataset("imagefolder", "train", data_dir=tmp_path)
    # Tiny-ImageNet: a class of wnids.txt without its folder
    write_tiny_imagenet(tmp_path / "t")
    for f in (tmp_path / "t" / "tiny-imagenet-200" / "train" / "n01" / "images").iterdir():
        f.unlink()
    (tmp_path / "t" / "tiny-imagenet-200" / "train" / "n01" / "images").rmdir()
    with pytest.raises(DatasetFormatError, match=r"train/n01/images: missing"):
        load_dataset("tiny-imagenet", "train", data_dir=tmp_path / "t")


def test_imagefolder_scales_16_bit_grayscale_and_refuses_float_pixels(tmp_path):
    # PIL's convert("RGB") clips 16-bit pixels at 255: a 16-bit PNG came out almost all white
    wide = RNG.integers(0, 65536, (6, 6), dtype=np.uint16)
    wide[0, :3] = (0, 65535, 257 * 100 + 128)  # the ends of the range, and a value to round
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(wide).save(tmp_path / "train" / c / "0.png")
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode.startswith("I;16")
    ds = load_dataset("imagefolder", "train", data_dir=tmp_path)
    expect = np.floor(wide.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # nearest level
    assert tuple(ds.inputs.shape) == (2, 3, 6, 6)
    for channel in range(3):
        assert_same(ds.inputs[0, channel], torch.from_numpy(expect))
    assert ds.inputs[0, 0, 0, :3].tolist() == [0, 255, 100]
    # float pixels: no known range, refused with the file, the mode and what is allowed
    Image.fromarray(RNG.random((6, 6), dtype=np.float32)).save(tmp_path / "train" / "b" / "1.tif")
    tif = re.escape(str(tmp_path / "train" / "b" / "1.tif"))
    with pytest.raises(
        DatasetFormatError, match=rf"^{tif}: floating-point pixels \(PIL mode F\).*allowed: 8-bit"
    ):
        load_dataset("imagefolder", "train", data_dir=tmp_path)


# ----------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "name, writer, folder, archive",
    [
        ("cifar10", write_cifar10, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("stl10", write_stl10, "stl10_binary", "stl10_binary.tar.gz"),
        ("tiny-imagenet", write_tiny_imagenet, "tiny-imagenet-200", "tiny-imagenet-200.zip"),
    ],
)
def test_a_missing_dataset_says_what_was_found_instead(tmp_path, name, writer, folder, archive):
    # downloaded by hand but not extracted
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / archive).write_bytes(b"archive bytes")
    found = re.escape(f"Found the archive {tmp_path / 'a' / archive}, not extracted")
    with pytest.raises(DatasetNotFoundError, match=found):
        load_dataset(name, "test", data_dir=tmp_path / "a")
    # extracted into a folder of its own name: the path to point at is given, and works
    writer(tmp_path / "b" / folder)
    inner = tmp_path / "b" / folder / folder
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"point data_dir at {inner}.")):
        load_dataset(name, "test", data_dir=tmp_path / "b")
    assert len(load_dataset(name, "test", data_dir=inner)) > 0


@pytest.mark.parametrize("name", ["cifar10", "stl10", "tiny-imagenet", "imagefolder"])
def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path, name):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"archive bytes")
    with pytest.raises(
        DatasetNotFoundError, match=re.escape(f"data_dir {archive} is a file, not a folder")
    ):
        load_dataset(name, "train", data_dir=archive)


def test_the_binary_version_of_cifar_is_named_as_such(tmp_path):
    (tmp_path / "cifar-10-batches-bin").mkdir()
    (tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin").write_bytes(bytes(3073))
    binary = re.escape(f"Found {tmp_path / 'cifar-10-batches-bin'}: that is the binary version")
    with pytest.raises(DatasetNotFoundError, match=binary):
        load_dataset("cifar10", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    "name, folder, url_part",
    [
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz"),
        ("stl10", "stl10_binary", "stl10_binary.tar.gz"),
        ("tiny-imagenet", "tiny-imagenet-200", "tiny-imagenet-200.zip"),
    ],
)
def test_missing_dataset_says_what_and_where(tmp_path, name, folder, url_part):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", data_dir=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / folder) in msg and url_part in msg and "download=True" in msg
    assert "hardneg eval: --download" in msg  # each way to ask for it, eval's flag included
    assert info.value.__cause__ is None


def test_missing_single_batch_is_named(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path)) == 4


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import sys
    import types

    def boom(*a, **k):
        raise OSError("network unreachable")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=boom)  # no real download is attempted
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(
        DatasetNotFoundError, match="download from https://.*failed.*network unreachable"
    ):
        load_dataset("cifar10", "train", data_dir=tmp_path, download=True)


@pytest.mark.parametrize(
    "name, writer, lost",
    [
        ("cifar10", "write_cifar10", "cifar-10-batches-py/data_batch_3"),
        ("cifar100", "write_cifar100", "cifar-100-python/train"),
        ("stl10", "write_stl10", "stl10_binary/train_y.bin"),
        ("tiny-imagenet", "write_tiny_imagenet", "tiny-imagenet-200/wnids.txt"),
    ],
)
def test_failed_download_names_the_missing_local_file(tmp_path, monkeypatch, name, writer, lost):
    # the packaged configs say download: true; offline, a local copy that lacks one file must
    # be told which file, not only that the network failed
    import sys
    import types

    def boom(*a, **k):
        raise OSError("network unreachable")

    globals()[writer](tmp_path)
    (tmp_path / lost).unlink()
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=boom, CIFAR100=boom, STL10=boom)
    fake.datasets.utils = types.SimpleNamespace(download_and_extract_archive=boom)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake.datasets)
    monkeypatch.setitem(sys.modules, "torchvision.datasets.utils", fake.datasets.utils)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, "train", data_dir=tmp_path, download=True)
    message = str(info.value)
    assert f"{tmp_path / lost} is missing" in message and "network unreachable" in message
