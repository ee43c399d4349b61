"""SimCLR-style image augmentation as batched tensor operations on the training device.

One call ``aug(x, generator=None)`` turns a ``uint8 [B, C, H, W]`` batch into one float32,
normalised view ``[B, C, S, S]`` with independent random parameters per sample. The pipeline
(torchvision's SimCLR recipe, in this order):

1. random resized crop + horizontal flip as one separable bilinear resample per sample,
   ``out[c] = Wy @ x[c] @ Wx^T`` (two batched matmuls; the rows of ``Wy`` / ``Wx`` hold the
   bilinear weights of the output pixels' sample positions in the box, clamped to the box;
   the flip mirrors ``Wx``; the uint8 -> [0, 1] scaling is folded into ``Wx``):
   ``RandomResizedCrop``'s box sampling vectorised (up to 10 tries per sample, then the central
   fallback crop), and the result equals torchvision's ``resized_crop`` (bilinear, no
   antialias) + ``hflip`` to float precision (tested). An optional rotation (digits) uses an
   affine ``grid_sample`` instead;
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
colour operations equal torchvision's tensor functions to 1e-5 (tested, also image by image
with each image's own random order).

Cost (CPU): the random jitter order costs three gathers of the batch (the rows are regrouped
by the op they get at each stage, :class:`_JitterSchedule`), not four times the arithmetic; the
intermediate tensors live in a :class:`~hardneg.augment.functional.Workspace` reused from call
to call (fresh multi-megabyte temporaries cost page faults); only the returned view is new
memory. About 11-13 ms per view of 256 CIFAR images on one core of the development machine.

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

from hardneg._checks import check_number
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

    def _scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"normalisation has {self.mean.shape[0]} channel(s), the batch has {x.shape[1]}"
            )
        return (1.0 / self.std).to(x.device), (-self.mean / self.std).to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._scale_shift(x)
        return torch.addcmul(shift, x, scale)

    def normalize_(self, x: Tensor) -> Tensor:
        """In place, ``x * (1 / std) + (-mean / std)`` (the same arithmetic as ``forward``)."""
        scale, shift = self._scale_shift(x)
        return x.mul_(scale).add_(shift)


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
        # check_number, not float(): float() let NaN (a NaN batch) and true through
        self.rotation = check_number("rotation (degrees)", rotation, low=0.0)
        self.noise_std = check_number("noise_std", noise_std, low=0.0)
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
        out = torch.empty(B, C, S, S, device=dev)
        ws = self._workspace(dev)
        try:
            with intra_op_threads(self.cpu_threads, dev):
                step = chunk if chunk else B
                for i in range(0, B, step):
                    j = min(B, i + step)
                    n_ij = None if noise is None else noise[i:j]
                    self._augment(x[i:j], u[i:j], n_ij, S, out[i:j], ws)
        finally:
            if ws.reuse:
                ws.release()
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

    #: On CPU, keep the intermediate tensors in a :class:`~hardneg.augment.functional.Workspace`
    #: between calls (about 6 float tensors of the batch's size: 18 MB for 256 CIFAR images,
    #: 160 MB at 96 px; ``chunk_size`` bounds it). Fresh 3 MB temporaries cost page faults
    #: that more than doubled the time per call. ``False``: allocate per call.
    #: :meth:`release_buffers` frees the memory.
    reuse_buffers: bool = True

    def _workspace(self, dev: torch.device) -> AF.Workspace:
        if dev.type != "cpu" or not self.reuse_buffers:
            return AF.Workspace(reuse=False)
        ws = self.__dict__.get("_ws")
        if ws is None:
            ws = self.__dict__["_ws"] = AF.Workspace()
        # concurrent calls (threads) on one module: the later ones allocate their own
        return ws if ws.try_acquire() else AF.Workspace(reuse=False)

    def release_buffers(self) -> None:
        """Free the reused CPU buffers (they are re-created on the next call)."""
        ws = self.__dict__.get("_ws")
        if ws is not None:
            ws.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_ws", None)  # scratch memory is not state
        return state

    def _augment(
        self, x: Tensor, u: Tensor, noise: Tensor | None, S: int, out: Tensor, ws: AF.Workspace
    ) -> Tensor:
        """One view of ``x`` written into ``out`` ``[B, C, S, S]`` (float32, normalised).

        With colour jitter, the images are processed in a row order of their own per jitter
        stage (:class:`_JitterSchedule`): the crop writes them in stage 0's order, each later
        stage gathers them into its order, and a last gather restores the batch order.
        """
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
        apply_jitter = u[:, col] < self.jitter_p
        fu = u[:, col + 1 : col + 5]  # factor draws
        ou = u[:, col + 5 : col + 9]  # order draws
        col += 9
        sched = None
        if self.jitter_p > 0 and any(self._enabled_jitter(C)):
            sched = _JitterSchedule(apply_jitter, ou, self.jitter_order == "random")
        if sched is not None:  # the crop writes the images in stage 0's row order
            rows = sched.arrangement[0]
            x, boxes, flip = x.index_select(0, rows), boxes[rows], flip[rows]
            angle = None if angle is None else angle[rows]
            buf = ws.get("jitter_a", (B, C, S, S), out)
        else:
            buf = out

        if x.dtype == torch.uint8:
            scale = 1.0 / 255.0  # folded into the interpolation weights
        else:
            to_unit_float(x[:0])  # dtype check
            scale = 1.0
        img = ws.get("input", (B, C, H, W), out).copy_(x)
        if angle is None:
            wy, wx = AF.crop_flip_weights(boxes, flip, (H, W), (S, S), scale)
            AF.resized_crop(img, wy, wx, out=buf, ws=ws)
        else:
            grid = F.affine_grid(
                AF.crop_flip_theta(boxes, flip, (H, W), angle), [B, C, S, S], align_corners=False
            )
            # bilinear weights are convex: stays in [0, 1]
            buf.copy_(AF.resample_grid(img, grid, padding_mode=self.padding_mode)).mul_(scale)

        if sched is not None:
            self._color_jitter(buf, sched, self._jitter_factors(fu), out, ws)

        gray = u[:, col] < self.gray_p
        col += 1
        if self.gray_p > 0 and C == 3:
            idx = gray.nonzero().squeeze(1)
            if idx.numel():
                sub = ws.get("gray", (idx.numel(), C, S, S), out)
                sub = torch.index_select(out, 0, idx, out=sub)
                AF.rgb_to_grayscale(sub, out=sub[:, :1])  # luma into channel 0 (read first)
                sub[:, 1:].copy_(sub[:, :1].expand(-1, C - 1, -1, -1))
                out.index_copy_(0, idx, sub)

        blur = u[:, col] < self.blur_p
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, col + 1]
        col += 2
        if self.blur_p > 0:
            k = self.kernel_size(S)
            idx = blur.nonzero().squeeze(1)
            if idx.numel():
                out.index_copy_(0, idx, AF.gaussian_blur(out.index_select(0, idx), sigma[idx], k))

        if noise is not None:
            out.add_(noise, alpha=self.noise_std).clamp_(0.0, 1.0)
        return self.normalize.normalize_(out)

    def _enabled_jitter(self, channels: int) -> list[int]:
        enabled = [i for i, v in enumerate(self.jitter) if v > 0]
        if channels == 1:
            enabled = [i for i in enabled if i < 2]  # saturation / hue: no-ops on gray images
        return enabled

    def _jitter_factors(self, fu: Tensor) -> Tensor:
        """``ColorJitter``'s factors ``[B, 4]`` (brightness, contrast, saturation: U(max(0,
        1 - v), 1 + v); hue shift: U(-h, h)) from uniforms ``fu``."""
        lo = tuple(max(0.0, 1.0 - v) for v in self.jitter[:3]) + (-self.jitter[3],)
        hi = tuple(1.0 + v for v in self.jitter[:3]) + (self.jitter[3],)
        width = tuple(b - a for a, b in zip(lo, hi))
        return torch.addcmul(AF._constant(lo, fu), fu, AF._constant(width, fu))

    def _color_jitter(
        self, buf: Tensor, sched: _JitterSchedule, factors: Tensor, out: Tensor, ws: AF.Workspace
    ) -> Tensor:
        """Jitter ``buf`` (images in ``sched``'s stage-0 row order) and write the result in
        batch order into ``out``. ``buf`` must not be ``out``."""
        enabled = self._enabled_jitter(buf.shape[1])
        fac = factors[sched.arrangement]  # [4, B, 4]: the factors in each stage's row order
        names = ("jitter_b", "jitter_a")  # ping-pong: index_select cannot write in place
        for k in range(4):
            if k > 0 and sched.moves[k - 1] is not None:
                nxt = ws.get(names[k % 2], buf.shape, buf)
                if nxt.data_ptr() == buf.data_ptr():  # workspace without reuse
                    nxt = torch.empty_like(buf)
                buf = torch.index_select(buf, 0, sched.moves[k - 1], out=nxt)
            start = 0
            for op, cnt in enumerate(sched.counts[k]):
                if cnt and op in enabled:
                    sl = slice(start, start + cnt)
                    _COLOR_OPS[op](buf[sl], fac[k, sl, op], ws)  # in place on the rows
                start += cnt
        return torch.index_select(buf, 0, sched.restore, out=out)


class _JitterSchedule:
    """Row orders for applying the colour ops in a per-sample order with one call per op and
    stage.

    ``op[k, i]``: the op (0-3: brightness, contrast, saturation, hue) that sample i gets at
    stage k (``argsort`` of its order draws for ``random``; ``k`` for the fixed order), 4 where
    the sample is not jittered. At stage k the rows are the samples sorted by ``op[k]``
    (``arrangement[k]``, stable), so that every op runs once, on a contiguous block of rows of
    ``counts[k][op]`` samples. ``moves[k]`` gathers stage k's rows into stage k + 1's order
    (``None``: unchanged), ``restore`` gathers the last stage's rows into batch order. Every op
    still runs once per jittered sample: the random order costs 3 gathers of the batch, not 4x
    the arithmetic.
    """

    def __init__(self, apply: Tensor, order_u: Tensor, random: bool) -> None:
        B = apply.shape[0]
        dev = apply.device
        if random:
            op = torch.argsort(order_u, dim=1).T  # [4, B]: op at stage k
        else:
            op = torch.arange(4, device=dev).view(4, 1).expand(4, B)
        op = torch.where(apply.view(1, B), op, torch.full_like(op, 4))
        self.arrangement = torch.argsort(op, dim=1, stable=True)  # [4, B]
        ar = torch.arange(B, device=dev).expand(4, B)
        position = torch.empty_like(self.arrangement).scatter_(1, self.arrangement, ar)
        self.counts = F.one_hot(op, 5).sum(1).tolist()  # [4][5]
        self.moves = [
            None if not random else position[k].index_select(0, self.arrangement[k + 1])
            for k in range(3)
        ]
        self.restore = position[3]


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
