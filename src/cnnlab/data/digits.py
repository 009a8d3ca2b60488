"""Finding the digit: any picture of one handwritten digit -> an MNIST-style 28x28 (`digit_to_mnist`).

The `digit` kind of `Preprocessing` uses it. The steps, the way MNIST itself was made: grey (on a
transparent canvas the drawing is the alpha channel: `digit_grey`), a picture without any stroke
refused (`NoDigitFound`, decided by `has_strokes`), dark-ink-on-light-paper inverted, uneven
lighting and paper texture removed (`ink_map`), cropped to the ink, stroke width brought into
MNIST's range, scaled to fit 20x20 keeping the aspect ratio, centred by centre of mass in 28x28.
The thresholds and how they were measured are in docs/PREDICT.md.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..errors import NoDigitFound
from .colour import has_alpha, to_mode

# Longest side worked on at full resolution; bigger pictures (phone photos) are area-averaged
# down first so that one image costs milliseconds, not seconds.
WORKING_SIDE = 1024
# MNIST's strokes, measured on its test set as 2·area/edge-length of the ink >= 128, are 1.2-2.9
# pixels wide (median 1.84) once the digit fills its 20x20 box. Strokes far outside that range
# (a 1-pixel pen on a large canvas, a fat marker) are what models trained on MNIST get wrong.
STROKE_TARGET = 2.0
STROKE_MIN, STROKE_MAX = 1.5, 3.6
# When is there a digit at all (`has_strokes`)? Measured on every MNIST test digit, hard pictures
# of digits (faint pencil, a small digit on a big page, thick marker, blur, noise, uneven light)
# and blank pictures (paper, noise, gradients, vignettes, shadows, JPEG, texture): see
# docs/PREDICT.md. The thresholds sit near the middle of the range that separates the two.
INK_FLOOR = 5.0           # grey levels: the faintest stroke still called ink on noiseless paper
INK_SEED_NOISE = 6.5      # a stroke reaches this many noise levels of the paper somewhere,
INK_GROW_NOISE = 3.25     # and is followed along while it stays above this many
MIN_STROKE_EXTENT = 14    # pixels at the working size (1.4% of a photo's long side): the smallest digit's
                          # height or width; smaller marks are specks
MIN_STROKE_PIXELS = 12
HAIRLINE_EXTENT = 24      # pixels: a 1-pixel line (which the speck filter removes) is at least this long
SURROUND = 11             # pixels: a spot's contrast is measured against the mean of this square
HALO_RATIO = 1.5          # a mark next to an opposite one this much stronger is only its halo
COARSEST_SIDE = 128       # blurred strokes are looked for down to this shortest side
SPECK_FRACTION = 0.02     # more isolated specks than this: salt-and-pepper noise, filtered harder


# ---------------------------------------------------------------------------------------------
# Digits: any picture of one digit -> an MNIST-style 28x28
# ---------------------------------------------------------------------------------------------

def digit_to_mnist(image: Image.Image, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """Any picture of one digit -> (H, W) uint8 the way MNIST was made: white ink on black,
    fitted into a 20x20 box keeping its aspect ratio, centred by centre of mass in 28x28.

    A picture without any stroke (an empty canvas, blank or noisy paper, a lighting gradient)
    raises `NoDigitFound`: there is nothing to classify, and a model would still answer.
    """
    out_h, out_w = size
    box = max(1, round(min(out_h, out_w) * 20 / 28))
    grey = digit_grey(image)
    if not has_strokes(grey, floor=max(INK_FLOOR, jpeg_block_step(image))):
        raise NoDigitFound()
    pixels = np.asarray(grey)
    if _speck_fraction(pixels) > SPECK_FRACTION:  # salt-and-pepper noise: else every speck would be ink
        grey = Image.fromarray(_median3(_median3(pixels)), "L")
    ink = ink_map(grey)                                     # (H, W) float 0..1, ink = 1
    if ink is None:
        raise NoDigitFound()
    top, bottom, left, right = ink_bounding_box(ink)
    crop = ink[top:bottom, left:right]
    crop = _to_working_size(crop, box)
    crop = _normalise_stroke_width(crop, box)
    scale = box / max(crop.shape)
    new_w, new_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    fitted = Image.fromarray(crop, "F").resize((new_w, new_h), Image.BOX)  # area averaging = anti-aliasing
    fitted_array = np.clip(np.asarray(fitted, dtype=np.float32), 0, None)
    peak = float(fitted_array.max())
    if peak <= 0:
        raise NoDigitFound()
    # MNIST's strokes reach full white; a thin stroke averaged down would otherwise stay grey.
    fitted_array *= 255.0 / peak
    ys, xs = np.indices(fitted_array.shape)
    total = fitted_array.sum()
    cy, cx = (ys * fitted_array).sum() / total, (xs * fitted_array).sum() / total
    # Put the centre of mass (centre of the pixel cy, cx) at the centre of the output.
    top_out = int(round(out_h / 2 - (cy + 0.5)))
    left_out = int(round(out_w / 2 - (cx + 0.5)))
    top_out = min(max(top_out, 0), out_h - new_h)
    left_out = min(max(left_out, 0), out_w - new_w)
    canvas = np.zeros((out_h, out_w), dtype=np.float32)
    canvas[top_out:top_out + new_h, left_out:left_out + new_w] = fitted_array
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def digit_grey(image: Image.Image) -> Image.Image:
    """Any picture of a digit -> an 8-bit grey picture of at most `WORKING_SIDE` pixels a side.

    On a transparent canvas (a drawing app's export: the border is mostly transparent) the drawing
    is the alpha channel, whatever the strokes' colour: white strokes on transparency are as much
    ink as black ones. Everything else is composited on white and converted to grey (`to_mode`).
    """
    alpha = _drawing_alpha(image)
    grey = ImageOps.invert(alpha) if alpha is not None else to_mode(image, 1)
    longest = max(grey.size)
    if longest > WORKING_SIDE:
        factor = longest / WORKING_SIDE
        grey = grey.resize((max(1, round(grey.width / factor)), max(1, round(grey.height / factor))), Image.BOX)
    return grey


def _drawing_alpha(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode L) when it holds the drawing: the picture has transparency and
    its border is mostly transparent. None for opaque pictures and for opaque paper with a few
    transparent pixels, which are composited on white as before."""
    if not has_alpha(image):
        return None
    image = ImageOps.exif_transpose(image) or image
    alpha = np.asarray(image.convert("RGBA").getchannel("A"))
    band = max(1, round(min(alpha.shape) * 0.03))
    border = np.concatenate([alpha[:band].ravel(), alpha[-band:].ravel(), alpha[:, :band].ravel(), alpha[:, -band:].ravel()])
    if border.size == 0 or np.median(border) >= 128:
        return None
    return Image.fromarray(np.ascontiguousarray(alpha), "L")


# ---------------------------------------------------------------------------------------------
# Is there a digit at all? Strokes that stand out from the paper, not light, noise or specks
# ---------------------------------------------------------------------------------------------

def jpeg_block_step(image: Image.Image) -> float:
    """Grey levels by which neighbouring 8x8 blocks of a JPEG can differ from compression alone
    (the luma DC quantisation step / 8): 2 at quality 50, 10 at quality 10; 0 for other formats.
    A heavily compressed blank photo is a mosaic of such steps, which must not count as ink."""
    tables = getattr(image, "quantization", None)
    if not isinstance(tables, dict) or not tables.get(0):
        return 0.0
    return float(tables[0][0]) / 8.0


def has_strokes(grey_image: Image.Image, floor: float = INK_FLOOR) -> bool:
    """True when an 8-bit grey picture (`digit_grey`) holds at least one stroke.

    A stroke is a connected mark of at least `MIN_STROKE_EXTENT` pixels whose local contrast (a 3x3
    spot against the mean of the `SURROUND` square around it, either polarity) reaches
    `INK_SEED_NOISE` times the paper's noise level somewhere and `INK_GROW_NOISE` times along it,
    and at least `floor` grey levels on noiseless paper (`INK_FLOOR`; more for JPEGs whose
    compression alone makes bigger steps, `jpeg_block_step`). Local contrast ignores light: a
    gradient, a vignette or a soft shadow changes too slowly to register over 11 pixels. Specks
    (salt-and-pepper noise, dust) are median-filtered away first; 1-pixel hairlines, which the
    filter also removes, are looked for on the unfiltered picture, as marks at least
    `HAIRLINE_EXTENT` long. Blurred strokes are looked for on coarser copies of the picture, down
    to `COARSEST_SIDE`.
    """
    raw = np.asarray(grey_image, dtype=np.uint8)
    if raw.size == 0:
        return False
    speckled = _speck_fraction(raw) > SPECK_FRACTION
    level = _median3(_median3(raw)).astype(np.float32)  # filtered twice, clusters of two or three specks go too
    if speckled:
        # Heavy salt-and-pepper noise leaves clusters of specks behind: at half size they are dots
        # that one more median removes (with strokes thinner than about 4 pixels, which cannot
        # be told from the specks anyway; nor can hairlines).
        level = _median3(_half(level))
    while True:
        if _has_stroke_at_scale(level, floor):
            return True
        if min(level.shape) // 2 < COARSEST_SIDE:
            break
        level = _half(level)
    # 1-pixel hairlines, which the median removes: the same test on the unfiltered picture, where
    # only long marks count (specks and a JPEG's ringing around them are short).
    return not speckled and _has_stroke_at_scale(raw.astype(np.float32), floor, HAIRLINE_EXTENT)


def _speck_fraction(image: np.ndarray, contrast: int = 30) -> float:
    """Fraction of pixels that are specks: `contrast` levels brighter than all 8 neighbours, or
    darker than all of them (salt-and-pepper noise; a stroke's pixels have neighbours like them)."""
    padded = np.pad(image.astype(np.int16), 1, mode="edge")
    h, w = image.shape
    around = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    centre = padded[1:h + 1, 1:w + 1]
    specks = (centre > np.maximum.reduce(around) + contrast) | (centre < np.minimum.reduce(around) - contrast)
    return float(specks.mean())


def _half(image: np.ndarray) -> np.ndarray:
    """Half the size, each pixel the mean of a 2x2 square."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _has_stroke_at_scale(grey: np.ndarray, floor: float, min_extent: int = MIN_STROKE_EXTENT) -> bool:
    """`has_strokes` at one scale: local contrast, the paper's noise in it, hysteresis marks."""
    surround = max(5, min(SURROUND, (min(grey.shape) // 4) | 1))  # tiny pictures: a smaller surround
    contrast = _box_mean(grey, 3) - _box_mean(grey, surround)
    noise = _noise_level(contrast, 0.25)
    seed = max(floor, INK_SEED_NOISE * noise)
    grow = max(floor / 2, INK_GROW_NOISE * noise)
    extent = min(min_extent, 0.3 * min(grey.shape))
    return any(_is_mark(sign * contrast, seed, grow, extent, MIN_STROKE_PIXELS) for sign in (1.0, -1.0))


def _is_mark(strength: np.ndarray, seed: float, grow: float, min_extent: float, min_pixels: int) -> bool:
    """Is there a connected mark of `strength` >= `grow` that reaches `seed` somewhere (hysteresis
    thresholding, as Canny's edge detector does), at least `min_extent` pixels tall or wide and
    `min_pixels` pixels in all, and no mere halo?

    Local contrast leaves a faint ring of the opposite sign around any dark speck (the speck
    darkens its neighbours' surroundings); a ring whose own box holds an opposite mark more than
    `HALO_RATIO` times stronger is that halo, not a stroke.
    """
    if float(strength.max()) < seed:
        return False
    ys, xs, root = _connected_components(strength >= min(grow, seed))
    count = len(root)
    top = np.zeros(count, dtype=np.float32)
    np.maximum.at(top, root, strength[ys, xs])
    pixels = np.bincount(root, minlength=count)
    y0, y1 = np.full(count, ys.max()), np.zeros(count, dtype=ys.dtype)
    x0, x1 = np.full(count, xs.max()), np.zeros(count, dtype=xs.dtype)
    np.minimum.at(y0, root, ys)
    np.maximum.at(y1, root, ys)
    np.minimum.at(x0, root, xs)
    np.maximum.at(x1, root, xs)
    extent = np.maximum(y1 - y0, x1 - x0) + 1
    for mark in np.flatnonzero((top >= seed) & (extent >= min_extent) & (pixels >= min_pixels)):
        opposite = -strength[y0[mark]:y1[mark] + 1, x0[mark]:x1[mark] + 1]
        if float(opposite.max()) <= HALO_RATIO * top[mark]:
            return True
    return False


def _connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components of a boolean mask: (ys, xs, root) of its pixels, `root` numbering
    each pixel's component (by its first pixel). Union-find on the pixels' neighbour pairs, all
    in numpy: roots are hooked to the smaller root and paths halved until nothing changes."""
    ys, xs = np.nonzero(mask)
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    h, w = mask.shape
    first, second = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):   # each neighbour pair once
        a = index[0:h - dy, max(0, -dx):w - max(0, dx)]
        b = index[dy:h, max(0, dx):w + min(0, dx)]
        both = (a >= 0) & (b >= 0)
        first.append(a[both])
        second.append(b[both])
    a, b = np.concatenate(first), np.concatenate(second)
    root = np.arange(len(ys))
    while True:
        root_a, root_b = root[a], root[b]
        apart = root_a != root_b
        if not apart.any():
            return ys, xs, root
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]
        low = np.minimum(root_a, root_b)
        np.minimum.at(root, root_a, low)
        np.minimum.at(root, root_b, low)
        while True:  # point every pixel at its component's current root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped


def _median3(image: np.ndarray) -> np.ndarray:
    """3x3 median (edges repeated) of a 2-D array, by Paeth's 19-exchange sorting network: one
    isolated speck cannot survive it, strokes two or more pixels wide do."""
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    v = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    for i, j in ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
                 (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2)):
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    return v[4]


def _box_mean(array: np.ndarray, size: int) -> np.ndarray:
    """Mean over each pixel's size x size square (size odd, edges repeated), as float32."""
    r = size // 2
    h, w = array.shape
    padded = np.pad(array.astype(np.float32), ((r, r), (0, 0)), mode="edge")
    rows = sum(padded[i:i + h] for i in range(size))
    padded = np.pad(rows, ((0, 0), (r, r)), mode="edge")
    return sum(padded[:, i:i + w] for i in range(size)) / float(size * size)


def _noise_level(values: np.ndarray, quantile: float) -> float:
    """Standard deviation of the paper's noise in `values`, from a low quantile of the absolute
    deviations (the 0.25 quantile still measures the paper when strokes and their surroundings
    cover up to three quarters of a small picture), assuming Gaussian noise."""
    sample = values[::2, ::2] if values.size > 250_000 else values  # a quarter of a big picture is plenty
    deviations = np.abs(sample - np.median(sample)).ravel()
    # The quantile of |x| for a standard normal x: 0.3186 at 0.25, 0.6745 at 0.5.
    scale = {0.25: 0.3186, 0.5: 0.6745}[quantile]
    return float(np.quantile(deviations, quantile)) / scale


def ink_map(grey_image: Image.Image) -> np.ndarray | None:
    """Grey picture (`digit_grey`) -> float32 (H, W) ink strength in 0..1 on a 0 background, or
    None when nothing differs from the paper. Whether there is a digit at all is `has_strokes`'s call.

    Polarity comes from the border (the background): ink is whatever differs most from it, so
    dark ink on light paper and light ink on dark canvases both work. The background is
    modelled as a plane fitted to the border, which removes the lighting gradient of photos;
    paper texture and JPEG noise below a few noise-levels are dropped.
    """
    if grey_image.width * grey_image.height == 0:
        return None
    grey = np.asarray(grey_image, dtype=np.float32)
    h, w = grey.shape
    band = max(1, round(min(h, w) * 0.03))
    background, residual = _fit_background(grey, band)
    difference = grey - background
    # 3x3 box blur: single noisy pixels must not decide polarity or the ink's strength.
    smooth = _box_blur3(difference)
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual)))) if residual.size else 0.0
    darkest, brightest = float(smooth.min()), float(smooth.max())
    ink = -difference if -darkest > brightest else difference
    strength = max(-darkest, brightest)
    if strength <= 0:
        return None
    threshold = max(4.0 * noise, 0.15 * strength)
    ink = np.where(ink > threshold, ink, 0.0)
    # Normalise by a robust peak of the ink (not the single brightest pixel).
    peak = float(np.percentile(ink[ink > 0], 95)) if (ink > 0).any() else 0.0
    if peak <= 0:
        return None
    return np.clip(ink / peak, 0.0, 1.0).astype(np.float32)


