"""Per-operation timing of hardneg's batched image augmentation (SimCLR CIFAR recipe) on CPU.

Times each stage of one view of a uint8 batch (crop-box sampling, uint8 -> float, crop weights,
the two crop matmuls, the jitter schedule, each colour op on the jittered images in one call,
the per-stage regrouping gathers, grayscale, normalisation) and the whole ``aug(x)`` call, for
the batch sizes and intra-op thread counts asked for. The stages are timed in interleaved
repeats (one sample of every stage per repeat, the best of ``--inner`` calls each) and the
median and minimum over ``--repeats`` are printed: a shared machine makes single timings noisy.

    OMP_NUM_THREADS=1 python benchmarks/augment_profile.py                 # B = 256, 512; 1 and 2 threads
    OMP_NUM_THREADS=1 python benchmarks/augment_profile.py --batch 256 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hardneg.augment import build_augmentation
from hardneg.augment import functional as AF
from hardneg.augment.image import _COLOR_OPS, _JitterSchedule


def stages(B: int, seed: int = 0) -> dict:
    aug = build_augmentation("cifar10")
    aug.cpu_threads = torch.get_num_threads()  # the whole call with the threads being profiled
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g)
    u = torch.rand(B, aug._num_uniforms(), generator=g)
    ws = AF.Workspace()
    n_crop = 2 * aug.attempts + 2
    boxes = AF.sample_crop_boxes(u[:, :n_crop], (32, 32), aug.scale, aug.ratio, aug.attempts)
    flip = u[:, n_crop] < aug.flip_p
    col = n_crop + 2
    apply = u[:, col] < aug.jitter_p
    factors = aug._jitter_factors(u[:, col + 1 : col + 5])
    order_u = u[:, col + 5 : col + 9]
    img = ws.get("input", (B, 3, 32, 32), torch.empty(0)).copy_(x)
    wy, wx = AF.crop_flip_weights(boxes, flip, (32, 32), (32, 32), 1 / 255)
    view = AF.resized_crop(img, wy, wx, ws=ws)
    n = int(apply.sum())
    jit = view[:n].clone()
    fac = factors[:n]
    moved = torch.empty_like(view)
    perm = torch.randperm(B, generator=g)
    gray_idx = (u[:, col + 9] < aug.gray_p).nonzero().squeeze(1)
    gray_buf = torch.empty(len(gray_idx), 3, 32, 32)

    def gray():
        sub = torch.index_select(view, 0, gray_idx, out=gray_buf)
        AF.rgb_to_grayscale(sub, out=sub[:, :1])
        sub[:, 1:].copy_(sub[:, :1].expand(-1, 2, -1, -1))
        view.index_copy_(0, gray_idx, sub)

    out = {
        "crop boxes": lambda: AF.sample_crop_boxes(
            u[:, :n_crop], (32, 32), aug.scale, aug.ratio, aug.attempts
        ),
        "uint8 -> float": lambda: img.copy_(x),
        "crop weights": lambda: AF.crop_flip_weights(boxes, flip, (32, 32), (32, 32), 1 / 255),
        "crop (2 bmm)": lambda: AF.resized_crop(img, wy, wx, out=view, ws=ws),
        "jitter schedule": lambda: _JitterSchedule(apply, order_u, random=True),
        f"brightness ({n} imgs)": lambda: _COLOR_OPS[0](jit, fac[:, 0], ws),
        f"contrast ({n} imgs)": lambda: _COLOR_OPS[1](jit, fac[:, 1], ws),
        f"saturation ({n} imgs)": lambda: _COLOR_OPS[2](jit, fac[:, 2], ws),
        f"hue ({n} imgs)": lambda: _COLOR_OPS[3](jit, fac[:, 3], ws),
        "one regrouping gather (x4)": lambda: torch.index_select(view, 0, perm, out=moved),
        f"grayscale ({len(gray_idx)} imgs)": gray,
        "normalise": lambda: aug.normalize.normalize_(view),
        "whole aug(x), one view": lambda: aug(x, generator=g),
    }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=3)
    args = p.parse_args(argv)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for B in args.batch:
            fns = stages(B)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for f in fns.values():  # warm-up (workspace, lazy initialisation)
                f()
            for _ in range(args.repeats):
                for k, f in fns.items():
                    best = float("inf")
                    for _ in range(args.inner):
                        t = time.perf_counter()
                        f()
                        best = min(best, time.perf_counter() - t)
                    times[k].append(best)
            print(f"\nbatch {B}, {threads} intra-op thread(s): ms, median (min) of {args.repeats}")
            for k, v in times.items():
                print(f"  {k:28s} {1e3 * statistics.median(v):8.3f} ({1e3 * min(v):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
