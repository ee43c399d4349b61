"""Training input-pipeline throughput: hardneg's (uint8 tensors in memory + batched augmentation
on the training device) against the usual torchvision pipeline (PIL images, per-image
``torchvision.transforms`` in ``DataLoader`` workers, as in the SimCLR/HCL/DCL code).

Both sides use the same SimCLR CIFAR recipe (RandomResizedCrop(32), flip 0.5,
ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, normalise) and return the same thing (two
normalised float32 views per image), on the same images (a synthetic CIFAR-10 written in the
real python-pickle format and read back with ``hardneg.data.load_dataset``, or a real CIFAR-10
with ``--data-dir``), the same batch, and the same ResNet-18 (CIFAR stem) + SimCLR head +
``hardneg.create_loss("infonce")`` two-view forward/backward with Adam, in the same process.

Two measurements:

* augmentation stage alone: pairs of views per second (ours: index a batch, ``aug(x)`` twice;
  baseline: iterate the DataLoader that returns two views per image). ``--rounds`` interleaved
  rounds, one timed block per side each (``--steps`` batches for the baseline, 5x as many for
  ours, so that both blocks last about as long and see the same load); the ratio is taken per
  round and its median, min and max are reported. Each side is timed in its steady state and alone:
  before our block the baseline's workers are let finish refilling their prefetch queue (so
  that they do not compete with our block for the CPU), and the batches they prefetched are
  consumed, untimed, before the baseline's block (so that its block times the workers'
  production, not batches made earlier).
* end to end: optimiser steps, views + forward + backward + step (one step of ours, one of the
  baseline, alternately). Printed with the fraction of a step that the augmentation takes for
  each pipeline (serial accounting: augmentation time per batch from the first stage, compute
  time per step from this one) and the Amdahl bound on the end-to-end speed-up,
  ``1 / (1 - saved fraction)``. On a CPU the forward + backward dominates, so that bound is
  close to 1 whatever the augmentation costs, and with the default single step per side the
  measured end-to-end ratio is mostly the noise of two ~40 s steps (``--train-steps 4`` for a
  steadier one); the bound is the number to read.

    python benchmarks/train_throughput.py            # defaults: 7 rounds of 8 batches, 1 train step each (2-3 min on 2 cores)
    python benchmarks/train_throughput.py --skip-train --rounds 15   # augmentation stage only
    python benchmarks/train_throughput.py --quick    # a smoke run
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


class LoaderStream:
    """Endless batches from a DataLoader (a new epoch starts when one ends; persistent workers)."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.it = iter(loader)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def _ready_and_outstanding(self) -> tuple[int, int]:
        # private DataLoader state: results queued or stashed out of order, tasks in flight
        it = self.it
        stashed = sum(1 for v in it._task_info.values() if len(v) == 2)
        return it._data_queue.qsize() + stashed, it._tasks_outstanding

    def wait_until_prefetched(self, timeout: float = 30.0) -> float:
        """Block until every batch the workers were asked to prefetch is ready (they are then
        idle); returns the seconds waited. Falls back to a fixed sleep where the DataLoader
        internals are not available."""
        t0 = time.perf_counter()
        try:
            while time.perf_counter() - t0 < timeout:
                ready, outstanding = self._ready_and_outstanding()
                if ready >= outstanding:
                    break
                time.sleep(0.02)
        except (AttributeError, NotImplementedError):
            time.sleep(3.0)
        return time.perf_counter() - t0

    def drain_prefetched(self) -> int:
        """Consume (untimed) the batches that are ready now; returns how many."""
        try:
            n = self._ready_and_outstanding()[0]
        except (AttributeError, NotImplementedError):
            n = 4
        for _ in range(n):
            next(self)
        return n


def bench_baseline_aug(stream: LoaderStream, batch, steps) -> float:
    stream.drain_prefetched()
    t = time.perf_counter()
    for _ in range(steps):
        next(stream)
    return steps * batch / (time.perf_counter() - t)


