"""Encoded image bytes -> normalised pixels, for images chosen by id (stream mode), with the preprocessing of the
`extract` stage (`ImagePreprocessing`): a DALI pipeline fed through `fn.external_source` (nvJPEG "mixed" on a GPU,
CPU decoding otherwise), or PIL where DALI is not installed.

DALI has no per-sample error handling: one undecodable image fails the whole batch and leaves the pipeline
unusable, and its parser has crashed the whole process (SIGSEGV) on malformed JPEG markers. So bytes whose image
header PIL cannot parse (a cheap read of the header, no decoding) never reach DALI; they are reported at once. For
the rare image that passes the header check and still fails in DALI, the decoder rebuilds its pipeline and decodes
that batch's images one at a time, so the bad ones are found while the good ones keep their DALI pixels.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from data_shards.features.pil_images import crop_image, normalise
from data_shards.features.preprocess import ImagePreprocessing

IMAGE_DECODERS = ("auto", "dali", "pil")


class DecodedImages:
    """pixels [k, 3, crop, crop] of the inputs that decoded (in input order), `ok` [n] bool, `reasons` of the others
    (input index -> why)."""

    def __init__(self, pixels: torch.Tensor, ok: np.ndarray, reasons: dict[int, str]):
        self.pixels, self.ok, self.reasons = pixels, ok, reasons


def _empty(prep: ImagePreprocessing, count: int, device=None) -> DecodedImages:
    return DecodedImages(torch.zeros(0, 3, prep.crop, prep.crop, device=device), np.zeros(count, dtype=bool), {})


class PilImageDecoder:
    name = "pil"

    def __init__(self, prep: ImagePreprocessing):
        self.prep = prep

    def decode(self, images: list[bytes]) -> DecodedImages:
        crops, ok, reasons = [], np.zeros(len(images), dtype=bool), {}
        for index, data in enumerate(images):
            try:
                crops.append(crop_image(data, self.prep))
                ok[index] = True
            except ValueError as err:
                reasons[index] = str(err)
        if not crops:
            return DecodedImages(_empty(self.prep, 0).pixels, ok, reasons)
        return DecodedImages(normalise(np.stack(crops), self.prep), ok, reasons)


def unreadable_header(data: bytes) -> str | None:
    """Why PIL cannot parse the image header of `data`, or None when it can (the pixels are not decoded)."""
    try:
        with Image.open(io.BytesIO(data)):
            return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        message = str(err).split(" <_io.BytesIO")[0]  # PIL names the in-memory file by its address
        return f"unreadable image header ({type(err).__name__}: {message})"


class DaliImageDecoder:
    """One DALI pipeline of at most `max_batch` images per run; larger inputs run in several batches."""

    name = "dali"

    def __init__(self, prep: ImagePreprocessing, max_batch: int = 256, num_threads: int = 2,
                 device_id: int | None = None):
        self.prep, self.max_batch, self.num_threads, self.device_id = prep, max_batch, num_threads, device_id
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        prep = self.prep

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_dynamic=False)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="cpu" if self.device_id is None else "mixed",
                                       output_type=types.RGB)
            images = fn.resize(images, resize_shorter=prep.resize_shorter, antialias=True,
                               interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(images, crop=(prep.crop, prep.crop), dtype=types.FLOAT,
                                            output_layout="CHW", mean=[255 * m for m in prep.mean],
                                            std=[255 * s for s in prep.std])

        pipe = pipeline()
        pipe.build()
        return pipe

    def _run(self, images: list[bytes]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in images])
        try:
            (output,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # DALI leaves a pipeline that failed unusable
            raise
        dense = output.as_tensor()
        device = torch.device("cpu") if self.device_id is None else torch.device("cuda", self.device_id)
        pixels = torch.empty(dense.shape(), dtype=torch.float32, device=device)
        feed_ndarray(dense, pixels)
        return pixels

    def decode(self, images: list[bytes]) -> DecodedImages:
        parts, ok, reasons = [], np.zeros(len(images), dtype=bool), {}
        for index, data in enumerate(images):
            reason = unreadable_header(data)
            if reason is not None:
                reasons[index] = reason
        readable = [index for index in range(len(images)) if index not in reasons]
        for start in range(0, len(readable), self.max_batch):
            chunk = readable[start:start + self.max_batch]
            try:
                parts.append(self._run([images[index] for index in chunk]))
                ok[chunk] = True
                continue
            except RuntimeError:
                pass
            for index in chunk:  # find the bad ones; the good keep DALI's pixels
                try:
                    parts.append(self._run([images[index]]))
                    ok[index] = True
                except RuntimeError as err:
                    reasons[index] = "DALI cannot decode it (" + _first_error_line(err) + ")"
        if not parts:
            device = None if self.device_id is None else torch.device("cuda", self.device_id)
            return DecodedImages(_empty(self.prep, 0, device).pixels, ok, reasons)
        return DecodedImages(torch.cat(parts), ok, reasons)


def _first_error_line(err: Exception) -> str:
    """DALI's own reason ("Failed to decode sample #0"), not its traceback of the pipeline definition."""
    lines = [line.strip(" :") for line in str(err).splitlines() if line.strip(" :")]
    detail = [line for line in lines if line.startswith("Failed to decode")]
    return (detail or lines or [type(err).__name__])[0][:160]


def image_decoder(kind: str, prep: ImagePreprocessing, max_batch: int, num_threads: int,
                  device: torch.device):
    """The decoder `kind` names ("auto": DALI where it is installed, else PIL)."""
    from data_shards.features.dali_images import dali_available
    if kind not in IMAGE_DECODERS:
        raise ValueError(f"image decoder {kind!r} is not one of {IMAGE_DECODERS}")
    if kind == "dali" or (kind == "auto" and dali_available()):
        device_id = device.index if device.type == "cuda" else None
        return DaliImageDecoder(prep, max_batch, num_threads, device_id)
    return PilImageDecoder(prep)
