"""Built-in datasets (mnist1d, digits), dataset_info and ArrayDataset."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from hardneg.data import ArrayDataset, dataset_info, list_datasets, load_dataset
from hardneg.data import datasets as dmod


def test_dataset_info_all_names():
    names = ["cifar10", "cifar100", "stl10", "tiny-imagenet", "imagefolder", "mnist1d", "digits"]
    assert sorted(names) == list_datasets()
    for n in names:
        info = dataset_info(n)
        assert info.name == n
        assert info.pretrain_split in info.splits and info.eval_test_split in info.splits
        assert len(info.mean) == len(info.std) == info.in_channels
    assert dataset_info("stl10").pretrain_split == "train+unlabeled"
    assert dataset_info("CIFAR-10").num_classes == 10
    assert dataset_info("mnist1d").kind == "signal"


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*available"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="no split 'unlabeled'"):
        load_dataset("digits", "unlabeled")


def test_digits_split():
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert train.inputs.dtype == torch.uint8 and tuple(train.inputs.shape[1:]) == (1, 8, 8)
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.2) < 0.01
    assert int(train.inputs.max()) == 255 and int(train.inputs.min()) == 0
    # stratified: every class has ~20% of its samples in test
    for c in range(10):
        n_te, n_tr = int((test.labels == c).sum()), int((train.labels == c).sum())
        assert abs(n_te / (n_te + n_tr) - 0.2) < 0.02
    # fixed: same split every call
    assert torch.equal(load_dataset("digits", "test").inputs, test.inputs)


def test_mnist1d_generated_offline_and_cached(tmp_path, monkeypatch):
    import requests

    def no_network(*a, **k):
        raise AssertionError("mnist1d must not touch the network")

    monkeypatch.setattr(requests, "get", no_network)
    state_np, state_py = np.random.get_state(), random.getstate()
    train = load_dataset("mnist1d", "train", data_dir=tmp_path)
    assert np.array_equal(np.random.get_state()[1], state_np[1])  # global RNGs untouched
    assert random.getstate() == state_py
    assert train.kind == "signal" and train.inputs.dtype == torch.float32
    assert tuple(train.inputs.shape) == (4000, 1, 40) and train.num_classes == 10
    assert set(train.labels.unique().tolist()) == set(range(10))
    cached = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(cached) == 1
    test = load_dataset("mnist1d", "test", data_dir=tmp_path)
    assert tuple(test.inputs.shape) == (1000, 1, 40)
    assert torch.equal(load_dataset("mnist1d", "train", data_dir=tmp_path).inputs, train.inputs)


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, monkeypatch):
    fake = {
        "x": np.zeros((8, 40), np.float32),
        "y": np.arange(8) % 10,
        "x_test": np.ones((2, 40), np.float32),
        "y_test": np.array([1, 2]),
    }
    monkeypatch.setattr(dmod, "_generate_mnist1d", lambda args: fake)
    load_dataset("mnist1d", "train", data_dir=tmp_path)
    (cache,) = (tmp_path / "mnist1d").glob("*.npz")
    cache.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = load_dataset("mnist1d", "test", data_dir=tmp_path)
    assert any("regenerating" in str(x.message) for x in w)
    assert len(ds) == 2


def test_array_dataset_validation_and_subset():
    ds = ArrayDataset(torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.arange(5), 5, "image", "x")
    sub = ds.subset(torch.tensor([1, 3]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 3] and sub.image_size == 4
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(5, 3, 4, 4), torch.arange(5), 5, "image", "x")
    with pytest.raises(ValueError, match="5 inputs but 4 labels"):
        ArrayDataset(torch.zeros(5, 1, 4), torch.arange(4), 5, "signal", "x")
