"""Batched augmentation on the training device: no per-sample Python, every peer its own random view.

All functions take a whole batch ``(N, C, H, W)`` and an explicit ``torch.Generator`` on the batch's device, so
the views are reproducible from the generator's state (saved in checkpoints)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = _rand(images.shape[0], generator, images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` pixels and take a random crop of the original size (one gather for the batch)."""
    if pad == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    span = 2 * pad + 1
    dy = (_rand(n, generator, images.device) * span).long().clamp_(max=2 * pad)
    dx = (_rand(n, generator, images.device) * span).long().clamp_(max=2 * pad)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Inception-style crop: area fraction in ``scale``, aspect ratio in ``ratio`` (log-uniform), resized to
    ``size`` with bilinear sampling, optionally mirrored — one ``affine_grid``/``grid_sample`` for the batch.
    Float input (normalise first)."""
    n = images.shape[0]
    dev = images.device
    area = scale[0] + (scale[1] - scale[0]) * _rand(n, generator, dev)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(n, generator, dev)
    aspect = torch.exp(log_r)
    # crop width/height as fractions of the image side, clipped to fit
    cw = torch.sqrt(area * aspect).clamp(max=1.0)
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - cw) * (2 * _rand(n, generator, dev) - 1)  # centre in [-1+cw, 1-cw] (normalised coords)
    cy = (1 - ch) * (2 * _rand(n, generator, dev) - 1)
    sign = torch.ones(n, device=dev)
    if flip:
        sign = torch.where(_rand(n, generator, dev) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0] = cw * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> (x/255 − mean) / std, per channel. ``mean``/``std`` are (C,) tensors on the device."""
    x = images.to(dtype).div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1).to(dtype)).div_(std.view(1, -1, 1, 1).to(dtype))


class ViewMaker:
    """Turns a uint8 batch into m independently augmented, normalised views ``(m, N, C, H, W)``.

    The m copies are augmented together as one batch of m·N images, so each peer gets its own random crop/flip
    of every image with a single set of kernels."""

    def __init__(self, augment: str, mean, std, device, pad: int = 4, image_size: int = 32,
                 scale: tuple[float, float] = (0.08, 1.0)):
        self.augment = augment
        self.pad = pad
        self.image_size = image_size
        self.scale = scale
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device)

    @classmethod
    def from_config(cls, data_cfg, bundle, device) -> ViewMaker:
        """The view maker a recipe's ``[data]`` section describes, for a loaded :class:`DatasetBundle`."""
        return cls(data_cfg.augment, bundle.mean, bundle.std, device, data_cfg.pad, bundle.image_size,
                   tuple(data_cfg.scale))

    def views(self, images: torch.Tensor, num_views: int, generator: torch.Generator) -> torch.Tensor:
        n = images.shape[0]
        batch = images.repeat(num_views, 1, 1, 1) if num_views > 1 else images
        if self.augment == "random_resized_crop_flip":
            out = random_resized_crop(normalize(batch, self.mean, self.std), self.image_size, self.scale, generator)
        else:
            if self.augment in ("crop", "crop_flip"):
                batch = random_crop(center_crop(batch, self.image_size), self.pad, generator)
            if self.augment == "crop_flip":
                batch = random_flip(batch, generator)
            if self.augment == "none":
                batch = center_crop(batch, self.image_size)
            out = normalize(batch, self.mean, self.std)
        return out.unflatten(0, (num_views, n))

    def eval_view(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented test-time input every branch sees: centre crop + normalisation."""
        return normalize(center_crop(images, self.image_size), self.mean, self.std)
