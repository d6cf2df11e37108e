"""Tests for the style-transfer example: the filters in styles.py and the Flask app around them.

No Docker is needed: the app tests use Flask's test client.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageFilter

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "style-transfer"
DATA_DIR = Path(__file__).resolve().parent / "data"
PHOTOS = ["rocket.jpg", "chelsea.png"]

# app.py imports its sibling as "styles", so the example folder has to be on sys.path.
sys.path.insert(0, str(EXAMPLE_DIR))
import styles  # noqa: E402

# A restyled photo must change more than JPEG re-encoding at quality 90 does (a mean absolute
# difference of 2.0 to 2.3 on the sample photos) by this factor. The weakest style, oil, reaches
# 3.1x on rocket.jpg and 4.0x on chelsea.png.
MIN_CHANGE_OVER_JPEG_NOISE = 2.5

# Pearson correlation of the greyscale input and output. The styles reach 0.90 to 0.99 on the
# sample photos. An unrelated image scores near 0.
MIN_GREY_CORRELATION = 0.85


def load_photo(name: str) -> Image.Image:
    with Image.open(DATA_DIR / name) as image:
        return image.convert("RGB")


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def mean_abs_difference(first: Image.Image, second: Image.Image) -> float:
    first_pixels = np.asarray(first.convert("RGB"), dtype=np.float64)
    second_pixels = np.asarray(second.convert("RGB"), dtype=np.float64)
    return float(np.abs(first_pixels - second_pixels).mean())


def grey_correlation(first: Image.Image, second: Image.Image) -> float:
    first_grey = np.asarray(first.convert("L"), dtype=np.float64).ravel()
    second_grey = np.asarray(second.convert("L"), dtype=np.float64).ravel()
    return float(np.corrcoef(first_grey, second_grey)[0, 1])


def jpeg_noise(image: Image.Image) -> float:
    """Measure the mean absolute difference that JPEG re-encoding at quality 90 causes."""
    reencoded = Image.open(io.BytesIO(encode(image, "JPEG", quality=90)))
    return mean_abs_difference(image, reencoded)


# ---------------------------------------------------------------------------------------------
# styles.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_restyle_keeps_size(photo: str, style: str) -> None:
    source = load_photo(photo)
    restyled = styles.restyle(source, style)

    assert restyled.mode == "RGB"
    assert restyled.size == source.size


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_restyle_output_decodes(photo: str, style: str) -> None:
    restyled = styles.restyle(load_photo(photo), style)
    data = encode(restyled, "PNG")

    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()
        assert decoded.size == restyled.size


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_restyle_changes_pixels(photo: str, style: str) -> None:
    source = load_photo(photo)
    restyled = styles.restyle(source, style)
    change = mean_abs_difference(source, restyled)

    assert change > MIN_CHANGE_OVER_JPEG_NOISE * jpeg_noise(source)


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_restyle_exceeds_plain_blur(photo: str, style: str) -> None:
    source = load_photo(photo)
    blurred = source.filter(ImageFilter.GaussianBlur(2))
    restyled = styles.restyle(source, style)

    assert mean_abs_difference(source, restyled) > mean_abs_difference(source, blurred)


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("photo", PHOTOS)
def test_restyle_keeps_structure(photo: str, style: str) -> None:
    source = load_photo(photo)
    restyled = styles.restyle(source, style)

    assert grey_correlation(source, restyled) > MIN_GREY_CORRELATION


def test_grey_correlation_low_for_unrelated() -> None:
    # Guards the structure threshold: two different photos must not pass it.
    rocket = load_photo("rocket.jpg")
    chelsea = load_photo("chelsea.png").resize(rocket.size)

    assert grey_correlation(rocket, chelsea) < MIN_GREY_CORRELATION


@pytest.mark.parametrize("style", sorted(styles.STYLES))
def test_restyle_is_deterministic(style: str) -> None:
    source = load_photo("chelsea.png")
    first = np.asarray(styles.restyle(source, style))
    second = np.asarray(styles.restyle(source, style))

    assert np.array_equal(first, second)


@pytest.mark.parametrize("style", sorted(styles.STYLES))
@pytest.mark.parametrize("size", [(1, 1), (3, 2), (1, 7)])
def test_restyle_tiny_images(style: str, size: tuple[int, int]) -> None:
    restyled = styles.restyle(load_photo("chelsea.png").resize(size), style)

    assert restyled.size == size


@pytest.mark.parametrize("style", sorted(styles.STYLES))
def test_restyle_uniform_stays_uniform(style: str) -> None:
    restyled = np.asarray(styles.restyle(Image.new("RGB", (40, 30), (90, 140, 200)), style))

    assert np.isfinite(restyled).all()
    assert restyled.min(axis=(0, 1)).tolist() == restyled.max(axis=(0, 1)).tolist()


@pytest.mark.parametrize("style", ["comic", "oil"])
def test_restyle_large_image_downscaled(style: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A small work limit exercises the reduce-and-upscale path without a multi-megapixel photo.
    monkeypatch.setattr(styles, "MAX_WORK_PIXELS", 100_000)
    source = load_photo("rocket.jpg")
    restyled = styles.restyle(source, style)

    assert restyled.size == source.size
    assert grey_correlation(source, restyled) > MIN_GREY_CORRELATION


def test_sunset_blocks_match_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    source = load_photo("chelsea.png")
    whole = np.asarray(styles.restyle(source, "sunset"), dtype=np.int16)
    monkeypatch.setattr(styles, "_ROWS_PER_BLOCK", 7)
    in_blocks = np.asarray(styles.restyle(source, "sunset"), dtype=np.int16)

    assert np.abs(whole - in_blocks).max() <= 1


def test_restyle_unknown_style_raises() -> None:
    with pytest.raises(KeyError):
        styles.restyle(load_photo("chelsea.png"), "watercolour")


def test_to_rgb_composites_alpha_on_white() -> None:
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))

    converted = styles.to_rgb(transparent)

    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_scales_16_bit_grey() -> None:
    grey = np.asarray(load_photo("chelsea.png").convert("L"), dtype=np.uint16)
    wide = Image.fromarray(grey * 257)

    converted = np.asarray(styles.to_rgb(wide))

    assert converted.shape == grey.shape + (3,)
    assert np.abs(converted[..., 0].astype(np.int32) - grey).max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "1", "RGBA"])
def test_to_rgb_modes(mode: str) -> None:
    converted = styles.to_rgb(load_photo("chelsea.png").convert(mode))

    assert converted.mode == "RGB"
    assert converted.size == (451, 300)


# ---------------------------------------------------------------------------------------------
# app.py through Flask's test client
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_module() -> ModuleType:
    # A unique module name, because the test apps under tests/apps are also called app.py.
    spec = importlib.util.spec_from_file_location("style_transfer_app", EXAMPLE_DIR / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def client(app_module: ModuleType):
    return app_module.app.test_client()


def post_file(client, data: bytes, filename: str, **fields: str):
    form = {"file": (io.BytesIO(data), filename), **fields}
    return client.post("/", data=form, content_type="multipart/form-data")


def test_app_get_usage(client) -> None:
    response = client.get("/")
    text = response.get_data(as_text=True)

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "curl" in text
    for name in styles.STYLES:
        assert name in text


def test_app_jpeg_returns_jpeg(client) -> None:
    data = (DATA_DIR / "rocket.jpg").read_bytes()
    response = post_file(client, data, "rocket.jpg")

    assert response.status_code == 200
    assert response.mimetype == "image/jpeg"
    with Image.open(io.BytesIO(response.data)) as output:
        assert output.format == "JPEG"
        assert output.size == (640, 427)


def test_app_png_returns_png(client) -> None:
    data = (DATA_DIR / "chelsea.png").read_bytes()
    response = post_file(client, data, "chelsea.png")

    assert response.status_code == 200
    assert response.mimetype == "image/png"
    with Image.open(io.BytesIO(response.data)) as output:
        assert output.format == "PNG"
        assert output.size == (451, 300)


@pytest.mark.parametrize("style", sorted(styles.STYLES))
def test_app_style_form_field(client, style: str) -> None:
    data = (DATA_DIR / "chelsea.png").read_bytes()
    response = post_file(client, data, "chelsea.png", style=style)
    expected = np.asarray(styles.restyle(load_photo("chelsea.png"), style))

    assert response.status_code == 200
    with Image.open(io.BytesIO(response.data)) as output:
        assert np.array_equal(np.asarray(output.convert("RGB")), expected)


def test_app_style_query_parameter(client) -> None:
    data = (DATA_DIR / "chelsea.png").read_bytes()
    form = {"file": (io.BytesIO(data), "chelsea.png")}
    response = client.post("/?style=sunset", data=form, content_type="multipart/form-data")
    expected = np.asarray(styles.restyle(load_photo("chelsea.png"), "sunset"))

    assert response.status_code == 200
    with Image.open(io.BytesIO(response.data)) as output:
        assert np.array_equal(np.asarray(output.convert("RGB")), expected)


def test_app_text_file_rejected(client) -> None:
    response = post_file(client, b"this is not a photo\n", "notes.txt")

    assert response.status_code == 400
    assert response.is_json
    assert response.json["error"] == "invalid image"
    assert "notes.txt" in response.json["detail"]


def test_app_truncated_jpeg_rejected(client) -> None:
    data = (DATA_DIR / "rocket.jpg").read_bytes()[:5000]
    response = post_file(client, data, "rocket.jpg")

    assert response.status_code == 400
    assert response.json["error"] == "invalid image"


def test_app_missing_file_rejected(client) -> None:
    response = client.post("/", data={"style": "oil"}, content_type="multipart/form-data")

    assert response.status_code == 400
    assert response.is_json
    assert response.json["error"] == "missing file"
    assert "detail" in response.json


def test_app_empty_file_rejected(client) -> None:
    response = post_file(client, b"", "empty.jpg")

    assert response.status_code == 400
    assert response.json["error"] == "empty file"


def test_app_unknown_style_rejected(client) -> None:
    data = (DATA_DIR / "chelsea.png").read_bytes()
    response = post_file(client, data, "chelsea.png", style="watercolour")

    assert response.status_code == 400
    assert response.json["error"] == "unknown style"
    assert "watercolour" in response.json["detail"]
    for name in styles.STYLES:
        assert name in response.json["detail"]


def test_app_oversized_image_rejected(client, app_module: ModuleType) -> None:
    # Only the header is read before the size check, so a blank PNG just over the limit is a
    # cheap way to trigger it.
    width = 5000
    height = app_module.MAX_PIXELS // width + 1
    data = encode(Image.new("L", (width, height)), "PNG")
    response = post_file(client, data, "huge.png")

    assert response.status_code == 413
    assert response.json["error"] == "image too large"
    assert f"{width}x{height}" in response.json["detail"]


def test_app_oversized_upload_rejected(client, app_module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(app_module.app.config, "MAX_CONTENT_LENGTH", 1000)
    data = (DATA_DIR / "rocket.jpg").read_bytes()
    response = post_file(client, data, "rocket.jpg")

    assert response.status_code == 413
    assert response.is_json
    assert response.json["error"] == "upload too large"


def test_app_exif_orientation_applied(client) -> None:
    # Orientation 6 means "rotate 90 degrees clockwise to display", so width and height swap.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(load_photo("chelsea.png"), "JPEG", quality=90, exif=exif.tobytes())
    response = post_file(client, data, "rotated.jpg")

    assert response.status_code == 200
    with Image.open(io.BytesIO(response.data)) as output:
        assert output.size == (300, 451)


@pytest.mark.parametrize(
    ("mode", "image_format"),
    [("L", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("LA", "PNG"), ("CMYK", "JPEG")],
)
def test_app_accepts_modes(client, mode: str, image_format: str) -> None:
    data = encode(load_photo("chelsea.png").convert(mode), image_format)
    response = post_file(client, data, f"chelsea.{image_format.lower()}")

    assert response.status_code == 200
    with Image.open(io.BytesIO(response.data)) as output:
        assert output.mode == "RGB"
        assert output.size == (451, 300)
