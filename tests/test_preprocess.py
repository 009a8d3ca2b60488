"""The preprocessing contract (`cnnlab.data.preprocess`): the two kinds, normalisation, metadata."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from cnnlab.data.preprocess import Preprocessing, resize_center_crop
from cnnlab.errors import CnnlabError


def seven() -> Image.Image:
    """A '7' drawn with a pen, dark on light paper."""
    image = Image.new("L", (300, 400), 255)
    ImageDraw.Draw(image).line([(40, 60), (160, 60), (90, 260)], fill=0, width=14, joint="curve")
    return image


def test_digit_preprocessing_for_rgb_models_repeats_the_grey_digit():
    prep = Preprocessing("digit", 3, (28, 28), [0.1] * 3, [0.3] * 3)
    out = prep.image_to_uint8(seven())
    assert out.shape == (3, 28, 28) and torch.equal(out[0], out[2])


def test_resize_kind_resizes_and_centre_crops():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 16, 32))  # a blue strip cropped away by the centre crop
    prep = Preprocessing("resize", 3, (16, 16), [0.5] * 3, [0.5] * 3)
    out = prep.image_to_uint8(image)
    assert out.shape == (3, 16, 16) and out[2].max() < 50 and out[0].min() > 200
    assert resize_center_crop(image.convert("RGBA"), (16, 16), 1).shape == (16, 16, 1)


def test_normalize_matches_the_stored_mean_and_std():
    prep = Preprocessing("digit", 1, (28, 28), [0.5], [0.25])
    x = prep.normalize(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_metadata_round_trip_and_validation():
    prep = Preprocessing("digit", 1, (28, 28), [0.13], [0.31])
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    for bad in [{}, {**prep.to_dict(), "kind": "magic"}, {**prep.to_dict(), "std": [0.0]},
                {**prep.to_dict(), "mean": [0.1, 0.2]}, {**prep.to_dict(), "size": "big"}]:
        with pytest.raises(CnnlabError):
            Preprocessing.from_dict(bad)
