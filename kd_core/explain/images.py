"""User uploads -> safe RGB images, and RGB images -> a checkpoint's input tensor.

:func:`load_image` accepts a path, bytes, a PIL image or a NumPy array (what ``gr.Image`` hands
over for ``type="filepath"``, ``"pil"`` or ``"numpy"``) and returns a decoded RGB image whose
longest side is at most ``max_side``; every way an upload can be unusable raises
:class:`ImageError` with a message meant for the person who uploaded it.

Safety: only common raster formats are opened (no EPS, which runs Ghostscript); the pixel count is
checked from the header before anything is decoded, so a decompression bomb costs nothing; a
truncated file is an error, not a half-grey picture (``load()`` decodes, ``verify()`` would not
check a JPEG at all). Odd modes are made RGB the way a person expects: transparency composited
on white, 16-bit and float images stretched over their actual range (a direct ``convert("RGB")``
clips them to white), animations reduced to their first frame, EXIF orientation applied.

Prefer ``gr.Image(type="filepath", image_mode=None)``: then this module sees the real file. With
``type="numpy"`` Gradio passes a GIF as a 2-D array of palette indices without the palette; it is
read as grayscale, the best that array allows.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # what the app accepts as an upload, file or data: URL
NOT_UPLOADED = "the image must be uploaded through this page (or sent as a data: URL); no other file is read"
MAX_PIXELS = 40_000_000  # a 40 MP photo decodes to 120 MB of RGB; anything larger is refused
DISPLAY_MAX_SIDE = 512  # the panels draw maps about 260 px high: sharp at twice the pixel density
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "AVIF", "QOI")

# Pillow only warns about images between MAX_IMAGE_PIXELS and twice that; make it an error, once,
# for the process (changing the warnings filter per call is not thread-safe). Our own ``max_pixels``
# check, from the header, refuses such images anyway.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# What Pillow raises on damaged data: OSError ("image file is truncated", "broken data stream"),
# SyntaxError (bad chunks, "not a PNG file"), and a few plugins' struct/zlib/EOF/value errors.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An upload that cannot be used as an image; the message says why, in plain words."""


def load_image(source: Any, max_side: int | None = DISPLAY_MAX_SIDE,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded RGB image from ``source``, shrunk (aspect kept) so its longest side is at most
    ``max_side`` (``None``: full size).

    ``source`` may be a path, ``bytes``, a PIL image or a NumPy array (``H x W`` grayscale, or
    ``H x W x C`` with C in 1-4; uint8, uint16, other integers, bool or float). Raises
    :class:`ImageError`.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1 (or None), got {max_side}")
    if source is None:
        raise ImageError("no image was given: upload a picture first")
    if isinstance(source, np.ndarray):
        image = _from_array(source, max_pixels)
    elif isinstance(source, Image.Image):
        image = _decode(source, "the image", max_pixels, max_side)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("the upload is empty (0 bytes)")
        image = _open_and_decode(io.BytesIO(bytes(source)), "the upload", max_pixels, max_side)
    elif isinstance(source, (str, os.PathLike)):
        image = _open_and_decode(_existing_file(Path(source)), Path(source).name, max_pixels, max_side)
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}; "
                         "give a file path, bytes, a PIL image or a NumPy array")
    return _shrink(image, max_side)


def uploaded_source(path: str | None, url: str | None, upload_folder: str | os.PathLike,
                    max_bytes: int = MAX_UPLOAD_BYTES) -> Path | bytes | None:
    """What a request may hand :func:`load_image`: the bytes of a ``data:`` URL, decoded here and
    capped at ``max_bytes``, or a file inside ``upload_folder`` (both resolved, symlinks followed).

    Anything else, a server path outside the folder whether it exists or not, a directory, a
    remote URL, raises :class:`ImageError` with one message that says nothing about the server's
    files. ``None`` when the request carries no image at all.
    """
    if url and url.startswith("data:"):
        return _data_url_bytes(url, max_bytes)
    if not path:
        return None
    try:
        resolved = Path(path).resolve(strict=True)
        inside = resolved.is_relative_to(Path(upload_folder).resolve()) and resolved.is_file()
    except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte in the name
        inside = False
    if not inside:
        raise ImageError(NOT_UPLOADED)
    return resolved


