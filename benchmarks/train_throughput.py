"""Training input-pipeline throughput: hardneg's (uint8 tensors in memory + batched augmentation
on the training device) against the usual torchvision pipeline (PIL images, per-image
``torchvision.transforms`` in ``DataLoader`` workers, as in the SimCLR/HCL/DCL code).

Both sides use the same SimCLR CIFAR recipe (RandomResizedCrop(32), flip 0.5,
ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, normalise), the same images (a synthetic
CIFAR-10 written in the real python-pickle format and read back with
``hardneg.data.load_dataset``, or a real CIFAR-10 with ``--data-dir``), the same batch, and the
same ResNet-18 (CIFAR stem) + SimCLR head + ``hardneg.create_loss("infonce")`` two-view
forward/backward with Adam, in the same process.

Two measurements:

* augmentation stage alone: pairs of views per second (ours: index a batch, ``aug(x)`` twice;
  baseline: iterate the DataLoader that returns two views per image);
* end to end: optimiser steps per second, views + forward + backward + step (one step of ours,
  one of the baseline, alternately).

    python benchmarks/train_throughput.py            # default: 20 aug steps, 6 train steps
    python benchmarks/train_throughput.py --quick    # a smoke run (a few steps)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import hardneg
from hardneg.augment import build_augmentation
from hardneg.data import dataset_info, load_dataset
from hardneg.models import build_backbone, build_head


def load_str() -> str:
    try:
        return "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load avg n/a"


# ----------------------------------------------------------------------------- data


def write_synthetic_cifar10(root: Path, n: int, seed: int = 0) -> None:
    """CIFAR-like images (smooth colour blobs + texture) in the real CIFAR-10 python format."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    imgs = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False)
    imgs = imgs + 0.08 * torch.randn(n, 3, 32, 32, generator=g)
    data = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, -1).numpy()
    labels = torch.randint(0, 10, (n,), generator=g).tolist()
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(n), 5)
    for i, idx in enumerate(parts, 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data[idx], "labels": [labels[j] for j in idx]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": data[:10], "labels": labels[:10]}, f)


class PILPairDataset(Dataset):
    """What torchvision's CIFAR10 + the HCL/DCL ``CIFAR10Pair`` do per item: HWC uint8 ->
    ``PIL.Image.fromarray`` -> transform twice."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform) -> None:
        self.data = images_hwc
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return self.transform(img), self.transform(img), int(self.targets[i])


def torchvision_transform(kind: str):
    mean, std = dataset_info("cifar10").mean, dataset_info("cifar10").std
    if kind == "v1":
        from torchvision import transforms as T

        return T.Compose(
            [
                T.RandomResizedCrop(32),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.RandomResizedCrop(32),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


# ----------------------------------------------------------------------------- model


class SimCLRModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone("resnet18", 3, 32)
        self.head = build_head("simclr", self.backbone.out_dim, 128)

    def forward(self, x):
        return self.head(self.backbone(x))


def make_model(seed: int, device: torch.device):
    torch.manual_seed(seed)
    model = SimCLRModel().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    return model, opt


def train_step(model, opt, loss_fn, v1, v2) -> float:
    # one forward on the concatenated views: BatchNorm statistics over both views, as SimCLR
    z = model(torch.cat([v1, v2]))
    z1, z2 = z.chunk(2)
    loss = loss_fn(z1, z2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- runs


def ours_views(inputs, aug, batch, gen, device):
    idx = torch.randint(0, inputs.shape[0], (batch,), generator=gen, device=inputs.device)
    x = inputs[idx]
    return aug(x, generator=gen), aug(x, generator=gen)


def bench_ours_aug(inputs, aug, batch, steps, warmup, device) -> float:
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(warmup):
        ours_views(inputs, aug, batch, gen, device)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        ours_views(inputs, aug, batch, gen, device)
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def make_loader(ds, batch, workers):
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=False,
        prefetch_factor=2 if workers > 0 else None,
    )


def infinite(loader):
    while True:
        yield from loader


def bench_baseline_aug(loader, batch, steps, warmup) -> float:
    it = infinite(loader)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def bench_train_interleaved(inputs, aug, loader, batch, steps, warmup, device, seed):
    """End to end, one step of ours then one step of the baseline, ``steps`` times, so that a
    change in the machine's load hits both alike. Same initial weights on both sides. The
    baseline's DataLoader workers refill its prefetch queue in the background, partly during
    our steps (a small bias in the baseline's favour)."""
    m_o, opt_o = make_model(seed, device)
    m_b, opt_b = make_model(seed, device)
    loss_fn = hardneg.create_loss("infonce", temperature=0.5)
    gen = torch.Generator(device).manual_seed(0)
    it = infinite(loader)

    def ours_step():
        t0 = time.perf_counter()
        v1, v2 = ours_views(inputs, aug, batch, gen, device)
        sync(device)
        t1 = time.perf_counter()
        train_step(m_o, opt_o, loss_fn, v1, v2)
        sync(device)
        return time.perf_counter() - t0, t1 - t0

    def base_step():
        t0 = time.perf_counter()
        v1, v2, _ = next(it)
        v1, v2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        t1 = time.perf_counter()
        train_step(m_b, opt_b, loss_fn, v1, v2)
        sync(device)
        return time.perf_counter() - t0, t1 - t0

    for _ in range(warmup):
        ours_step()
        base_step()
    t_o = a_o = t_b = w_b = 0.0
    for i in range(steps):
        print(f"    [e2e step {i + 1}/{steps}] {load_str()}", flush=True)
        dt, da = ours_step()
        t_o, a_o = t_o + dt, a_o + da
        dt, dw = base_step()
        t_b, w_b = t_b + dt, w_b + dw
        print(
            f"      ours {t_o / (i + 1):.1f} s/step avg, baseline {t_b / (i + 1):.1f} s/step avg",
            flush=True,
        )
    return steps / t_o, a_o / t_o, steps / t_b, w_b / t_b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed augmentation-only steps")
    p.add_argument("--train-steps", type=int, default=6, help="timed end-to-end steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the aug stage")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 aug / 2 train steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=5000, help="synthetic dataset size")
    p.add_argument("--data-dir", default=None, help="use a real CIFAR-10 from here instead")
    p.add_argument("--num-workers", type=int, default=2, help="baseline DataLoader workers")
    p.add_argument(
        "--baseline",
        choices=["v1", "v2"],
        default="v1",
        help="torchvision.transforms (v1) or transforms.v2 on PIL images",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: all cores)"
    )
    p.add_argument(
        "--aug-threads",
        default="1",
        help="intra-op threads of our augmentation on CPU ('none' = torch's setting)",
    )
    p.add_argument("--jitter-order", choices=["random", "fixed"], default="random")
    p.add_argument("--skip-train", action="store_true", help="augmentation stage only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_steps, args.warmup, args.rounds = 4, 1, 1, 1
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            write_synthetic_cifar10(Path(tmp), args.images)
            data_dir = tmp
        ds = load_dataset("cifar10", "train", data_dir=data_dir)
    inputs = ds.inputs.to(device)
    aug = build_augmentation("cifar10", jitter_order=args.jitter_order).to(device)
    aug.cpu_threads = None if args.aug_threads.lower() == "none" else int(args.aug_threads)
    pil_ds = PILPairDataset(
        ds.inputs.permute(0, 2, 3, 1).numpy().copy(),
        ds.labels.numpy(),
        torchvision_transform(args.baseline),
    )
    loader = make_loader(pil_ds, args.batch_size, args.num_workers)

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": str(device),
        "baseline": f"torchvision.transforms {args.baseline} on PIL, DataLoader num_workers={args.num_workers}",
        "batch": args.batch_size,
        "images": len(ds),
        "aug_cpu_threads": aug.cpu_threads,
    }
    print(json.dumps(info))
    results: dict = {"info": info}

    # Interleaved rounds (ours, baseline, ours, ...) so that a change in the machine's load hits
    # both sides alike; the medians are reported.
    ours_r, base_r = [], []
    for r in range(args.rounds):
        print(f"[aug round {r + 1}/{args.rounds}] {load_str()}", flush=True)
        ours_r.append(bench_ours_aug(inputs, aug, args.batch_size, args.steps, args.warmup, device))
        base_r.append(bench_baseline_aug(loader, args.batch_size, args.steps, args.warmup))
        print(f"    ours {ours_r[-1]:,.0f} pairs/s, baseline {base_r[-1]:,.0f} pairs/s", flush=True)
    ours, base = float(np.median(ours_r)), float(np.median(base_r))
    print(f"[aug] after: {load_str()}", flush=True)
    results["aug"] = {
        "ours_pairs_per_s": ours,
        "baseline_pairs_per_s": base,
        "ratio": ours / base,
        "ours_rounds": ours_r,
        "baseline_rounds": base_r,
    }
    print(
        f"augmentation only (median of {args.rounds}): ours {ours:,.0f} pairs/s, baseline "
        f"{base:,.0f} pairs/s, ratio {ours / base:.2f}x",
        flush=True,
    )

    if not args.skip_train:
        print(f"[e2e] before: {load_str()}", flush=True)
        o_sps, o_aug, b_sps, b_wait = bench_train_interleaved(
            inputs, aug, loader, args.batch_size, args.train_steps, args.warmup, device, 0
        )
        print(f"[e2e] after:  {load_str()}", flush=True)
        results["e2e"] = {
            "ours_steps_per_s": o_sps,
            "baseline_steps_per_s": b_sps,
            "ratio": o_sps / b_sps,
            "ours_aug_fraction": o_aug,
            "baseline_wait_fraction": b_wait,
        }
        print(
            f"end to end: ours {o_sps:.3f} steps/s ({o_sps * args.batch_size:,.0f} img/s, "
            f"{100 * o_aug:.1f}% of the time in augmentation), baseline {b_sps:.3f} steps/s "
            f"({b_sps * args.batch_size:,.0f} img/s, {100 * b_wait:.1f}% waiting for the loader), "
            f"ratio {o_sps / b_sps:.2f}x",
            flush=True,
        )

    rows = [
        (
            "augmentation only (pairs of views / s)",
            "aug",
            "ours_pairs_per_s",
            "baseline_pairs_per_s",
        )
    ]
    if "e2e" in results:
        rows.append(
            (
                "end to end (steps / s, ResNet-18 fwd+bwd)",
                "e2e",
                "ours_steps_per_s",
                "baseline_steps_per_s",
            )
        )
    print("\n| stage | hardneg | torchvision + DataLoader | ratio |\n|---|---|---|---|")
    for title, key, a, b in rows:
        r = results[key]
        print(f"| {title} | {r[a]:,.3f} | {r[b]:,.3f} | {r['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
