"""SimCLR-style image augmentation as batched tensor operations on the training device.

One call ``aug(x, generator=None)`` turns a ``uint8 [B, C, H, W]`` batch into one float32,
normalised view ``[B, C, S, S]`` with independent random parameters per sample. The pipeline
(torchvision's SimCLR recipe, in this order):

1. random resized crop + horizontal flip in one per-sample sampling grid and one bilinear
   ``grid_sample``: ``RandomResizedCrop``'s box sampling vectorised (up to 10 tries per sample,
   then the central fallback crop), and the grid clamped to the box, so that the result equals
   torchvision's ``resized_crop`` (bilinear, no antialias) + ``hflip`` to float precision
   (tested). An optional rotation (digits) uses an affine grid instead;
2. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue with
   factors drawn as torchvision's ``ColorJitter``. ``jitter_order="random"`` (default) applies
   the four operations in an independent random order per sample, as a per-image torchvision
   pipeline does; ``"fixed"`` uses the order brightness, contrast, saturation, hue (cheaper);
3. grayscale with probability ``gray_p`` (ITU-R 601-2 luma, replicated over the channels);
4. Gaussian blur with probability ``blur_p``, sigma ~ U(blur_sigma), separable, reflect padding;
5. optional additive Gaussian noise (``noise_std``, in [0, 1] pixel units), clamped to [0, 1];
6. normalisation with the dataset's mean and std.

Every operation is vectorised over the batch (no Python loop over samples, no PIL), parameters
are drawn from one block of uniforms per call (``generator`` makes a call repeatable), and the
colour operations equal torchvision's tensor functions to 1e-5 (tested).

Differences from a PIL/torchvision pipeline (documented, deliberate): intermediate results stay
in float32 instead of being rounded to uint8 after each step, and the crop is resized without
antialiasing (the same as torchvision whenever the crop is enlarged, which is always the case
for CIFAR/STL-10 at their native size; PIL's resize would antialias a crop that is shrunk).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.augment import functional as AF


def _check_pair(name: str, v, low: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(t) for t in v)
    except Exception:  # noqa: BLE001
        raise ValueError(f"{name} must be a pair (low, high), got {v!r}") from None
    if not a <= b or (low is not None and a < low):
        raise ValueError(
            f"{name} must satisfy {low if low is not None else '-inf'} <= low <= high, got {v!r}"
        )
    return a, b


def _check_prob(name: str, p) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return p


def uniforms(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U(0, 1) draws from ``generator`` (on its own device) moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    out = torch.rand(shape, generator=generator, device=generator.device)
    return out.to(device, non_blocking=True)


def normals(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


@contextmanager
def intra_op_threads(n: int | None, device: torch.device) -> Iterator[None]:
    """Temporarily run CPU ops with ``n`` intra-op threads (``None``: leave as is).

    The augmentations issue ~100 small elementwise kernels per call; with several OpenMP threads
    on a CPU shared with other processes every kernel ends in a barrier that waits for a
    descheduled thread, which made a 2-thread call 10-50x slower than a 1-thread call on the
    (busy) 2-core development machine. On CUDA this does nothing.
    """
    if n is None or device.type != "cpu" or torch.get_num_threads() == n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float input is taken as already in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().mul_(1.0 / 255.0)
    if x.is_floating_point():
        return x.float()
    raise ValueError(f"expected a uint8 (or float in [0, 1]) image batch, got {x.dtype}")


class Normalize(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        if (std <= 0).any():
            raise ValueError(f"std must be positive, got {std.flatten().tolist()}")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"normalisation has {self.mean.shape[0]} channel(s), the batch has {x.shape[1]}"
            )
        scale = (1.0 / self.std).to(x.device)
        shift = (-self.mean / self.std).to(x.device)
        return torch.addcmul(shift, x, scale)


_COLOR_OPS = (AF.adjust_brightness_, AF.adjust_contrast_, AF.adjust_saturation_, AF.adjust_hue_)


class ImageAugmentation(nn.Module):
    """One random view per call; see the module docstring for the pipeline.

    size: output side (``None``: the input's height). scale/ratio: ``RandomResizedCrop``'s.
    jitter: (brightness, contrast, saturation, hue) strengths as in ``ColorJitter``.
    rotation: maximum absolute angle in degrees (0 = none). padding_mode: how points outside
    the image are filled (``"border"``: replicate, ``"zeros"``: black).
    """

    def __init__(
        self,
        size: int | None,
        mean,
        std,
        *,
        scale=(0.08, 1.0),
        ratio=(3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        jitter_order: str = "random",
        gray_p: float = 0.2,
        blur_p: float = 0.0,
        blur_kernel: int | None = None,
        blur_sigma=(0.1, 2.0),
        rotation: float = 0.0,
        noise_std: float = 0.0,
        padding_mode: str = "border",
        attempts: int = 10,
    ) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        self.size = None if size is None else int(size)
        self.scale = _check_pair("scale", scale, 0.0)
        if self.scale[1] > 1.0 or self.scale[1] <= 0:
            raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
        self.ratio = _check_pair("ratio", ratio, 1e-6)
        self.flip_p = _check_prob("flip_p", flip_p)
        try:
            jitter = tuple(float(j) for j in jitter)
        except Exception:  # noqa: BLE001
            raise ValueError(f"jitter must be 4 numbers (b, c, s, h), got {jitter!r}") from None
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                f"jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {jitter!r}"
            )
        self.jitter = jitter
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        if jitter_order not in ("random", "fixed"):
            raise ValueError(f"jitter_order must be 'random' or 'fixed', got {jitter_order!r}")
        self.jitter_order = jitter_order
        self.gray_p = _check_prob("gray_p", gray_p)
        self.blur_p = _check_prob("blur_p", blur_p)
        if blur_kernel is not None and (int(blur_kernel) != blur_kernel or blur_kernel < 1):
            raise ValueError(f"blur_kernel must be a positive integer or None, got {blur_kernel!r}")
        self.blur_kernel = None if blur_kernel is None else int(blur_kernel)
        self.blur_sigma = _check_pair("blur_sigma", blur_sigma, 1e-6)
        self.rotation = float(rotation)
        if self.rotation < 0:
            raise ValueError(f"rotation must be >= 0 degrees, got {rotation!r}")
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if padding_mode not in ("border", "zeros", "reflection"):
            raise ValueError(
                f"padding_mode must be border, zeros or reflection, got {padding_mode!r}"
            )
        self.padding_mode = padding_mode
        self.attempts = int(attempts)
        self.normalize = Normalize(mean, std)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, "
            f"flip_p={self.flip_p}, jitter={self.jitter}, jitter_p={self.jitter_p}, "
            f"jitter_order={self.jitter_order!r}, gray_p={self.gray_p}, blur_p={self.blur_p}, "
            f"blur_kernel={self.blur_kernel}, blur_sigma={self.blur_sigma}, "
            f"rotation={self.rotation}, noise_std={self.noise_std}"
        )

    def kernel_size(self, size: int) -> int:
        """SimCLR: 10% of the image side, made odd (at least 3)."""
        if self.blur_kernel is not None:
            return self.blur_kernel
        k = int(0.1 * size)
        return max(3, k + 1 - k % 2)

    # Layout of the per-sample uniform draws (one block per call, so a generator's stream is
    # consumed identically whatever the data and the chunking).
    def _num_uniforms(self) -> int:
        return 2 * self.attempts + 2 + 1 + 1 + 1 + 4 + 4 + 1 + 1 + 1 + 1

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.normalize.mean.shape[0]:
            raise ValueError(
                f"this augmentation normalises {self.normalize.mean.shape[0]} channel(s); "
                f"the batch has {C} channel(s)"
            )
        S = self.size if self.size is not None else H
        dev = x.device
        if B == 0:
            return torch.empty(0, C, S, S, device=dev)
        u = uniforms((B, self._num_uniforms()), generator, dev)
        noise = normals((B, C, S, S), generator, dev) if self.noise_std > 0 else None
        chunk = self.chunk_size if dev.type == "cpu" else None
        with intra_op_threads(self.cpu_threads, dev):
            if not chunk or B <= chunk:
                return self._augment(x, u, noise, S)
            out = torch.empty(B, C, S, S, device=dev)
            for i in range(0, B, chunk):
                j = min(B, i + chunk)
                out[i:j] = self._augment(x[i:j], u[i:j], None if noise is None else noise[i:j], S)
            return out

    #: Intra-op threads for the augmentation of CPU tensors (see :func:`intra_op_threads`);
    #: ``None`` uses torch's setting. Default 1: robust on shared machines, and on the 2-core
    #: development machine one thread was faster than two even when the other core was idle
    #: half of the time (``benchmarks/train_throughput.py --aug-threads``).
    cpu_threads: int | None = 1

    #: On CPU, process the batch in chunks of this many images (bounds the memory of the
    #: intermediate tensors for large images). ``None`` (default): one pass over the whole
    #: batch, which was faster for 32 px images on the development machine (per-op overhead
    #: dominates small chunks). Results do not depend on it (every operation is per sample).
    chunk_size: int | None = None

    def _augment(self, x: Tensor, u: Tensor, noise: Tensor | None, S: int) -> Tensor:
        B, C, H, W = x.shape
        n_crop = 2 * self.attempts + 2
        boxes = AF.sample_crop_boxes(u[:, :n_crop], (H, W), self.scale, self.ratio, self.attempts)
        col = n_crop
        flip = u[:, col] < self.flip_p
        col += 1
        angle = None
        if self.rotation > 0:
            angle = (2.0 * u[:, col] - 1.0) * (self.rotation * torch.pi / 180.0)
        col += 1

        img = x.float() if x.dtype == torch.uint8 else to_unit_float(x) * 255.0
        if angle is None:
            grid = AF.crop_flip_grid(boxes, flip, (H, W), (S, S))
        else:
            grid = F.affine_grid(
                AF.crop_flip_theta(boxes, flip, (H, W), angle), [B, C, S, S], align_corners=False
            )
        out = AF.resample_grid(img, grid, padding_mode=self.padding_mode)
        out.mul_(1.0 / 255.0)  # bilinear weights are convex: stays in [0, 1]

        # Colour jitter.
        apply_jitter = u[:, col] < self.jitter_p
        col += 1
        fu = u[:, col : col + 4]  # factor draws
        col += 4
        ou = u[:, col : col + 4]  # order draws
        col += 4
        if self.jitter_p > 0 and any(self.jitter):
            out = self._color_jitter(out, apply_jitter, fu, ou)

        gray = u[:, col] < self.gray_p
        col += 1
        if self.gray_p > 0 and C == 3:
            idx = gray.nonzero().squeeze(1)
            if idx.numel():
                luma = AF.rgb_to_grayscale(out.index_select(0, idx)).expand(-1, C, -1, -1)
                out.index_copy_(0, idx, luma.contiguous())

        blur = u[:, col] < self.blur_p
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, col + 1]
        col += 2
        if self.blur_p > 0:
            k = self.kernel_size(S)
            idx = blur.nonzero().squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, AF.gaussian_blur(out.index_select(0, idx), sigma[idx], k))

        if noise is not None:
            out = out.add_(noise, alpha=self.noise_std).clamp_(0.0, 1.0)
        return self.normalize(out)

    def _color_jitter(self, out: Tensor, apply: Tensor, fu: Tensor, ou: Tensor) -> Tensor:
        b, c, s, h = self.jitter
        factors = torch.stack(
            [
                max(0.0, 1.0 - b) + (1.0 + b - max(0.0, 1.0 - b)) * fu[:, 0],
                max(0.0, 1.0 - c) + (1.0 + c - max(0.0, 1.0 - c)) * fu[:, 1],
                max(0.0, 1.0 - s) + (1.0 + s - max(0.0, 1.0 - s)) * fu[:, 2],
                -h + 2.0 * h * fu[:, 3],
            ],
            dim=1,
        )
        enabled = [i for i, v in enumerate(self.jitter) if v > 0]
        if out.shape[1] == 1:
            enabled = [i for i in enabled if i < 2]  # saturation / hue: no-ops on gray images
        idx = apply.nonzero().squeeze(1)
        if not enabled or idx.numel() == 0:
            return out
        sub = out.index_select(0, idx)
        fac = factors.index_select(0, idx)
        if self.jitter_order == "fixed":
            for op in enabled:
                sub = _COLOR_OPS[op](sub, fac[:, op])
        else:
            sub, fac = self._random_order(sub, fac, ou.index_select(0, idx), enabled)
            # _random_order returns the samples permuted; fac[:, 4] holds their positions
            idx = idx.index_select(0, fac[:, 4].long())
        out.index_copy_(0, idx, sub)
        return out

    @staticmethod
    def _random_order(sub: Tensor, fac: Tensor, ou: Tensor, enabled: list[int]):
        """Apply the ops in an independent random order per sample.

        At stage k the samples are sorted by the op they get at that stage, so that each op
        runs once on a contiguous slice: every op still runs once per sample (no 4x cost), for
        4 batch permutations. Returns the samples in their final permutation, with the
        original positions appended to ``fac`` as column 4.
        """
        n = sub.shape[0]
        order = torch.argsort(ou, dim=1)  # order[:, k] = op applied at stage k
        pos = torch.arange(n, device=sub.device, dtype=fac.dtype).view(-1, 1)
        fac = torch.cat([fac, pos], dim=1)
        for k in range(4):
            key = order[:, k]
            perm = torch.argsort(key, stable=True)
            sub = sub.index_select(0, perm)
            fac = fac.index_select(0, perm)
            order = order.index_select(0, perm)
            counts = torch.bincount(key, minlength=4).tolist()
            start = 0
            for op, cnt in enumerate(counts):
                if cnt and op in enabled:
                    sl = slice(start, start + cnt)
                    _COLOR_OPS[op](sub[sl], fac[sl, op])  # in place on the slice
                start += cnt
        return sub, fac


class EvalTransform(nn.Module):
    """Deterministic: uint8 -> [0, 1] float -> optional resize (bilinear, antialiased) ->
    normalise. ``size=None`` keeps the input size."""

    def __init__(self, size: int | None, mean, std) -> None:
        super().__init__()
        self.size = None if size is None else int(size)
        self.normalize = Normalize(mean, std)

    def extra_repr(self) -> str:
        return f"size={self.size}"

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        out = to_unit_float(x)
        if self.size is not None and tuple(out.shape[-2:]) != (self.size, self.size):
            out = torch.nn.functional.interpolate(
                out,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).clamp_(0.0, 1.0)
        return self.normalize(out)
