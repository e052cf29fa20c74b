"""Uploads -> safe RGB images: bad files refused with clear messages, odd modes made sensible."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from kd_core.explain.images import MAX_PIXELS, ImageError, load_image, to_model_input

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_image(width: int = 96, height: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def zero_png(width: int, height: int) -> bytes:
    """A genuine 1-bit all-black PNG of any size; zlib shrinks each 1000:1, so a 30000 x 30000
    decompression bomb is about 110 KB and is built without holding its 112 MB of raw rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(value) for value in np.asarray(image)[y, x])


# --- refused uploads ---------------------------------------------------------------------------

def test_none_is_a_clear_error():
    with pytest.raises(ImageError, match="no image"):
        load_image(None)


def test_a_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("certainly not a picture\n")
    with pytest.raises(ImageError, match="not an image in a supported format"):
        load_image(path)


@pytest.mark.parametrize("source", ["missing", "empty", "folder", "empty bytes", "object"])
def test_unreadable_sources_are_clear_errors(tmp_path, source):
    (tmp_path / "empty.jpg").write_bytes(b"")
    value = {"missing": tmp_path / "nope.jpg", "empty": tmp_path / "empty.jpg", "folder": tmp_path,
             "empty bytes": b"", "object": 42}[source]
    with pytest.raises(ImageError, match="no file|empty|not a file|cannot read an image from a int"):
        load_image(value)


def test_eps_is_refused_without_running_ghostscript(tmp_path):
    path = tmp_path / "figure.eps"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="supported format"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_files_are_refused(tmp_path, fmt):
    data = encoded(noise_image(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|damaged|corrupt"):
        load_image(path)


def test_corrupt_png_data_is_refused():
    data = bytearray(encoded(noise_image(), "PNG"))
    start = data.find(b"IDAT") + 40
    data[start:start + 20] = b"\xff" * 20
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bytes(data))


@pytest.mark.parametrize("side", [7000, 10000, 30000])  # ours only; Pillow warns; Pillow refuses
def test_decompression_bombs_are_refused_from_the_header(monkeypatch, side):
    bomb = zero_png(side, side)

    def no_decoding(self):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="pixels"):
        load_image(bomb)
    assert time.perf_counter() - started < 0.5


def test_our_pixel_limit_names_the_size():
    with pytest.raises(ImageError, match="7000 x 7000 = 49,000,000 pixels; at most 40,000,000"):
        load_image(zero_png(7000, 7000))


def test_huge_arrays_are_refused():
    huge = np.broadcast_to(np.zeros(1, dtype=np.uint8), (7000, 7000))  # no memory behind it
    assert huge.size > MAX_PIXELS
    with pytest.raises(ImageError, match="at most"):
        load_image(huge)


@pytest.mark.parametrize("shape", [(4, 4, 5), (4,), (2, 4, 4, 3), (0, 4, 3)])
def test_arrays_of_impossible_shape_are_refused(shape):
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros(shape, dtype=np.uint8))


# --- odd but valid images ------------------------------------------------------------------------

def gradient16() -> np.ndarray:
    return np.tile(np.linspace(0, 4000, 64), (8, 1)).astype(np.uint16)  # dark: 6% of the range


def sixteen_bit(kind: str) -> Image.Image | np.ndarray:
    values = gradient16()
    if kind == "array":
        return values
    if kind == "I;16B":
        return Image.frombytes("I;16B", (64, 8), values.astype(">u2").tobytes())
    if kind == "I":
        return Image.fromarray(values.astype(np.int32))
    return Image.open(io.BytesIO(encoded(Image.fromarray(values), "PNG")))  # opens as I;16


@pytest.mark.parametrize("kind", ["png", "I;16B", "I", "array"])
def test_16_bit_images_are_stretched_not_clipped_to_white(kind):
    pixels = np.asarray(load_image(sixteen_bit(kind)))
    assert pixels.shape == (8, 64, 3) and pixels.dtype == np.uint8
    row = pixels[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row.astype(int)) >= 0) and len(np.unique(row)) > 50
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_grayscale_and_bilevel_become_three_equal_channels():
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1)))
    pixels = np.asarray(load_image(gray))
    assert pixels.shape == (4, 64, 3) and (pixels == np.asarray(gray)[..., None]).all()
    bilevel = np.asarray(load_image(gray.convert("1")))
    assert set(np.unique(bilevel)) == {0, 255}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparency_is_composited_on_white(mode):
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))  # clear, except an opaque blue left half
    image.paste((0, 0, 255, 255), (0, 0, 4, 4))
    result = load_image(image.convert(mode))
    assert rgb_at(result, 6, 1) == WHITE
    assert rgb_at(result, 1, 1) != WHITE


def test_palette_gif_with_a_transparent_index_shows_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 1)
    result = load_image(encoded(image, "GIF", transparency=0))
    assert rgb_at(result, 0, 0) == BLUE and rgb_at(result, 3, 3) == WHITE