def _data_url_bytes(url: str, max_bytes: int) -> bytes:
    """``data:[<media type>][;base64],<data>`` (RFC 2397) -> its bytes, refused past ``max_bytes``
    before anything is decoded."""
    header, comma, data = url.partition(",")
    if not comma:
        raise ImageError("the data: URL has no comma before its data")
    if len(data) > (max_bytes // 3 + 1) * 4 + 4:  # base64 holds 3 bytes in 4 characters
        raise ImageError(f"the image is larger than the {max_bytes // 2**20} MB upload limit")
    if header.endswith(";base64"):
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URL's base64 data is damaged") from None
    else:
        decoded = urllib.parse.unquote_to_bytes(data)
    if len(decoded) > max_bytes:
        raise ImageError(f"the image is larger than the {max_bytes // 2**20} MB upload limit")
    if not decoded:
        raise ImageError("the upload is empty (0 bytes)")
    return decoded


def to_model_input(image: Image.Image, meta: dict[str, Any]) -> torch.Tensor:
    """``(1, C, H, W)`` float32 input for a checkpoint: ``image`` resized (squashed, not cropped,
    so a CAM maps back onto the whole picture) to ``meta["data"]["input_size"]``, grayscale for
    one-channel models, normalized with the checkpoint's mean and std."""
    data = meta["data"]
    channels, height, width = data["input_size"]
    if channels not in (1, 3):
        raise ValueError(f"checkpoint input has {channels} channels; images give 1 (grayscale) or 3 (RGB)")
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        image = load_image(image, max_side=None)
    image = image.convert("L") if channels == 1 else image
    resized = image.resize((width, height), Image.Resampling.BILINEAR)  # antialiased when shrinking
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    pixels = pixels.reshape(height, width, channels).permute(2, 0, 1)  # (C, H, W)
    mean = torch.tensor(data["mean"], dtype=torch.float32).view(channels, 1, 1)
    std = torch.tensor(data["std"], dtype=torch.float32).view(channels, 1, 1)
    return ((pixels - mean) / std)[None].contiguous()  # (1, C, H, W)


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ImageError(f"no file at {path}")
    if not path.is_file():
        raise ImageError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path.name} is empty (0 bytes)")
    return path


def _open_and_decode(file: Path | io.BytesIO, label: str, max_pixels: int,
                     max_side: int | None) -> Image.Image:
    try:
        opened = Image.open(file, formats=FORMATS)
    except UnidentifiedImageError:
        if _starts_like_tiff(file):
            raise ImageError(f"{label} is a TIFF file that cannot be read (a compression, bit depth or page "
                             "layout the decoder does not support); save it as PNG or JPEG") from None
        raise ImageError(f"{label} is not an image in a supported format "
                         f"({', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{label} declares too many pixels to decode safely ({error})") from None
    except _DECODE_ERRORS as error:
        raise ImageError(f"{label} is damaged or not a complete image ({error})") from None
    with opened:
        return _decode(opened, label, max_pixels, max_side)


def _starts_like_tiff(file: Path | io.BytesIO) -> bool:
    if isinstance(file, io.BytesIO):
        head = file.getvalue()[:4]
    else:
        with open(file, "rb") as handle:
            head = handle.read(4)
    return head in (b"II*\x00", b"MM\x00*")


def _decode(image: Image.Image, label: str, max_pixels: int, max_side: int | None) -> Image.Image:
    """Check the size from the header, decode the first frame, and make it RGB."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{label} is {width} x {height} = {width * height:,} pixels; at most "
                         f"{max_pixels:,} are accepted")
    if width == 0 or height == 0:
        raise ImageError(f"{label} has no pixels ({width} x {height})")
    if max_side is not None and image.format in ("JPEG", "MPO"):
        image.draft(None, (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale when that is enough
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise ImageError(f"{label} is truncated or corrupt and cannot be decoded ({error})") from None
    return _to_rgb(_upright(image), label)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos), as a viewer would."""
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image  # a damaged EXIF block only costs the rotation, not the picture


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_stretch_to_uint8(np.asarray(image))).convert("RGB")
    if image.has_transparency_data:  # alpha channel, or a transparent palette entry / colour key
        return _on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")  # also when already RGB: a copy detached from the file
    except ValueError as error:
        raise ImageError(f"{label} uses the colour mode {image.mode}, which cannot be shown as RGB "
                         f"({error})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale an array linearly from its own min..max to 0..255; a flat array becomes black."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ImageError(f"an image array must be H x W or H x W x C with C in 1-4; got shape {array.shape}")
    height, width = array.shape[:2]
    if height * width == 0:
        raise ImageError(f"the image array has no pixels (shape {array.shape})")
    if height * width > max_pixels:
        raise ImageError(f"the image is {width} x {height} = {width * height:,} pixels; at most "
                         f"{max_pixels:,} are accepted")
    image = Image.fromarray(np.ascontiguousarray(_array_to_uint8(array)))  # L, LA, RGB or RGBA
    return _on_white(image.convert("RGBA")) if image.mode in ("LA", "RGBA") else image.convert("RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 stays; bool -> 0/255; floats within [0, 1] -> x255; anything else (uint16, wider
    integers, other floats) is stretched over its actual range, alpha channel included."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageError(f"an image array must hold numbers; got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() \
            and array.min() >= 0.0 and array.max() <= 1.0:
        return np.round(array * 255.0).astype(np.uint8)
    return _stretch_to_uint8(array)


def _shrink(image: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # keeps the aspect ratio
    return image
