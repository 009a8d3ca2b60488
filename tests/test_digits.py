"""Finding the digit (`cnnlab.data.digits`): polarity, alpha, lighting, refusing a blank picture,
bounding box, stroke width, centring, any image mode or file format."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from cnnlab.data.digits import digit_grey, digit_to_mnist, has_strokes, stroke_width
from cnnlab.errors import CnnlabError, NoDigitFound

from .conftest import mnist_root, needs_mnist


def seven(size=(300, 400), offset=(40, 60), scale=1.0, ink=0, paper=255, width=14, mode="L") -> Image.Image:
    """A '7' drawn with a pen at `offset` on a canvas of `size` (W, H)."""
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    x, y = offset
    points = [(x, y), (x + 120 * scale, y), (x + 50 * scale, y + 200 * scale)]
    draw.line(points, fill=ink, width=width, joint="curve")
    return image


def centre_of_mass(array: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(array.shape)
    total = array.sum()
    return (ys * array).sum() / total, (xs * array).sum() / total


def ink_box(array: np.ndarray, level: int = 30) -> tuple[int, int]:
    rows = np.flatnonzero(array.max(axis=1) > level)
    cols = np.flatnonzero(array.max(axis=0) > level)
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def close(a: np.ndarray, b: np.ndarray, mean_tolerance: float = 6.0) -> bool:
    return float(np.abs(a.astype(float) - b.astype(float)).mean()) <= mean_tolerance


def test_output_is_white_ink_on_black_fitted_in_20x20_and_centred_by_mass():
    out = digit_to_mnist(seven(offset=(150, 170), scale=0.6))  # small, off-centre
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255 and out[0].max() == 0 and out[:, 0].max() == 0  # black border, full-white strokes
    height, width = ink_box(out)
    assert max(height, width) in (19, 20, 21) and height > width  # fitted into 20x20, aspect kept
    cy, cx = centre_of_mass(out.astype(float))
    assert abs(cy - 13.5) <= 0.75 and abs(cx - 13.5) <= 0.75


def test_position_and_size_of_the_digit_do_not_matter():
    reference = digit_to_mnist(seven())
    for offset, scale, canvas in [((5, 5), 0.5, (300, 400)), ((900, 500), 3.0, (1500, 1300)), ((10, 200), 1.0, (200, 500))]:
        assert close(digit_to_mnist(seven(size=canvas, offset=offset, scale=scale, width=round(14 * scale))), reference, 10)


def test_polarity_dark_ink_on_light_paper_equals_light_ink_on_dark():
    assert close(digit_to_mnist(seven(ink=0, paper=255)), digit_to_mnist(seven(ink=255, paper=0)), 2)
    # Grey paper and grey pencil: the contrast is stretched to MNIST's full range.
    grey = digit_to_mnist(seven(ink=110, paper=170))
    assert grey.max() == 255 and close(grey, digit_to_mnist(seven()), 4)


def transparent_seven(colour: tuple[int, int, int], background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """The '7' drawn in `colour` on a transparent canvas (toDataURL of a canvas, a drawing app's export)."""
    rgba = Image.new("RGBA", (300, 400), background + (0,))
    ImageDraw.Draw(rgba).line([(40, 60), (160, 60), (90, 260)], fill=colour + (255,), width=14, joint="curve")
    return rgba


@pytest.mark.parametrize("colour, background", [((0, 0, 0), (0, 0, 0)), ((255, 255, 255), (0, 0, 0)),
                                                ((255, 255, 255), (255, 255, 255)), ((0, 0, 0), (255, 255, 255)),
                                                ((230, 40, 40), (0, 0, 0)), ((128, 128, 128), (255, 255, 255))])
def test_on_a_transparent_canvas_the_drawing_is_the_alpha_channel(colour, background):
    # Strokes of any colour, on transparent pixels of any colour: composited on white, white strokes
    # would vanish; dropping alpha, black strokes on transparent black would.
    rgba = transparent_seven(colour, background)
    assert close(digit_to_mnist(rgba), digit_to_mnist(seven()), 3)
    assert close(digit_to_mnist(rgba.convert("LA")), digit_to_mnist(seven()), 3)


def test_opaque_paper_with_a_few_transparent_pixels_is_composited_on_white():
    image = seven().convert("RGBA")
    image.putpixel((150, 200), (0, 0, 0, 0))  # a transparent speck inside: the picture is the colours
    assert close(digit_to_mnist(image), digit_to_mnist(seven()), 1)


BLANKS = {
    "white": Image.new("L", (280, 280), 255), "black": Image.new("L", (280, 280), 0),
    "grey RGB": Image.new("RGB", (50, 50), (200, 180, 150)),
    "transparent black": Image.new("RGBA", (280, 280), (0, 0, 0, 0)),
    "transparent white": Image.new("RGBA", (280, 280), (255, 255, 255, 0)),
    "transparent LA": Image.new("LA", (280, 280), (0, 0)),
    "noisy paper, uneven light": Image.fromarray(np.clip(
        200 + 40 * np.mgrid[0:300, 0:400][1] / 400 + 15 * np.mgrid[0:300, 0:400][0] / 300
        + np.random.default_rng(0).normal(0, 3, (300, 400)), 0, 255).astype(np.uint8)),
    "black to white": Image.fromarray(np.tile(np.linspace(0, 255, 400), (300, 1)).astype(np.uint8)),
    "heavy noise": Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8)),
    "salt and pepper": Image.fromarray(np.where(np.random.default_rng(2).random((300, 300)) < 0.05,
                                                255 * np.random.default_rng(3).integers(0, 2, (300, 300)), 180).astype(np.uint8)),
    "vignette": Image.fromarray((240 - 120 * ((np.mgrid[0:300, 0:300] / 300 - 0.5) ** 2).sum(0) * 2).astype(np.uint8)),
}