def _box_blur3(array: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood (edges repeated)."""
    padded = np.pad(array, 1, mode="edge")
    h, w = array.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _fit_background(grey: np.ndarray, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane a + b·x + c·y through the pixels of the border `band`, refitted without
    outliers (ink touching the border, a shadow's edge). Returns (plane (H, W), the residuals of the
    border pixels that are background)."""
    h, w = grey.shape
    strips = [(slice(0, band), slice(0, w)), (slice(h - band, h), slice(0, w)),
              (slice(band, h - band), slice(0, band)), (slice(band, h - band), slice(w - band, w))]
    parts = []
    for rows, cols in strips:
        if rows.start >= rows.stop or cols.start >= cols.stop:
            continue  # a picture thinner than two bands
        ys, xs = np.mgrid[rows, cols]
        parts.append(np.stack([grey[rows, cols].ravel(), xs.ravel() / w - 0.5, ys.ravel() / h - 0.5], axis=1))
    samples = np.concatenate(parts).astype(np.float64)
    # A few thousand border pixels pin a plane down as well as all of them.
    samples = samples[::max(1, len(samples) // 4000)]
    values, xs, ys = samples[:, 0], samples[:, 1], samples[:, 2]
    design = np.stack([np.ones_like(values), xs, ys], axis=1)
    # Start from a flat background at the border's median (right while ink covers less than half
    # of the border), then refit the plane through the pixels close to it, a few times.
    coef = np.array([np.median(values), 0.0, 0.0])
    keep = np.ones(values.size, dtype=bool)
    if values.size >= 3 and min(h, w) >= 3:
        for _ in range(4):
            residual = values - design @ coef
            spread = 1.4826 * float(np.median(np.abs(residual[keep] - np.median(residual[keep]))))
            new_keep = np.abs(residual) <= max(3.0 * spread, 12.0)
            if new_keep.sum() < 3:
                break
            keep = new_keep
            coef, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
    plane = (coef[0] + coef[1] * (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
             + coef[2] * (np.arange(h, dtype=np.float32) / h - 0.5)[:, None])
    return plane.astype(np.float32), (values - design @ coef)[keep]


def ink_bounding_box(ink: np.ndarray, trim: float = 0.006) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive, of the ink; `trim` of the ink's mass is
    allowed to fall outside on each side, so a far-away speck of dust does not stretch the box."""
    rows, cols = ink.sum(axis=1), ink.sum(axis=0)
    total = float(rows.sum())

    def span(mass: np.ndarray) -> tuple[int, int]:
        cumulative = np.cumsum(mass)
        first = int(np.searchsorted(cumulative, trim * total, side="right"))
        last = int(np.searchsorted(cumulative, (1 - trim) * total, side="left"))
        first = min(first, len(mass) - 1)
        last = max(min(last, len(mass) - 1), first)
        # Grow back over the faint anti-aliased edge that belongs to the stroke itself.
        while first > 0 and mass[first - 1] > 0.02 * mass.max():
            first -= 1
        while last < len(mass) - 1 and mass[last + 1] > 0.02 * mass.max():
            last += 1
        return first, last + 1

    top, bottom = span(rows)
    left, right = span(cols)
    return top, bottom, left, right


def _to_working_size(crop: np.ndarray, box: int) -> np.ndarray:
    """Shrink a large crop to about 4x the target box with max-pooling, which keeps thin
    strokes at full strength (area averaging would fade a 1-pixel pen line to grey)."""
    factor = max(crop.shape) // (4 * box)
    if factor < 2:
        return np.ascontiguousarray(crop, dtype=np.float32)
    h, w = crop.shape
    padded_h, padded_w = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.zeros((padded_h, padded_w), dtype=np.float32)
    padded[:h, :w] = crop
    return padded.reshape(padded_h // factor, factor, padded_w // factor, factor).max(axis=(1, 3))


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels: 2·area / boundary length of the ink (>= 0.5 strength)."""
    mask = ink >= 0.5
    area = int(mask.sum())
    if area == 0:
        return 0.0
    edges = (int((mask[1:] != mask[:-1]).sum()) + int((mask[:, 1:] != mask[:, :-1]).sum())
             + int(mask[0].sum()) + int(mask[-1].sum()) + int(mask[:, 0].sum()) + int(mask[:, -1].sum()))
    return 2.0 * area / max(edges, 1)


def _normalise_stroke_width(crop: np.ndarray, box: int) -> np.ndarray:
    """Dilate hairlines and thin fat marker strokes so that, once scaled into the box, they are
    as wide as MNIST's pen."""
    scale = box / max(crop.shape)
    width = stroke_width(crop)
    if width <= 0:
        return crop
    scaled = width * scale
    image = Image.fromarray(crop, "F")
    if scaled < STROKE_MIN:
        # A max filter of size k widens a stroke by k - 1 pixels.
        radius = round((STROKE_TARGET / scale - width) / 2)
        if radius >= 1:
            image = image.filter(ImageFilter.MaxFilter(2 * radius + 1))
    elif scaled > STROKE_MAX:
        # Never erode more than a quarter of the width: thinner parts of the stroke must survive.
        radius = min(round((width - STROKE_MAX / scale) / 2), int(width / 4))
        if radius >= 1:
            image = image.filter(ImageFilter.MinFilter(2 * radius + 1))
    return np.asarray(image, dtype=np.float32)
