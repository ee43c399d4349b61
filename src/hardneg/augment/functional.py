"""Batched, per-sample image operations on float tensors ``[B, C, H, W]`` with values in [0, 1].

Everything here is vectorised over the batch: per-sample parameters come in as tensors of
shape ``[B]`` (or ``[B, ...]``), there are no Python loops over samples. The colour operations
follow torchvision's tensor implementations (``adjust_brightness``/``contrast``/``saturation``/
``hue``, ``rgb_to_grayscale``) so that one sample with the same factor gives the same result up
to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale and PIL's convert("L").
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """``[B, 3, H, W] -> [B, 1, H, W]``; 1-channel input is returned unchanged."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (
        (r * GRAY_WEIGHTS[0])
        .add_(g, alpha=GRAY_WEIGHTS[1])
        .add_(b, alpha=GRAY_WEIGHTS[2])
        .unsqueeze(1)
    )


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _bcast(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _bcast(factor, x)
    # f * x + (1 - f) * mean
    return torch.addcmul((1.0 - f) * mean, x, f).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    f = _bcast(factor, x)
    return torch.addcmul(rgb_to_grayscale(x) * (1.0 - f), x, f).clamp_(0.0, 1.0)


def _mod6(v: Tensor) -> Tensor:
    return v.sub_(torch.floor(v * (1.0 / 6.0)).mul_(6.0))


def _is_zero(d: Tensor) -> Tensor:
    """1.0 where ``d == 0`` else 0.0, for ``d >= 0`` (any positive float32 times 1e38 saturates
    the clamp). Comparisons and ``where`` are several times slower than arithmetic on CPU."""
    return (d * 1e38).clamp_(0.0, 1.0).neg_().add_(1.0)


def _hue6(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(6 * hue in [0, 6), max, chroma) of RGB ``x``, each ``[B, H, W]`` (torchvision's
    formula; ties for the maximum channel resolve to R, then G), computed branch-free with
    0/1 masks as factors."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    cr = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = (cr + _is_zero(cr)).reciprocal_()  # 1/chroma, 1 where chroma == 0 (hue irrelevant)
    is_r = _is_zero(maxc - r)
    is_g = _is_zero(maxc - g).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    # candidate hue for "max is R / G / B": (g-b)/cr, 2+(b-r)/cr, 4+(r-g)/cr
    h6 = (g - b).mul_(is_r).add_((b - r).mul_(is_g)).add_((r - g).mul_(is_b))
    h6 = h6.mul_(inv).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    return _mod6(h6), maxc, cr


def rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hue in [0, 1), saturation, value; each ``[B, H, W]`` (torchvision's formula)."""
    h6, maxc, cr = _hue6(x)
    s = cr / (maxc + _is_zero(cr))
    return h6 / 6.0, s, maxc


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: ``f(n) = v - v*s*clamp(min(k, 4-k), 0, 1)``,
    ``k = (n + 6h) mod 6`` with n = 5, 3, 1 for R, G, B (the closed form of the sector table)."""
    return _from_hue6(6.0 * h, v, v * s)


def _from_hue6(h6: Tensor, maxc: Tensor, cr: Tensor, out: Tensor | None = None) -> Tensor:
    """RGB from (6*hue in [0, 6), value, chroma): channel = max - chroma * w(k) with
    ``k = n + 6h`` in [1, 11) and ``w(k) = clamp(min(k mod 6, 4 - k mod 6), 0, 1)``, written
    as ``clamp(2 - min(|k - 2|, |k - 8|), 0, 1)`` (no modulo, no comparison)."""
    if out is None:
        out = torch.empty(h6.shape[0], 3, *h6.shape[1:], device=h6.device, dtype=h6.dtype)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n
        w = torch.minimum((k - 2.0).abs_(), k.sub_(8.0).abs_()).neg_().add_(2.0).clamp_(0.0, 1.0)
        torch.addcmul(maxc, cr, w, value=-1.0, out=out[:, c])
    return out


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (in turns, [-0.5, 0.5]) per sample, keeping HSV saturation
    and value (torchvision's ``adjust_hue``, computed without the full HSV round trip)."""
    if x.shape[1] == 1:
        return x
    h6, maxc, cr = _hue6(x)
    h6 = _mod6(h6.add_(6.0 * shift.to(h6.dtype).view(-1, 1, 1)))
    return _from_hue6(h6, maxc, cr).clamp_(0.0, 1.0)


# In-place variants (``x`` is overwritten and returned): the batched pipeline applies them to
# slices of one buffer, which saves an allocation and a copy per operation.


def adjust_brightness_(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(_bcast(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x: Tensor, factor: Tensor) -> Tensor:
    f = _bcast(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(f).add_(mean.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation_(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    f = _bcast(factor, x)
    gray = rgb_to_grayscale(x).mul_(1.0 - f)
    return x.mul_(f).add_(gray).clamp_(0.0, 1.0)


def adjust_hue_(x: Tensor, shift: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    h6, maxc, cr = _hue6(x)
    h6 = _mod6(h6.add_(6.0 * shift.to(h6.dtype).view(-1, 1, 1)))
    return _from_hue6(h6, maxc, cr, out=x).clamp_(0.0, 1.0)


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
    top, left, height, width = (t.unsqueeze(1) for t in boxes.unbind(1))
    kx = torch.arange(Wo, device=boxes.device, dtype=boxes.dtype).view(1, -1) + 0.5
    ky = torch.arange(Ho, device=boxes.device, dtype=boxes.dtype).view(1, -1) + 0.5
    kx = torch.where(flip.view(-1, 1), Wo - kx, kx)
    px = torch.minimum(torch.maximum(left + kx * (width / Wo) - 0.5, left), left + width - 1)
    py = torch.minimum(torch.maximum(top + ky * (height / Ho) - 0.5, top), top + height - 1)
    gx = (2.0 * px + 1.0) / W - 1.0
    gy = (2.0 * py + 1.0) / H - 1.0
    B = boxes.shape[0]
    return torch.stack([gx.unsqueeze(1).expand(B, Ho, Wo), gy.unsqueeze(2).expand(B, Ho, Wo)], -1)


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
