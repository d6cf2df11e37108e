"""Photo restyling filters written with NumPy and Pillow only, so no model weights are needed.

Each style maps an RGB ``PIL.Image.Image`` to a new RGB image of the same size:

* ``comic``: cartoon abstraction after Winnemöller, Olsen and Gooch, "Real-Time Video
  Abstraction" (SIGGRAPH 2006): bilateral smoothing, soft luminance quantisation and
  difference-of-Gaussians edge lines.
* ``oil``: a weighted Kuwahara filter, which flattens texture into brush-like patches while
  keeping edges sharp, followed by a small saturation boost.
* ``sunset``: Reinhard, Ashikhmin, Gooch and Shirley, "Color Transfer between Images" (IEEE CG&A
  2001): per-channel mean and standard deviation matching in the lαβ colour space, with the
  target statistics taken from a warm palette defined below instead of from a second photo.

The code runs on NumPy 1.24 with Pillow 9.4 (Debian bookworm) as well as NumPy 2 with
Pillow 10 and later. Importing this module has no side effects.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image

# Images above this many pixels are filtered at a reduced size and scaled back up. This bounds
# the filter work of one request to about 8 times that of a 640x427 photo, by pixel count.
# 1920x1080 (2.07 megapixels) still runs at native resolution.
MAX_WORK_PIXELS = 2_100_000

# Rows per block when a per-pixel transform runs on a full-resolution image. For a
# 25-megapixel photo each float32 temporary then takes about 20 MB instead of 300 MB.
_ROWS_PER_BLOCK = 256

# ITU-R BT.601 luma weights, the ones Pillow uses for convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _resample_lanczos() -> int:
    # Pillow 9.1 added Image.Resampling, and Pillow 10 removed the old Image.LANCZOS alias.
    resampling = getattr(Image, "Resampling", Image)
    return resampling.LANCZOS


def to_float(image: Image.Image) -> np.ndarray:
    """Convert an RGB image to a float32 array of shape (height, width, 3) in [0, 1]."""
    return np.asarray(image, dtype=np.float32) / 255.0


def to_image(pixels: np.ndarray) -> Image.Image:
    """Convert a float array in [0, 1] back to an 8-bit RGB image, clipping out-of-range values."""
    scaled = np.clip(pixels * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(scaled, "RGB")


# Modes whose samples can exceed 8 bits. Pillow's convert() clips them to 255 instead of
# scaling, which turns most of a 16-bit photo white.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB for the styles.

    Transparent pixels are composited over white, since their stored colour is often
    arbitrary. 16-bit and 32-bit greyscale is scaled down rather than clipped.
    """
    if image.mode == "RGB":
        return image

    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        # NOTE: the nominal range is guessed from the data: 8-bit content stored in a wide mode
        # stays as is, anything else is read as 16-bit, or as 0 to 1 for float data.
        if image.mode == "F" and peak <= 1.0:
            full_scale = 1.0
        elif peak <= 255.0:
            full_scale = 255.0
        else:
            full_scale = max(65535.0, peak)
        grey = np.clip(values / full_scale * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")

    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    return image.convert("RGB")


def luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels @ _LUMA


# ---------------------------------------------------------------------------------------------
# Filters shared by the styles
# ---------------------------------------------------------------------------------------------


def box_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum ``values`` over every size x size window that fits inside the first two axes.

    The result has shape (height - size + 1, width - size + 1, ...). Running sums are taken
    in float64 because variance = E[x^2] - E[x]^2 cancels badly in float32.
    """
    running = np.cumsum(values, axis=0, dtype=np.float64)
    rows = running[size - 1 :].copy()
    rows[1:] -= running[:-size]

    running = np.cumsum(rows, axis=1)
    sums = running[:, size - 1 :].copy()
    sums[:, 1:] -= running[:, :-size]
    return sums


def gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a 2-D array with a separable Gaussian of standard deviation ``sigma`` pixels.

    Borders are extended by edge replication, so flat borders stay flat.
    """
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()

    height, width = plane.shape
    padded = np.pad(plane, radius, mode="edge")

    rows = np.zeros((height, width + 2 * radius), dtype=np.float32)
    for index, weight in enumerate(kernel):
        rows += weight * padded[index : index + height, :]

    blurred = np.zeros((height, width), dtype=np.float32)
    for index, weight in enumerate(kernel):
        blurred += weight * rows[:, index : index + width]
    return blurred


def bilateral_filter(pixels: np.ndarray, radius: int, sigma_space: float, sigma_range: float) -> np.ndarray:
    """Smooth an RGB float image while keeping edges (Tomasi and Manduchi, ICCV 1998).

    Each output pixel is the average of its (2 * radius + 1)^2 neighbours, weighted by a
    Gaussian of their distance in pixels (``sigma_space``) times a Gaussian of their RGB
    distance (``sigma_range``, in the [0, 1] units of ``pixels``). The loop runs over window
    offsets, not pixels, so the work per offset is a few whole-image array operations.
    """
    height, width, _ = pixels.shape
    padded = np.pad(pixels, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    range_scale = np.float32(-0.5 / sigma_range**2)

    total = np.zeros_like(pixels)
    total_weight = np.zeros((height, width), dtype=np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            space_weight = math.exp(-0.5 * (dy * dy + dx * dx) / sigma_space**2)
            neighbour = padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
            difference = neighbour - pixels
            distance2 = np.einsum("ijk,ijk->ij", difference, difference)
            weight = np.exp(distance2 * range_scale)
            weight *= np.float32(space_weight)
            total += neighbour * weight[..., None]
            total_weight += weight
    return total / total_weight[..., None]


def kuwahara_filter(pixels: np.ndarray, radius: int, sharpness: float = 8.0) -> np.ndarray:
    """Apply a weighted Kuwahara filter to an RGB float image.

    For each pixel the four (radius + 1)^2 squares that have the pixel as one corner are
    candidates. The classic filter copies the mean colour of the square whose luminance
    variance is lowest, which produces blocky seams. Here every square contributes with weight
    (min_variance / variance) ** (sharpness / 2), the weighting of the generalised Kuwahara
    filter (Papari, Petkov and Campisi, IEEE TIP 2007), which blends smoothly where two squares
    are about as flat.
    """
    height, width, _ = pixels.shape
    size = radius + 1
    padded = np.pad(pixels, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    padded_luma = luminance(padded)

    area = float(size * size)
    colour_means = (box_sum(padded, size) / area).astype(np.float32)
    luma_means = box_sum(padded_luma, size) / area
    luma_variances = (box_sum(padded_luma * padded_luma, size) / area - luma_means**2).astype(np.float32)

    # In padded coordinates pixel (y, x) sits at (y + radius, x + radius). So the square above
    # and to the left of it starts at (y, x), and the one below and to the right at (y + r, x + r).
    corners = [(0, 0), (0, radius), (radius, 0), (radius, radius)]
    variances = [luma_variances[top : top + height, left : left + width] for top, left in corners]
    means = [colour_means[top : top + height, left : left + width] for top, left in corners]

    # The floor keeps flat regions from dividing by zero and makes equally flat squares share.
    floor = np.float32(1e-5)
    lowest = np.minimum(np.minimum(variances[0], variances[1]), np.minimum(variances[2], variances[3]))
    total = np.zeros_like(pixels)
    total_weight = np.zeros((height, width), dtype=np.float32)
    for variance, mean in zip(variances, means, strict=True):
        weight = ((lowest + floor) / (np.maximum(variance, 0.0) + floor)) ** np.float32(sharpness / 2.0)
        total += mean * weight[..., None]
        total_weight += weight
    return total / total_weight[..., None]


# ---------------------------------------------------------------------------------------------
# Colour spaces
# ---------------------------------------------------------------------------------------------

# Full-range YCbCr as in JPEG (ITU-T T.871), with Cb and Cr centred on 0.
_RGB_TO_YCBCR = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=np.float32
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR.astype(np.float64)).astype(np.float32)

# Matrices from Reinhard et al. 2001: RGB to LMS cone space, then log LMS to lαβ.
_RGB_TO_LMS = np.array(
    [
        [0.3811, 0.5783, 0.0402],
        [0.1967, 0.7244, 0.0782],
        [0.0241, 0.1288, 0.8444],
    ],
    dtype=np.float64,
)
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LOG_LMS_TO_LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
_LAB_TO_LOG_LMS = np.linalg.inv(_LOG_LMS_TO_LAB)

# LMS values are clamped here before the logarithm, since black pixels would give log10(0).
_MIN_LMS = 1.0 / 255.0


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """Convert RGB floats in [0, 1] to Reinhard's lαβ space (decorrelated log cone responses)."""
    lms = np.maximum(pixels @ _RGB_TO_LMS.T.astype(np.float32), np.float32(_MIN_LMS))
    return np.log10(lms) @ _LOG_LMS_TO_LAB.T.astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    lms = np.power(np.float32(10.0), lab @ _LAB_TO_LOG_LMS.T.astype(np.float32))
    return lms @ _LMS_TO_RGB.T.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


def comic(pixels: np.ndarray) -> np.ndarray:
    """Restyle as a cartoon: flat colour regions, banded shading and dark outlines."""
    smooth = bilateral_filter(pixels, radius=2, sigma_space=2.0, sigma_range=0.12)

    # Edges come from a once-smoothed image so that texture such as grass yields few lines.
    edge_luma = luminance(smooth) * np.float32(100.0)
    smooth = bilateral_filter(smooth, radius=2, sigma_space=2.0, sigma_range=0.12)
    smooth = bilateral_filter(smooth, radius=2, sigma_space=2.0, sigma_range=0.12)

    ycbcr = smooth @ _RGB_TO_YCBCR.T
    luma = ycbcr[..., 0] * np.float32(100.0)

    # Soft quantisation to 8 bands: a tanh step instead of rounding, so gradients become
    # bands without the aliasing of hard steps. The slope is per unit of luma on a 0-100 scale.
    band = np.float32(100.0 / 8)
    nearest = np.round(luma / band) * band
    luma = nearest + band / 2 * np.tanh(np.float32(0.6) * (luma - nearest))

    # A difference of Gaussians is negative on the dark side of a luminance edge. Pixels where
    # it falls below -threshold are darkened smoothly towards black.
    dog = gaussian_blur(edge_luma, 1.0) - gaussian_blur(edge_luma, 1.6)
    threshold = np.float32(0.6)
    lines = np.clip(1.0 + np.tanh(np.float32(0.8) * (dog + threshold)), 0.0, 1.0)

    ycbcr[..., 0] = luma / np.float32(100.0)
    ycbcr[..., 1:] *= np.float32(1.25)
    restyled = ycbcr @ _YCBCR_TO_RGB.T
    return restyled * lines[..., None]


def oil(pixels: np.ndarray) -> np.ndarray:
    """Restyle as an oil painting: brush-sized flat patches with crisp edges and richer colour."""
    height, width, _ = pixels.shape
    # About 1/150 of the image's geometric mean side, so the look does not depend on
    # resolution: radius 3 for a 640x427 photo. Larger radii or a second pass erase lines a
    # few pixels wide, such as the launch towers in the rocket photo.
    radius = max(2, int(round(math.sqrt(height * width) / 150.0)))
    painted = kuwahara_filter(pixels, radius)

    grey = luminance(painted)[..., None]
    return grey + (painted - grey) * np.float32(1.3)


# Target palette for the "sunset" style as (R, G, B, weight). Weights are relative pixel shares.
SUNSET_PALETTE = [
    ((255, 94, 58), 3.0),  # orange red
    ((255, 149, 0), 3.0),  # amber
    ((255, 206, 120), 2.0),  # pale gold
    ((199, 68, 120), 2.0),  # magenta
    ((102, 45, 145), 1.5),  # violet
    ((33, 30, 70), 1.5),  # dusk navy
]


def palette_statistics(palette: list[tuple[tuple[int, int, int], float]]) -> tuple[np.ndarray, np.ndarray]:
    """Compute the weighted mean and standard deviation of a palette in lαβ space."""
    colours = np.array([colour for colour, _ in palette], dtype=np.float32) / 255.0
    weights = np.array([weight for _, weight in palette], dtype=np.float64)
    weights /= weights.sum()

    lab = rgb_to_lab(colours).astype(np.float64)
    mean = weights @ lab
    std = np.sqrt(weights @ (lab - mean) ** 2)
    return mean, std


MAX_STD_RATIO = 1.6


def colour_transfer(
    pixels: np.ndarray,
    source_mean: np.ndarray,
    source_std: np.ndarray,
    target_mean: np.ndarray,
    target_std: np.ndarray,
) -> np.ndarray:
    """Shift and scale each lαβ channel from the source statistics to the target statistics."""
    # A palette of a few colours spreads much wider than a photo does (the sunset palette's α
    # spread is 3 to 4 times that of the sample photos), so an unclamped ratio would push most
    # pixels to full saturation.
    ratio = target_std / np.maximum(source_std, 1e-6)
    scale = np.clip(ratio, 1.0 / MAX_STD_RATIO, MAX_STD_RATIO).astype(np.float32)
    lab = rgb_to_lab(pixels)
    lab = (lab - source_mean.astype(np.float32)) * scale + target_mean.astype(np.float32)
    return lab_to_rgb(lab)


def image_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the per-channel mean and standard deviation of an RGB float image in lαβ space."""
    lab = rgb_to_lab(pixels.reshape(-1, 3)).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


SUNSET_MEAN, SUNSET_STD = palette_statistics(SUNSET_PALETTE)


def sunset(pixels: np.ndarray) -> np.ndarray:
    """Restyle with warm dusk colours by Reinhard colour transfer towards ``SUNSET_PALETTE``."""
    mean, std = image_statistics(pixels)
    return colour_transfer(pixels, mean, std, SUNSET_MEAN, SUNSET_STD)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

Style = Callable[[np.ndarray], np.ndarray]

STYLES: dict[str, Style] = {"comic": comic, "oil": oil, "sunset": sunset}
DEFAULT_STYLE = "comic"


def _work_size(width: int, height: int) -> tuple[int, int]:
    if width * height <= MAX_WORK_PIXELS:
        return width, height
    factor = math.sqrt(MAX_WORK_PIXELS / (width * height))
    return max(1, int(width * factor)), max(1, int(height * factor))


def restyle(image: Image.Image, style: str = DEFAULT_STYLE) -> Image.Image:
    """Restyle ``image`` with the named style and return an RGB image of the same size.

    Raises KeyError for a style name that is not in ``STYLES``. Images larger than
    ``MAX_WORK_PIXELS`` are filtered at a reduced size and resized back with Lanczos, except
    for "sunset", which is per-pixel and so runs at full resolution in row blocks.
    """
    function = STYLES[style]
    image = to_rgb(image)
    width, height = image.size
    work_size = _work_size(width, height)

    if function is sunset:
        return _sunset_in_blocks(image, work_size)

    work_image = image
    if work_size != image.size:
        work_image = image.resize(work_size, _resample_lanczos())

    result = to_image(function(to_float(work_image)))
    if result.size != image.size:
        result = result.resize(image.size, _resample_lanczos())
    return result


def _sunset_in_blocks(image: Image.Image, work_size: tuple[int, int]) -> Image.Image:
    # Statistics from a reduced copy are close enough for a mean and a standard deviation.
    sample = image
    if work_size != image.size:
        sample = image.resize(work_size, _resample_lanczos())
    mean, std = image_statistics(to_float(sample))

    source = np.asarray(image)
    output = np.empty_like(source)
    for top in range(0, source.shape[0], _ROWS_PER_BLOCK):
        block = source[top : top + _ROWS_PER_BLOCK].astype(np.float32) / 255.0
        restyled = colour_transfer(block, mean, std, SUNSET_MEAN, SUNSET_STD)
        output[top : top + _ROWS_PER_BLOCK] = np.clip(restyled * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return Image.fromarray(output, "RGB")