def bench_train_interleaved(inputs, aug, stream, batch, steps, warmup, device, seed):
    """End to end, one step of ours then one step of the baseline, ``steps`` times, so that a
    change in the machine's load hits both alike. Same initial weights on both sides; one
    untimed full-size step of a third model first (one-off costs). The baseline's
    DataLoader workers refill its prefetch queue in the background, partly during our steps
    (a small bias in the baseline's favour). Returns per side the mean step time and the mean
    time of its data part (ours: the augmentation; baseline: waiting for the loader)."""
    m_o, opt_o = make_model(seed, device)
    m_b, opt_b = make_model(seed, device)
    loss_fn = hardneg.create_loss("infonce", temperature=0.5)
    gen = torch.Generator(device).manual_seed(0)
    # One untimed full-size step of a third, throw-away model on random views: the first
    # full-size forward + backward of the process pays one-off costs (kernel set-up for the
    # shapes, the allocator growing to the activations' size, page faults) that would
    # otherwise fall on whichever side is timed first.
    m_w, opt_w = make_model(seed + 1, device)
    v = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    train_step(m_w, opt_w, loss_fn, v, v.flip(-1))
    sync(device)
    del m_w, opt_w, v

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
        v1, v2, _ = next(stream)
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
            f"      ours {t_o / (i + 1):.2f} s/step avg, baseline {t_b / (i + 1):.2f} s/step avg",
            flush=True,
        )
    return t_o / steps, a_o / steps, t_b / steps, w_b / steps


