"""Datasets held in memory as tensors (images ``uint8 [N, C, H, W]``, signals ``float32 [N, 1, L]``).

>>> from hardneg.data import load_dataset, dataset_info
>>> ds = load_dataset("digits", "train")
>>> ds.inputs.dtype, tuple(ds.inputs.shape[1:]), ds.num_classes
(torch.uint8, (1, 8, 8), 10)
>>> dataset_info("stl10").pretrain_split
'train+unlabeled'
"""

from hardneg.data.base import (
    ArrayDataset,
    DatasetFormatError,
    DatasetInfo,
    dataset_info,
    list_datasets,
)
from hardneg.data.datasets import (
    DatasetNotFoundError,
    decode_size,
    default_cache_dir,
    default_data_dir,
    load_dataset,
)

__all__ = [
    "ArrayDataset",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "dataset_info",
    "decode_size",
    "default_cache_dir",
    "default_data_dir",
    "list_datasets",
    "load_dataset",
]