def test_cmyk_jpeg_becomes_rgb():
    cmyk_red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    red, green, blue = rgb_at(load_image(encoded(cmyk_red, "JPEG")), 8, 8)
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])  # PNG with save_all is APNG
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (10, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    red, green, blue = rgb_at(load_image(data), 5, 4)
    assert red > 240 and green < 15 and blue < 15


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright = load_image(encoded(Image.new("RGB", (40, 20), RED), "JPEG", exif=exif))
    assert upright.size == (20, 40)


@pytest.mark.parametrize("array, expected", [
    (np.dstack([np.full((2, 2), 255, np.uint8), np.zeros((2, 2, 2), np.uint8)]), RED),
    (np.array([[[0, 0, 255, 255], [0, 0, 0, 0]]], dtype=np.uint8), None),  # RGBA, second one clear
    (np.full((2, 2), 0.5), (128, 128, 128)),  # float in [0, 1]
    (np.ones((2, 2), dtype=bool), WHITE),
    (np.full((2, 2, 1), 7, dtype=np.uint8), (7, 7, 7)),  # e.g. GIF palette indices from gr.Image
])
def test_numpy_arrays(array, expected):
    result = load_image(array)
    assert result.mode == "RGB" and result.size == (array.shape[1], array.shape[0])
    if expected is None:
        assert rgb_at(result, 0, 0) == BLUE and rgb_at(result, 1, 0) == WHITE
    else:
        assert rgb_at(result, 0, 0) == expected


def test_path_bytes_pil_and_array_agree(tmp_path):
    image = noise_image()
    path = tmp_path / "noise.png"
    image.save(path)
    reference = np.asarray(image)
    for source in (path, str(path), path.read_bytes(), image, reference):
        assert np.array_equal(np.asarray(load_image(source)), reference)


def test_display_size_is_capped_keeping_the_aspect_ratio():
    wide = Image.new("RGB", (3000, 1000), RED)
    assert load_image(wide).size == (512, 171)
    assert load_image(wide, max_side=300).size == (300, 100)
    assert load_image(wide, max_side=None).size == (3000, 1000)
    assert load_image(Image.new("RGB", (50, 20))).size == (50, 20)  # never enlarged


def test_large_jpeg_is_capped():
    photo = encoded(noise_image(2400, 1800), "JPEG")
    assert load_image(photo).size == (512, 384)


# --- model input -----------------------------------------------------------------------------------

def meta(channels: int, size: int = 8) -> dict:
    return {"data": {"input_size": [channels, size, size], "mean": [0.5] * channels, "std": [0.25] * channels}}


def test_model_input_is_resized_and_normalized():
    image = Image.new("RGB", (40, 30), (255, 0, 51))
    tensor = to_model_input(image, meta(3))
    assert tensor.shape == (1, 3, 8, 8) and tensor.dtype == torch.float32
    expected = (torch.tensor([1.0, 0.0, 0.2]) - 0.5) / 0.25
    assert torch.allclose(tensor[0, :, 3, 3], expected, atol=1e-5)


def test_grayscale_models_get_luminance():
    tensor = to_model_input(Image.new("RGB", (10, 10), (255, 255, 255)), meta(1, 6))
    assert tensor.shape == (1, 1, 6, 6)
    assert torch.allclose(tensor, torch.full_like(tensor, 2.0))


def test_uploaded_source_accepts_only_files_in_the_upload_folder_and_data_urls(tmp_path):
    import base64
    from kd_core.explain.images import NOT_UPLOADED, uploaded_source

    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    (uploads / "abc").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(uploads / "abc" / "ok.png")
    Image.new("RGB", (4, 3)).save(outside / "secret.png")
    (uploads / "link.png").symlink_to(outside / "secret.png")
    assert uploaded_source(str(uploads / "abc" / "ok.png"), None, uploads) == (uploads / "abc" / "ok.png").resolve()
    for path in (outside / "secret.png", outside / "gone.png", uploads / "link.png", uploads / "abc",
                 uploads / "abc" / ".." / ".." / "outside" / "secret.png", "https://example.com/x.png", "a\0b"):
        with pytest.raises(ImageError) as refused:
            uploaded_source(str(path), None, uploads)
        assert str(refused.value) == NOT_UPLOADED
    assert uploaded_source(None, None, uploads) is None

    png = (uploads / "abc" / "ok.png").read_bytes()
    assert uploaded_source(None, "data:image/png;base64," + base64.b64encode(png).decode(), uploads) == png
    assert uploaded_source("/etc/passwd", "data:," + "%41%42", uploads) == b"AB"  # the URL wins; the path is never read
    with pytest.raises(ImageError, match="larger than the 0 MB upload limit"):
        uploaded_source(None, "data:image/png;base64," + base64.b64encode(png).decode(), uploads, max_bytes=10)
    with pytest.raises(ImageError, match="base64 data is damaged"):
        uploaded_source(None, "data:image/png;base64,@@@@", uploads)
    with pytest.raises(ImageError, match="no comma"):
        uploaded_source(None, "data:image/png;base64", uploads)


def test_a_tiff_pillow_cannot_read_says_so(tmp_path):
    path = tmp_path / "scan.tif"
    path.write_bytes(b"II*\x00" + b"\x08\x00\x00\x00" + b"\xff" * 64)  # a TIFF header, then nonsense
    with pytest.raises(ImageError, match=r"^scan\.tif is a TIFF file that cannot be read"):
        load_image(path)