def amdahl(aug_ours: float, aug_base: float, compute: float) -> dict:
    """Serial accounting of one training step = augmentation + compute (seconds per batch).
    ``saved``: the fraction of the baseline's step that ours removes; ``bound``: the largest
    end-to-end speed-up that replacing the augmentation can give, ``1 / (1 - saved)``;
    ``bound_free``: the same for an augmentation that costs nothing."""
    step_b = aug_base + compute
    saved = (aug_base - aug_ours) / step_b
    return {
        "compute_s": compute,
        "ours_aug_s": aug_ours,
        "baseline_aug_s": aug_base,
        "ours_fraction": aug_ours / (aug_ours + compute),
        "baseline_fraction": aug_base / step_b,
        "saved_fraction": saved,
        "bound": 1.0 / (1.0 - saved),
        "bound_free": 1.0 / (1.0 - aug_base / step_b),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--steps", type=int, default=8, help="batches per timed block of the baseline (aug stage)"
    )
    p.add_argument(
        "--ours-steps",
        type=int,
        default=None,
        help="batches per timed block of ours (default 5 x --steps: blocks of similar length)",
    )
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the aug stage")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed batches of ours before the rounds"
    )
    p.add_argument("--train-steps", type=int, default=1, help="timed end-to-end steps per side")
    p.add_argument("--train-warmup", type=int, default=0, help="untimed end-to-end steps per side")
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 rounds of 3 batches, 1 train step"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=20000, help="synthetic dataset size")
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
        args.steps, args.rounds, args.warmup, args.train_steps, args.train_warmup = 3, 2, 1, 1, 0
    if args.num_workers < 1:
        raise SystemExit("--num-workers must be >= 1 (the baseline is a multi-process DataLoader)")
    t_start = time.perf_counter()
    ours_steps = args.ours_steps or 5 * args.steps
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
    stream = LoaderStream(make_loader(pil_ds, args.batch_size, args.num_workers))

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
        "rounds": args.rounds,
        "steps": args.steps,
        "ours_steps": ours_steps,
    }
    print(json.dumps(info))
    print(f"[setup] {time.perf_counter() - t_start:.0f} s", flush=True)
    results: dict = {"info": info}

    # Interleaved rounds: a change in the machine's load hits both sides alike.
    gen = torch.Generator(device).manual_seed(0)
    for _ in range(args.warmup):
        ours_views(inputs, aug, args.batch_size, gen, device)
    ours_r, base_r = [], []
    for r in range(args.rounds):
        waited = stream.wait_until_prefetched()
        print(f"[aug round {r + 1}/{args.rounds}] {load_str()}, waited {waited:.1f} s", flush=True)
        ours_r.append(bench_ours_aug(inputs, aug, args.batch_size, ours_steps, 1, device))
        base_r.append(bench_baseline_aug(stream, args.batch_size, args.steps))
        print(
            f"    ours {ours_r[-1]:,.0f} pairs/s, baseline {base_r[-1]:,.0f} pairs/s, "
            f"ratio {ours_r[-1] / base_r[-1]:.2f}x",
            flush=True,
        )
    ratios = sorted(o / b for o, b in zip(ours_r, base_r))
    ours, base = float(np.median(ours_r)), float(np.median(base_r))
    results["aug"] = {
        "ours_pairs_per_s": ours,
        "baseline_pairs_per_s": base,
        "ratio": float(np.median(ratios)),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "ours_rounds": ours_r,
        "baseline_rounds": base_r,
    }
    print(
        f"augmentation only ({args.rounds} rounds): ours {ours:,.0f} pairs/s (median; best "
        f"{max(ours_r):,.0f}), baseline {base:,.0f} pairs/s (median; best {max(base_r):,.0f}); "
        f"ratio per round: median {np.median(ratios):.2f}x, min {ratios[0]:.2f}x, "
        f"max {ratios[-1]:.2f}x",
        flush=True,
    )

    print(f"[aug stage] done at {time.perf_counter() - t_start:.0f} s", flush=True)
    if not args.skip_train and args.train_steps > 0:
        stream.wait_until_prefetched()
        print(f"[e2e] before: {load_str()}", flush=True)
        t_o, a_o, t_b, w_b = bench_train_interleaved(
            inputs, aug, stream, args.batch_size, args.train_steps, args.train_warmup, device, 0
        )
        print(f"[e2e] after:  {load_str()}", flush=True)
        compute = 0.5 * ((t_o - a_o) + (t_b - w_b))
        bound = amdahl(args.batch_size / ours, args.batch_size / base, compute)
        results["e2e"] = {
            "ours_steps_per_s": 1.0 / t_o,
            "baseline_steps_per_s": 1.0 / t_b,
            "ratio": t_b / t_o,
            "ours_aug_s_per_step": a_o,
            "baseline_wait_s_per_step": w_b,
            "amdahl": bound,
        }
        print(
            f"end to end: ours {t_o:.2f} s/step ({a_o * 1e3:.0f} ms of it augmentation), "
            f"baseline {t_b:.2f} s/step ({w_b * 1e3:.0f} ms of it waiting for the loader), "
            f"ratio {t_b / t_o:.2f}x",
            flush=True,
        )
        print(
            f"share of a training step in augmentation (serial: augmentation time per batch from "
            f"the aug stage / (that + compute {compute:.2f} s)): ours "
            f"{100 * bound['ours_fraction']:.2f}%, baseline {100 * bound['baseline_fraction']:.2f}%"
            f"; saved {100 * bound['saved_fraction']:.2f}% of the baseline's step -> Amdahl bound "
            f"on the end-to-end speed-up {bound['bound']:.3f}x (free augmentation: "
            f"{bound['bound_free']:.3f}x)",
            flush=True,
        )

    print("\n| stage | hardneg | torchvision + DataLoader | ratio |\n|---|---|---|---|")
    a = results["aug"]
    print(
        f"| augmentation only (pairs of views / s, median of {args.rounds} rounds) | "
        f"{a['ours_pairs_per_s']:,.0f} | {a['baseline_pairs_per_s']:,.0f} | {a['ratio']:.2f}x "
        f"(min {a['ratio_min']:.2f}x, max {a['ratio_max']:.2f}x) |"
    )
    if "e2e" in results:
        e, am = results["e2e"], results["e2e"]["amdahl"]
        print(
            f"| end to end (s / step, ResNet-18 fwd+bwd, {args.train_steps} step(s)) | "
            f"{1 / e['ours_steps_per_s']:.2f} | {1 / e['baseline_steps_per_s']:.2f} | "
            f"{e['ratio']:.2f}x (Amdahl bound {am['bound']:.3f}x) |"
        )
        print(
            f"| augmentation share of a step (serial) | {100 * am['ours_fraction']:.2f}% | "
            f"{100 * am['baseline_fraction']:.2f}% | |"
        )
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\n(total {results['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