@pytest.mark.parametrize("name", list(BLANKS))
def test_a_picture_without_strokes_is_no_digit(name):
    assert not has_strokes(digit_grey(BLANKS[name]))
    with pytest.raises(NoDigitFound, match="no digit found"):
        digit_to_mnist(BLANKS[name])


def test_no_digit_found_is_a_one_line_user_error():
    error = NoDigitFound()
    assert isinstance(error, CnnlabError) and error.exit_code == 1 and "\n" not in str(error)


@pytest.mark.parametrize("contrast", [12, 20, 40])
def test_faint_strokes_on_noisy_paper_are_ink(contrast):
    rng = np.random.default_rng(contrast)
    paper = np.asarray(seven(ink=0, paper=255), dtype=np.float32) / 255  # 1 = paper, 0 = ink
    image = 210 - contrast * (1 - paper) + rng.normal(0, 1.5, paper.shape)
    assert has_strokes(digit_grey(Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))))


def test_a_small_digit_on_a_big_page_and_a_hairline_are_ink():
    page = seven(size=(3000, 4000), offset=(2700, 3600), scale=0.4, width=6)  # 2% of the page, in a corner
    assert has_strokes(digit_grey(page))
    hairline = seven(size=(300, 400), width=1)  # a 1-pixel pen: the speck filter alone would remove it
    assert has_strokes(digit_grey(hairline))
    assert close(digit_to_mnist(hairline), digit_to_mnist(seven()), 25)


def test_uneven_lighting_is_removed():
    yy, xx = np.mgrid[0:400, 0:300]
    light = 0.75 + 0.35 * xx / 300  # a photo lit from the right
    lit = Image.fromarray(np.clip(np.asarray(seven(), dtype=float) * light * 0.9, 0, 255).astype(np.uint8))
    assert close(digit_to_mnist(lit), digit_to_mnist(seven()), 8)


def test_a_speck_of_dust_does_not_move_the_bounding_box():
    image = seven()
    ImageDraw.Draw(image).ellipse((285, 385, 288, 388), fill=0)
    assert close(digit_to_mnist(image), digit_to_mnist(seven()), 3)


def test_a_one_is_stretched_to_full_height_and_stays_narrow():
    image = Image.new("L", (300, 300), 255)
    ImageDraw.Draw(image).line([(150, 40), (150, 260)], fill=0, width=16)
    out = digit_to_mnist(image)
    height, width = ink_box(out)
    assert height in (19, 20, 21) and width <= 5
    assert abs(centre_of_mass(out.astype(float))[1] - 13.5) <= 0.75


@pytest.mark.parametrize("pen", [1, 2, 60])
def test_stroke_width_is_brought_into_mnist_range(pen):
    # A 1-pixel pen on a big canvas would fade to grey hairlines; a fat marker would fill the box.
    image = seven(size=(1200, 1200), offset=(300, 300), scale=3.5, width=pen)
    out = digit_to_mnist(image)
    assert out.max() == 255
    assert 1.2 <= stroke_width(out / 255.0) <= 4.0


def test_mnist_digits_pass_through_almost_unchanged():
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 11:17] = 255  # a 20-pixel-tall bar, as MNIST stores a '1'
    digit[4:24, 10] = digit[4:24, 17] = 120
    out = digit_to_mnist(Image.fromarray(digit))
    assert close(out, digit, 12) and ink_box(out) == ink_box(digit)


