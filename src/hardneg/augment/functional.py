"""Batched, per-sample image operations on float tensors ``[B, C, H, W]`` with values in [0, 1].

Everything here is vectorised over the batch: per-sample parameters come in as tensors of
shape ``[B]`` (or ``[B, ...]``), there are no Python loops over samples. The colour operations
follow torchvision's tensor implementations (``adjust_brightness``/``contrast``/``saturation``/
``hue``, ``rgb_to_grayscale``) so that one sample with the same factor gives the same result up
to float rounding.

Formulations (each tested against torchvision):

* resized crop + flip, separable: per sample, ``out[c] = Wy @ x[c] @ Wx^T`` with interpolation
  matrices ``W[k, i] = max(0, 1 - |i - p_k|)`` (the bilinear "hat" weights ``1 - frac`` and
  ``frac`` on the two pixels around the sample position ``p_k = left + (k + 1/2) * width / S -
  1/2``, clamped to the box). Two batched matmuls; exactly bilinear ``grid_sample`` /
  torchvision's ``resized_crop`` without antialiasing.
* contrast: the mean of the luma is the luma of the channel means, ``sum_c w_c mean(x_c)``.
* hue (torchvision: RGB -> HSV, ``h <- (h + shift) mod 1``, HSV -> RGB), without forming H, S
  and V separately. With ``M = max``, ``C = M - min`` and the sector hue ``h6 = 6 h``:
  ``h6 = [(g - b) + n_r (3b - s + 2C + n_g (3r - s + 2C))] / C`` where ``s = r + g + b`` and
  ``n_r``, ``n_g`` are 0 where R (G) is the maximum and 1 elsewhere (ties resolve to R, then G,
  as torchvision); this is ``(g-b)/C``, ``2 + (b-r)/C`` or ``4 + (r-g)/C`` by sector, in
  ``[-1, 5]``. Back: channel ``c = M - C w(h6 + o_c)`` with the trapezoid
  ``w(k) = clamp(2 - d(k, 2), 0, 1)``, ``d`` the distance to 2 modulo 6, and per-sample offsets
  ``o_c = (n_c + 6 shift) mod 6`` (``n = 5, 3, 1`` for R, G, B). As ``k = h6 + o_c`` lies in
  ``[-1, 11]``, ``d = min(|k - 2|, |k - 8|) = ||k - 5| - 3|``, so that
  ``c = (M - 2C) + C clamp(d, 1, 2)``: no per-pixel modulo, comparison or ``where``.

The in-place variants (``op_``) take an optional :class:`Workspace` for their temporaries.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L").
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


class Workspace:
    """Named scratch tensors, reused from call to call.

    Why: one float tensor of 256 CIFAR images is 3 MB. glibc serves blocks that large from
    fresh pages (``mmap``, or heap it has just trimmed back to the OS), and the page faults of
    touching fresh pages cost more than the arithmetic of the augmentation: the previous
    version of the pipeline ran at 33 ms per view of 256 CIFAR images with fresh temporaries
    and at 14 ms with glibc told not to give memory back (2-core development machine). ``reuse=False``: every request is a new tensor.

    ``get`` hands out a view of a buffer that is reallocated only when it is too small; a name
    must therefore not be requested again while a tensor obtained under it is still in use.
    One caller at a time: :meth:`try_acquire` / :meth:`release` guard against concurrent use.
    Pickling / deep-copying gives an empty workspace.
    """

    def __init__(self, reuse: bool = True) -> None:
        self.reuse = bool(reuse)
        self._bufs: dict[str, Tensor] = {}
        self._views: dict[tuple, Tensor] = {}  # (name, shape) -> view: no per-call view ops
        self._lock = threading.Lock()

    def __reduce__(self):
        return (Workspace, (self.reuse,))

    def get(self, name: str, shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = like.dtype if dtype is None else dtype
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=like.device)
        key = (name, tuple(shape), dtype, like.device)
        view = self._views.get(key)
        if view is not None:
            return view
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=dtype, device=like.device)
            self._bufs[name] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != name}
        view = self._views[key] = buf[:numel].view(shape)
        return view

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()

    def clear(self) -> None:
        self._bufs.clear()
        self._views.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


_FRESH = Workspace(reuse=False)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    if v.dtype != x.dtype:
        v = v.to(dtype=x.dtype)
    return v.view(-1, *([1] * (x.ndim - 1)))


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(values: tuple[float, ...], like: Tensor) -> Tensor:
    """A small constant tensor on ``like``'s device and dtype, created once."""
    key = (values, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t


def rgb_to_grayscale(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``[B, 3, H, W] -> [B, 1, H, W]``; 1-channel input is returned unchanged."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    if out is None:
        out = torch.empty(x.shape[0], 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    torch.mul(r, GRAY_WEIGHTS[0], out=out[:, 0])
    return out.add_(g.unsqueeze(1), alpha=GRAY_WEIGHTS[1]).add_(
        b.unsqueeze(1), alpha=GRAY_WEIGHTS[2]
    )


def _gray_mean(x: Tensor) -> Tensor:
    """Per-sample mean of the luma ``[B, 1, 1, 1]``: the luma of the channel means."""
    m = x.mean(dim=(2, 3))
    if x.shape[1] == 3:
        m = m @ _constant(GRAY_WEIGHTS, x)
    return m.view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return adjust_brightness_(x.clone(), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return adjust_contrast_(x.clone(), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return adjust_saturation_(x.clone(), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (in turns, [-0.5, 0.5]) per sample, keeping HSV saturation
    and value (torchvision's ``adjust_hue``; formula in the module docstring)."""
    return adjust_hue_(x.clone(), shift)


# In-place variants (``x`` is overwritten and returned): the batched pipeline applies them to
# slices of one buffer, which saves an allocation and a copy per operation.


def adjust_brightness_(x: Tensor, factor: Tensor, ws: Workspace | None = None) -> Tensor:
    return x.mul_(_bcast(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x: Tensor, factor: Tensor, ws: Workspace | None = None) -> Tensor:
    f = _bcast(factor, x)
    mean = _gray_mean(x).mul_(1.0 - f)
    return x.mul_(f).add_(mean).clamp_(0.0, 1.0)


def adjust_saturation_(x: Tensor, factor: Tensor, ws: Workspace | None = None) -> Tensor:
    if x.shape[1] == 1:
        return x
    ws = ws or _FRESH
    f = _bcast(factor, x)
    gray = ws.get("sat_gray", (x.shape[0], 1, *x.shape[2:]), x)
    gray = rgb_to_grayscale(x, out=gray).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def _hue6(x: Tensor, ws: Workspace) -> tuple[Tensor, Tensor, Tensor]:
    """(6 * hue in [-1, 5], max, chroma) of RGB ``x``, each ``[B, H, W]`` (module docstring)."""
    n, _, h, w = x.shape
    plane = (n, h, w)
    r, g, b = x.unbind(1)
    maxc = torch.amax(x, dim=1, out=ws.get("hue_max", plane, x))
    chroma = torch.amin(x, dim=1, out=ws.get("hue_chroma", plane, x))
    chroma = torch.sub(maxc, chroma, out=chroma)
    # sign(max - x) is exactly 0 where the channel is the maximum and 1 elsewhere
    not_max = ws.get("hue_notmax", (n, 2, h, w), x)
    not_max = torch.sub(maxc.unsqueeze(1), x[:, :2], out=not_max).sign_()
    n_r, n_g = not_max.unbind(1)
    # numerator (g - b) + n_r (3b - a + n_g (3r - a)), a = s - 2C, with the signs of the
    # inner terms flipped so that every step is one sub / addcmul
    a = torch.sum(x, dim=1, out=ws.get("hue_a", plane, x)).sub_(chroma, alpha=2.0)
    t = torch.sub(a, r, alpha=3.0, out=ws.get("hue_t", plane, x))  # a - 3r
    t = torch.addcmul(a.sub_(b, alpha=3.0), n_g, t, out=t)  # (a - 3b) + n_g (a - 3r)
    h6 = torch.sub(g, b, out=a)
    h6 = torch.addcmul(h6, n_r, t, value=-1.0, out=h6)
    # achromatic pixels have a zero numerator (n_r = 0, g = b): any positive divisor will do
    return h6.div_(torch.clamp(chroma, min=torch.finfo(x.dtype).tiny, out=t)), maxc, chroma


def _from_hue6_(
    out: Tensor, h6: Tensor, maxc: Tensor, chroma: Tensor, offsets: Tensor, ws: Workspace
) -> Tensor:
    """``out[:, c] = max - chroma * w(k)``, ``k = h6 + offsets[:, c]`` in [-1, 11], written as
    ``(max - 2 chroma) + chroma * clamp(d, 1, 2)`` with the distance of k to 2 modulo 6,
    ``d = min(|k - 2|, |k - 8|) = ||k - 5| - 3|``. ``offsets``: ``[B, 3]`` in [0, 6).
    Overwrites ``maxc``."""
    n, c, h, w = out.shape
    k = ws.get("hue_k", (n, c, h, w), out)
    k = torch.add(h6.unsqueeze(1), offsets.view(n, c, 1, 1) - 5.0, out=k)
    dist = k.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    base = torch.sub(maxc, chroma, alpha=2.0, out=maxc)
    return torch.addcmul(base.unsqueeze(1), chroma.unsqueeze(1), dist, out=out)


_HUE_N = (5.0, 3.0, 1.0)


def adjust_hue_(x: Tensor, shift: Tensor, ws: Workspace | None = None) -> Tensor:
    if x.shape[1] == 1:
        return x
    ws = ws or _FRESH
    h6, maxc, chroma = _hue6(x, ws)
    shift = shift if shift.dtype == h6.dtype else shift.to(h6.dtype)
    offsets = torch.remainder(torch.add(_constant(_HUE_N, h6), shift.view(-1, 1), alpha=6.0), 6.0)
    return _from_hue6_(x, h6, maxc, chroma, offsets, ws).clamp_(0.0, 1.0)


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in [0, 1), saturation, value; each ``[B, H, W]`` (torchvision's formula)."""
    h6, maxc, chroma = _hue6(x, _FRESH)
    s = chroma / torch.where(chroma > 0, maxc, torch.ones_like(maxc))
    return torch.remainder(h6, 6.0) / 6.0, s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv` (``h`` in [0, 1))."""
    out = torch.empty(h.shape[0], 3, *h.shape[1:], dtype=h.dtype, device=h.device)
    offsets = torch.tensor(_HUE_N, dtype=h.dtype, device=h.device).expand(h.shape[0], 3)
    return _from_hue6_(out, 6.0 * h, v.clone(), v * s, offsets, _FRESH)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels ``[B, k]`` (one per sigma)."""
    half = (kernel_size - 1) / 2.0
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` ``[B]``; reflect padding (as
    torchvision's ``gaussian_blur`` and OpenCV's default BORDER_REFLECT_101)."""
    if kernel_size < 2:
        return x
    b, c, h, w = x.shape
    kern = gaussian_kernels(sigma.to(x.dtype), kernel_size)  # [B, k]
    kern = kern.repeat_interleave(c, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    y = x.reshape(1, b * c, h, w)
    if pad >= h or pad >= w:
        raise ValueError(f"blur kernel {kernel_size} too large for {h}x{w} images")
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, kernel_size, 1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, 1, kernel_size), groups=b * c)
    return y.view(b, c, h, w)


def crop_flip_theta(
    boxes: Tensor, flip: Tensor, in_hw: tuple[int, int], angle: Tensor | None = None
) -> Tensor:
    """Affine matrices ``[B, 2, 3]`` for ``F.affine_grid(..., align_corners=False)`` that map the
    output image onto the crop box ``(top, left, height, width)`` (pixels, float) of the input,
    mirrored horizontally where ``flip`` is true and rotated by ``angle`` (radians) about the
    box centre. Output pixel k then samples input pixel ``left + (k + 0.5) * width / S - 0.5``,
    which is what resizing the crop (half-pixel centres) does."""
    H, W = in_hw
    top, left, height, width = boxes.unbind(1)
    sx = width / W
    sy = height / H
    cx = (left + width / 2.0) * (2.0 / W) - 1.0
    cy = (top + height / 2.0) * (2.0 / H) - 1.0
    sign = 1.0 - 2.0 * flip.to(boxes.dtype)
    theta = torch.zeros(boxes.shape[0], 2, 3, device=boxes.device, dtype=boxes.dtype)
    if angle is None:
        theta[:, 0, 0] = sx * sign
        theta[:, 1, 1] = sy
    else:
        # Rotation in pixel units (so non-square boxes are not sheared): the input offset in
        # pixels is R(angle) @ (sign * u_x * width / 2, u_y * height / 2), u = output offset.
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta[:, 0, 0] = sx * cos * sign
        theta[:, 0, 1] = -sin * height / W
        theta[:, 1, 0] = sin * sign * width / H
        theta[:, 1, 1] = sy * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def _crop_positions(boxes: Tensor, flip: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Input rows ``[B, Ho]`` and columns ``[B, Wo]`` (pixel units, float) sampled by the output
    pixels: ``left + (k + 0.5) * width / Wo - 0.5`` clamped to the box, mirrored where
    ``flip`` (k -> Wo - 1 - k)."""
    Ho, Wo = out_hw
    top, left, height, width = (t.unsqueeze(1) for t in boxes.unbind(1))
    kx = torch.arange(Wo, device=boxes.device, dtype=boxes.dtype).view(1, -1) + 0.5
    ky = torch.arange(Ho, device=boxes.device, dtype=boxes.dtype).view(1, -1) + 0.5
    kx = torch.where(flip.view(-1, 1), Wo - kx, kx)
    px = torch.minimum(torch.maximum(left + kx * (width / Wo) - 0.5, left), left + width - 1)
    py = torch.minimum(torch.maximum(top + ky * (height / Ho) - 0.5, top), top + height - 1)
    return py, px


def crop_flip_grid(
    boxes: Tensor, flip: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]
) -> Tensor:
    """Sampling grid ``[B, Ho, Wo, 2]`` (for ``grid_sample(..., align_corners=False)``) that
    resizes the crop box ``(top, left, height, width)`` of each sample to ``out_hw``, mirrored
    where ``flip``. Output pixel k samples input pixel ``left + (k + 0.5) * width / Wo - 0.5``
    clamped to the box, which is exactly torchvision's ``resized_crop`` (crop, then bilinear
    resize with half-pixel centres and edge clamping, no antialias)."""
    H, W = in_hw
    Ho, Wo = out_hw
    py, px = _crop_positions(boxes, flip, out_hw)
    gx = (2.0 * px + 1.0) / W - 1.0
    gy = (2.0 * py + 1.0) / H - 1.0
    B = boxes.shape[0]
    return torch.stack([gx.unsqueeze(1).expand(B, Ho, Wo), gy.unsqueeze(2).expand(B, Ho, Wo)], -1)


def _hat_weights(pos: Tensor, n: int, scale: float) -> Tensor:
    """``[B, K] -> [B, K, n]``: ``scale * max(0, 1 - |i - pos|)``, the bilinear weights of
    pixels ``i = 0..n-1`` for the sample positions ``pos`` (in [0, n - 1])."""
    i = torch.arange(n, device=pos.device, dtype=pos.dtype)
    w = (pos.unsqueeze(2) - i).abs_().neg_().add_(1.0).clamp_(min=0.0)
    return w.mul_(scale) if scale != 1.0 else w


def crop_flip_weights(
    boxes: Tensor,
    flip: Tensor,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Interpolation matrices ``(wy [B, Ho, H], wx [B, Wo, W])`` of the crop + resize + flip of
    :func:`crop_flip_grid`; ``wx`` is multiplied by ``scale`` (e.g. 1/255 to fold the uint8
    scaling in). Use with :func:`resized_crop`."""
    py, px = _crop_positions(boxes, flip, out_hw)
    return _hat_weights(py, in_hw[0], 1.0), _hat_weights(px, in_hw[1], scale)


def resized_crop(
    x: Tensor, wy: Tensor, wx: Tensor, out: Tensor | None = None, ws: Workspace | None = None
) -> Tensor:
    """``out[b, c] = wy[b] @ x[b, c] @ wx[b]^T`` for float ``x [B, C, H, W]``: the separable
    bilinear resample of :func:`crop_flip_weights`, as two batched matmuls (rows, then columns),
    ``-> [B, C, Ho, Wo]`` (written into ``out`` when given; contiguous)."""
    ws = ws or _FRESH
    B, C, H, W = x.shape
    Ho, Wo = wy.shape[1], wx.shape[1]
    if C > 1:  # one copy of the row weights per channel: bmm has no broadcasting
        wy = ws.get("crop_wy", (B, C, Ho, H), x).copy_(wy.unsqueeze(1).expand(B, C, Ho, H))
    rows = ws.get("crop_rows", (B * C, Ho, W), x)
    torch.bmm(wy.reshape(B * C, Ho, H), x.reshape(B * C, H, W), out=rows)
    if out is None:
        out = torch.empty(B, C, Ho, Wo, dtype=x.dtype, device=x.device)
    torch.bmm(rows.view(B, C * Ho, W), wx.transpose(1, 2), out=out.view(B, C * Ho, Wo))
    return out


def resample_grid(
    x: Tensor, grid: Tensor, padding_mode: str = "border", mode: str = "bilinear"
) -> Tensor:
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def resample(
    x: Tensor,
    theta: Tensor,
    size: tuple[int, int],
    padding_mode: str = "border",
    mode: str = "bilinear",
) -> Tensor:
    """``grid_sample`` of ``x`` [B, C, H, W] (float) on the affine grids ``theta`` -> [B, C, *size]."""
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size[0], size[1]], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def sample_crop_boxes(
    u: Tensor,
    in_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int,
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` vectorised over the batch.

    ``u``: uniforms ``[B, 2 * attempts + 2]``. Per sample: up to ``attempts`` draws of
    (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first whose rounded box fits is
    used, else the central fallback crop. The box position is uniform over integer offsets.
    Returns ``[B, 4]`` float (top, left, height, width).
    """
    H, W = in_hw
    area = float(H * W)
    a = u[:, :attempts]
    r = u[:, attempts : 2 * attempts]
    target = area * (scale[0] + (scale[1] - scale[0]) * a)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(lr0 + (lr1 - lr0) * r)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)
    any_ok = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # Fallback (torchvision): whole image, aspect ratio clamped into `ratio`.
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = float(W), float(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = float(H), float(round(H * max(ratio)))
    else:
        fw, fh = float(W), float(H)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    top = torch.floor(u[:, -2] * (H - h + 1)).clamp_(max=H - h)
    left = torch.floor(u[:, -1] * (W - w + 1)).clamp_(max=W - w)
    return torch.stack([top, left, h, w], dim=1)
