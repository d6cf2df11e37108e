"""Style transfer serve app: POST a photo to / and get it back restyled.

    curl -o out.jpg -F "file=@photo.jpg" -F "style=oil" http://HOST/expose/JOB_ID

The styles are classic image-processing filters from styles.py, so the app needs no model
weights and no network. The reply is a PNG when the upload was a PNG and a JPEG otherwise,
with the same width and height as the upload after its EXIF orientation is applied.
"""

from __future__ import annotations

import io
import logging
import time

import styles
from flask import Flask, Response, jsonify, request
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger photos are rejected with 413. At 25 megapixels the decoded RGB image alone is 75 MB.
MAX_PIXELS = 25_000_000
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
JPEG_QUALITY = 90

logger = logging.getLogger("style-transfer")

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES

USAGE = f"""Style transfer: POST a photo as the multipart field "file" to restyle it.

    curl -o out.jpg -F "file=@photo.jpg" <this URL>
    curl -o out.jpg -F "file=@photo.jpg" -F "style=sunset" <this URL>

Styles: {", ".join(styles.STYLES)} (default: {styles.DEFAULT_STYLE}). The style can also be
given as a query parameter, ?style=oil.
The reply has the size of the upload: a PNG for a PNG upload, a JPEG otherwise.
Limits: {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB per upload, {MAX_PIXELS // 1_000_000} megapixels per image.
"""


class UploadError(Exception):
    """A request that cannot be served, with the HTTP status and the JSON error body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@app.errorhandler(UploadError)
def handle_upload_error(exc: UploadError) -> tuple[Response, int]:
    logger.warning("rejected upload with %d: %s: %s", exc.status, exc.error, exc.detail)
    return jsonify(error=exc.error, detail=exc.detail), exc.status


@app.errorhandler(413)
def handle_too_large(_exc: Exception) -> tuple[Response, int]:
    detail = f"the upload is larger than {MAX_UPLOAD_BYTES} bytes; send a smaller photo"
    logger.warning("rejected upload with 413: %s", detail)
    return jsonify(error="upload too large", detail=detail), 413


@app.get("/")
def usage() -> Response:
    return Response(USAGE, mimetype="text/plain")


@app.post("/")
def restyle_upload() -> Response:
    style = select_style()
    data, filename = read_upload()
    image, source_format = decode_photo(data, filename)

    started = time.perf_counter()
    restyled = styles.restyle(image, style)
    elapsed = time.perf_counter() - started
    logger.info(
        "restyled %s (%dx%d %s) with style %s in %.2f s",
        filename,
        image.width,
        image.height,
        source_format,
        style,
        elapsed,
    )

    output = io.BytesIO()
    if source_format == "PNG":
        restyled.save(output, format="PNG")
        mimetype = "image/png"
    else:
        restyled.save(output, format="JPEG", quality=JPEG_QUALITY)
        mimetype = "image/jpeg"
    return Response(output.getvalue(), mimetype=mimetype)


def select_style() -> str:
    """Read the style from the form field or the query string, falling back to the default."""
    name = request.form.get("style") or request.args.get("style") or styles.DEFAULT_STYLE
    name = name.strip().lower()
    if name not in styles.STYLES:
        known = ", ".join(styles.STYLES)
        raise UploadError(400, "unknown style", f"style {name!r} is not one of: {known}")
    return name


def read_upload() -> tuple[bytes, str]:
    upload = request.files.get("file")
    if upload is None:
        raise UploadError(
            400,
            "missing file",
            'send the photo as the multipart form field "file", e.g. curl -F "file=@photo.jpg" URL',
        )
    data = upload.read()
    filename = upload.filename or "upload"
    if not data:
        raise UploadError(400, "empty file", f"the uploaded file {filename!r} has no content")
    return data, filename


def decode_photo(data: bytes, filename: str) -> tuple[Image.Image, str]:
    """Decode an upload into an upright RGB image and return it with the upload's format name.

    Raises UploadError with 400 for data that is not a readable image and 413 for an image
    over MAX_PIXELS. The size is checked from the header, before the pixels are decoded.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UploadError(413, "image too large", f"{filename!r}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UploadError(
            400,
            "invalid image",
            f"{filename!r} is not an image in a format that Pillow can read; send a JPEG or PNG photo",
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(400, "invalid image", f"{filename!r} could not be opened as an image: {exc}") from exc

    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UploadError(
            413,
            "image too large",
            f"{filename!r} is {width}x{height} ({width * height} pixels); the limit is {MAX_PIXELS} pixels",
        )

    source_format = image.format or "unknown"
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(400, "invalid image", f"{filename!r} could not be decoded: {exc}") from exc

    return styles.to_rgb(image), source_format


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"style-transfer app listening on 0.0.0.0:5000, styles: {', '.join(styles.STYLES)}", flush=True)
    app.run(host="0.0.0.0", port=5000)