def _mode_variants() -> dict[str, Image.Image]:
    base = seven()
    array = np.asarray(base)
    rgba = Image.new("RGBA", base.size, (255, 255, 255, 0))
    ImageDraw.Draw(rgba).line([(40, 60), (160, 60), (90, 260)], fill=(20, 20, 90, 255), width=14, joint="curve")
    palette_transparent = rgba.convert("P")
    palette_transparent.info["transparency"] = 0
    return {
        "L": base, "RGB": base.convert("RGB"), "RGBA": base.convert("RGBA"), "P": base.convert("RGB").convert("P"),
        "1": base.convert("1"), "CMYK": base.convert("RGB").convert("CMYK"), "LA": rgba.convert("LA"),
        "I;16": Image.fromarray(array.astype(np.uint16) * 257), "I": Image.fromarray(array.astype(np.int32) * 4),
        "F": Image.fromarray(array.astype(np.float32) / 255.0), "YCbCr": base.convert("RGB").convert("YCbCr"),
        "RGBA blue ink": rgba,
    }


@pytest.mark.parametrize("name", list(_mode_variants()))
def test_every_image_mode_gives_the_same_digit(name):
    image = _mode_variants()[name]
    assert close(digit_to_mnist(image), digit_to_mnist(seven()), 5), name


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_file_format_decodes_to_the_same_digit(fmt):
    buffer = io.BytesIO()
    image = seven().convert("RGB") if fmt in ("JPEG", "WEBP") else seven()
    image.save(buffer, fmt)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert close(digit_to_mnist(decoded), digit_to_mnist(seven()), 6), fmt


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(image).line([(40, 150), (360, 150)], fill="black", width=14)  # horizontal in the file
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    height, width = ink_box(digit_to_mnist(Image.open(io.BytesIO(buffer.getvalue()))))
    assert height > 3 * width  # displayed vertical, like a '1'


MODES = st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "F"])


@settings(max_examples=40, deadline=None)
@given(mode=MODES, width=st.integers(1, 90), height=st.integers(1, 90), seed=st.integers(0, 2**16))
def test_any_image_gives_a_valid_input(mode, width, height, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., :3] = np.where(rng.random((height, width, 1)) < 0.7, 255, pixels[..., :3])
    image = Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 200)
    elif mode == "F":
        image = Image.fromarray(pixels[..., 0].astype(np.float32) / 255)
    elif mode != "RGBA":
        image = image.convert(mode)
    try:
        out = digit_to_mnist(image)
    except NoDigitFound:
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255


# --- "no digit found" must never hit a real digit ----------------------------------------------

@pytest.mark.slow
@needs_mnist
def test_no_mnist_test_digit_is_called_blank():
    """All 10,000 MNIST test digits, as stored (white on black) and inverted (dark on light)."""
    import torchvision

    digits = torchvision.datasets.MNIST(str(mnist_root()), train=False).data.numpy()
    for name, images in (("as stored", digits), ("inverted", 255 - digits)):
        missed = [i for i, digit in enumerate(images) if not has_strokes(digit_grey(Image.fromarray(digit)))]
        assert missed == [], f"{name}: {len(missed)} digits called blank, e.g. test image #{missed[0]}"


@pytest.mark.slow
@needs_mnist
def test_hard_digits_are_found_and_blank_pictures_are_not():
    """A few pictures of each hard style (faint pencil, a small digit on a big page, thick marker, blur,
    noise, uneven light, ...) and of each kind of blank, decoded as `predict` decodes them."""
    import torchvision

    from cnnlab.predict import open_image

    from tests.support.user_digits import BLANK_KINDS, HARD_STYLES, blank_picture, hard_digit

    digits = torchvision.datasets.MNIST(str(mnist_root()), train=False).data.numpy()
    missed = []
    for s, style in enumerate(HARD_STYLES):
        for i in range(3):
            data, _ = hard_digit(digits[97 * s + i], style, seed=10_000 + 100 * s + i)
            try:
                digit_to_mnist(open_image(data, draft_side=1024))
            except NoDigitFound:
                missed.append(f"{style} #{i}")
    for k, kind in enumerate(BLANK_KINDS):
        for i in range(4):
            data, _ = blank_picture(kind, seed=20_000 + 100 * k + i)
            with pytest.raises(NoDigitFound):
                digit_to_mnist(open_image(data, draft_side=1024))
    assert missed == []
