"""The one preprocessing contract from training to deployment.

A model sees an image as: decoded by Pillow, converted to RGB (or ``L`` for one-channel models), shorter side
resized to ``resize_size`` (Pillow's bilinear filter, which antialiases when shrinking), centre-cropped to a
``resize_size`` square, then centre-cropped to ``crop_size`` (the network's input size), scaled to [0, 1] and
normalised with ``mean``/``std`` per channel. Training-time evaluation, ``bench``, ``deploy/pcl_infer.py`` and the
Triton bundle's ``preprocessing.json`` all follow this record, which is stored in the run's manifest and in the
ONNX metadata (``pcltool.resize_size``, ``pcltool.interpolation``, ``pcltool.preprocessing``). An image already at
``resize_size`` is not resampled at all.

``deploy/pcl_infer.py`` repeats :func:`resize_and_crop` in a dozen lines of Pillow (it must run without pcltool);
``tests/test_preprocessing.py`` checks the two give identical pixels and identical predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

INTERPOLATION = "bilinear"
# resize_size / image_size above this crops away so much of the image that evaluation and training (which sees
# the whole image through the random-resized crop) disagree; ImageNet's customary 256/224 is 1.14.
SUSPICIOUS_RESIZE_RATIO = 1.5
MAX_RESIZE_RATIO = 2.0  # beyond this evaluation sees a quarter of the image or less: refused


@dataclass(frozen=True)
class Preprocessing:
    resize_size: int
    crop_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = INTERPOLATION

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["color"] = "L" if self.channels == 1 else "RGB"
        r, c = self.resize_size, self.crop_size
        d["steps"] = (f"convert to {d['color']}; resize the shorter side to {r} ({self.interpolation}); centre crop "
                      f"{r}x{r}; centre crop {c}x{c}; scale to [0, 1]; subtract mean, divide by std per channel")
        return d


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``, the longer scaled and truncated (torchvision's rule)."""
    if width <= height:
        return size, max(size, int(size * height / width))
    return max(size, int(size * width / height)), size


def resize_and_crop(img, size: int):
    """A Pillow image with its shorter side resized to ``size`` and centre-cropped to ``size`` x ``size``."""
    from PIL import Image

    new = resized_shape(img.width, img.height, size)
    if img.size != new:
        img = img.resize(new, Image.BILINEAR)
    if img.size != (size, size):
        left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def default_resize(image_size: int, resize_size: int | None, resize_ratio: float = 1.0) -> int:
    """``data.resize_size`` unless set; otherwise ``image_size * data.resize_ratio`` (default 1: images already at
    the network's size are not zoomed), so the decode size follows ``data.image_size``."""
    return resize_size if resize_size is not None else int(round(image_size * resize_ratio))


def check_resize(image_size: int, resize_size: int) -> str | None:
    """Raise for a resize smaller than the crop; return a warning for a suspicious ratio, else None."""
    from pcltool.errors import RecipeError

    if resize_size < image_size:
        raise RecipeError(f"data.resize_size={resize_size} is smaller than data.image_size={image_size}: the centre "
                          f"crop would not fit; set data.resize_size >= {image_size} (or leave it unset)")
    ratio = resize_size / image_size
    if ratio <= SUSPICIOUS_RESIZE_RATIO:
        return None
    text = (f"data.resize_size={resize_size} is {ratio:.2f}x data.image_size={image_size}: evaluation sees only the "
            f"central {100 / ratio ** 2:.0f}% of each image while training sees all of it; leave data.resize_size "
            f"unset (it follows image_size: data.resize_ratio, default 1) or set it to {round(image_size * 8 / 7)} "
            "(ImageNet's 8/7)")
    if ratio > MAX_RESIZE_RATIO:
        raise RecipeError(text)
    return text
