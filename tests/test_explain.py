"""`cnnlab explain` and `cnnlab.explain.explain`: every method on grey and colour models, Grad-CAM's
layer choice and its errors, targets, the CLI's pictures, JSON lines and bad files; and, on a small
model trained on real MNIST, the evidence that the maps mean something (docs/EXPLAIN.md): the deletion
test and the model-randomisation check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("captum", reason="the explain extra (captum) is not installed")

from cnnlab.runs import open_run  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.explain import (METHODS, background_uint8, blank_pixels, deletion_test, explain, explanation_figure,  # noqa: E402
                            gradcam_layer, moved_pixels, overlay_rgba, randomized, resolve_target, spearman)

from .conftest import needs_mnist  # noqa: E402
from tests.support.user_digits import drawn_one, encode, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def grey_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("grey") / "model.safetensors")


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("colour") / "model.safetensors", classes=5, kind="resize",
                           input_shape=(3, 32, 32))


def inputs_for(bundle, n: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *bundle.input_shape), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("which", ["grey_model", "colour_model"])
def test_every_method_gives_one_finite_map_per_image_at_input_size(method, which, request):
    bundle = open_run(request.getfixturevalue(which))
    inputs = inputs_for(bundle)
    result = explain(bundle, inputs, method)
    assert result.maps.shape == (3, *bundle.input_shape[1:]) and torch.isfinite(result.maps).all()
    # Random weights: a rectified Grad-CAM can be 0 for one class, not for all of them.
    assert any(explain(bundle, inputs, method, target=t).maps.abs().sum() > 0 for t in range(len(bundle.classes)))
    assert torch.equal(result.target, result.predicted)  # by default: the predicted class
    assert torch.allclose(result.probabilities.sum(1), torch.ones(3), atol=1e-5)
    if method in ("gradcam", "layercam"):
        assert (result.maps >= 0).all() and not result.signed and result.layer is not None
    else:
        assert result.signed and result.layer is None
    single = explain(bundle, inputs[0], method)  # one (C, H, W) input works too
    assert torch.allclose(single.maps[0], result.maps[0], atol=1e-5, rtol=1e-4)


def test_integrated_gradients_add_up_to_the_score_change(grey_model):
    """Completeness (Sundararajan et al.): the attributions sum to score(input) - score(blank)."""
    bundle = open_run(grey_model)
    inputs = inputs_for(bundle, 2)
    result = explain(bundle, inputs, "integrated-gradients", target=4)
    prep = bundle.preprocessing
    with torch.no_grad():
        scores = bundle.model(prep.normalize(inputs))[:, 4]
        blank = bundle.model(prep.normalize(background_uint8(prep).expand(inputs.shape[1:]).unsqueeze(0)))[0, 4]
    assert torch.allclose(result.maps.sum((1, 2)), scores - blank, rtol=0.05, atol=0.02)


def test_gradcam_picks_the_last_conv_block_with_a_spatial_map(grey_model, colour_model):
    infos = open_run(grey_model).infos()
    # conv 6 -> bn -> relu -> pool -> conv 8 (12x12) -> relu -> bn -> pool ...: the second conv, through its relu and bn
    assert [info.spec.type for info in infos[4:8]] == ["conv", "relu", "batchnorm", "maxpool"]
    assert gradcam_layer(infos) == 7
    assert gradcam_layer(infos, 1) == 1
    assert gradcam_layer(open_run(colour_model).infos()) == 7


def test_gradcam_layer_errors_are_one_line(grey_model, tmp_path):
    infos = open_run(grey_model).infos()
    with pytest.raises(CnnlabError, match="this model has layers 1-"):
        gradcam_layer(infos, 99)
    with pytest.raises(CnnlabError, match="not a spatial map"):
        gradcam_layer(infos, len(infos))
    # A conv whose output is 1x1 cannot say where.
    from cnnlab.checkpoint import save_model
    from cnnlab.layers import build_model, parse_layers

    spec = [{"type": "conv", "out_channels": 4, "kernel_size": 8}, "relu", "flatten", {"type": "linear"}]
    path = tmp_path / "one.safetensors"
    save_model(path, build_model(parse_layers(spec), (1, 8, 8), 2),
               {"layers": spec, "input_shape": [1, 8, 8], "classes": ["a", "b"],
                "preprocessing": {"kind": "resize", "channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.5]}})
    one = open_run(path)
    with pytest.raises(CnnlabError, match=r"outputs 4x1x1: Grad-CAM needs a map of at least 2x2"):
        gradcam_layer(one.infos(), 1)
    with pytest.raises(CnnlabError, match="this model has none"):
        explain(one, inputs_for(one, 1), "gradcam")
    assert explain(one, inputs_for(one, 1), "saliency").maps.shape == (1, 8, 8)


def test_targets_by_name_index_or_per_image(grey_model, colour_model):
    classes = open_run(colour_model).classes
    assert resolve_target("class-3", classes) == 3 and resolve_target("2", classes) == 2 and resolve_target(4, classes) == 4
    assert resolve_target(None, classes) is None
    for bad in ("cat", "5", "-1", ""):
        with pytest.raises(CnnlabError, match="not a class of this model"):
            resolve_target(bad, classes)
    bundle = open_run(grey_model)
    inputs = inputs_for(bundle)
    assert explain(bundle, inputs, "saliency", target="3").target.tolist() == [3, 3, 3]
    assert explain(bundle, inputs, "saliency", target=torch.tensor([1, 2, 3])).target.tolist() == [1, 2, 3]
    with pytest.raises(CnnlabError, match="expected 3 class indices"):
        explain(bundle, inputs, "saliency", target=[1, 2])
    with pytest.raises(CnnlabError, match="unknown method"):
        explain(bundle, inputs, "lime")
    with pytest.raises(CnnlabError, match="works on the input pixels"):
        explain(bundle, inputs, "occlusion", layer=3)


def test_explaining_another_class_changes_the_map(grey_model):
    bundle = open_run(grey_model)
    inputs = inputs_for(bundle, 1)
    first, second = (explain(bundle, inputs, "saliency", target=t).maps for t in (1, 2))
    assert not torch.allclose(first, second)


def test_explain_leaves_the_model_as_it_was(grey_model):
    bundle = open_run(grey_model)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    with torch.inference_mode():  # callers inside inference_mode still get gradients
        explain(bundle, inputs_for(bundle), "gradcam")
    assert not bundle.model.training and not bundle.model._forward_hooks
    assert all(m._forward_hooks == {} for m in bundle.model.modules())
    assert all(torch.equal(before[k], v) for k, v in bundle.model.state_dict().items())


def test_pictures(grey_model, colour_model):
    for path in (grey_model, colour_model):
        bundle = open_run(path)
        inputs = inputs_for(bundle, 1)
        for method in ("gradcam", "integrated-gradients"):
            result = explain(bundle, inputs, method, target=1)
            fig = explanation_figure(inputs[0], result, 0, bundle.classes, "x.png")
            assert "explained" in fig._suptitle.get_text()
    signed = overlay_rgba(np.array([[-2.0, 0.0], [1.0, 2.0]]), signed=True)
    assert signed.shape == (2, 2, 4) and signed[0, 1, 3] == 0 and signed[1, 1, 3] > signed[1, 0, 3] > 0
    assert signed[0, 0, 2] > signed[0, 0, 0] and signed[1, 1, 0] > signed[1, 1, 2]  # blue against, red for
    assert overlay_rgba(np.zeros((3, 3)), signed=False)[..., 3].max() == 0


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def write_inputs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "one.png"
    good.write_bytes(encode(drawn_one()))
    bad = folder / "broken.png"
    bad.write_bytes(b"not an image")
    return good, bad


def test_cli_writes_one_picture_per_image_and_reports_bad_files(grey_model, tmp_path, capsys, monkeypatch):
    good, bad = write_inputs(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    assert main(["explain", str(grey_model), str(good), str(bad), str(good)]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{good}: ") and "Grad-CAM at layer 7" in lines[0]
    assert lines[0].endswith("explanations/one-gradcam.png") and lines[1].endswith("explanations/one-2-gradcam.png")
    assert err.splitlines() == [f"not checked for this model: run `cnnlab explain {grey_model} --check` to see whether "
                                "these maps can be trusted",
                                f"error: {bad}: not an image (unknown format; expected PNG, JPEG, WebP, BMP, GIF or TIFF)",
                                "1 of 3 file(s) could not be read or hold no digit"]
    with Image.open(tmp_path / "explanations" / "one-gradcam.png") as picture:
        assert picture.size[0] > 600
    # The pictures it wrote are not explained again when their folder is inside a folder explained.
    assert main(["explain", str(grey_model), str(tmp_path), "--method", "saliency", "--target", "3"]) == 1
    out, _ = capsys.readouterr()
    assert len(out.splitlines()) == 1 and "explaining 3 (" in out and "explanations/one-saliency.png" in out


def test_cli_json_lines(grey_model, tmp_path, capsys):
    good, bad = write_inputs(tmp_path / "in")
    assert main(["explain", str(grey_model), str(good), str(bad), "--json", "--method", "occlusion", "--target", "5"]) == 1
    out, err = capsys.readouterr()
    first, second = (json.loads(line) for line in out.splitlines())
    assert err == ""
    assert first["path"] == str(good) and first["method"] == "occlusion" and first["target"] == "5"
    assert first["target_index"] == 5 and 0 <= first["target_confidence"] <= 1 and first["label"] == str(first["index"])
    assert np.asarray(first["map"]).shape == (28, 28) and "png" not in first
    assert first["caveat"].startswith("not checked for this model: run `cnnlab explain")
    assert second == {"path": str(bad), "error": "not an image (unknown format; expected PNG, JPEG, WebP, BMP, GIF or TIFF)"}
    # With --out, the pictures too.
    assert main(["explain", str(grey_model), str(good), "--json", "--out", str(tmp_path / "pics")]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["layer"] == 7 and Path(line["png"]).exists()


@pytest.mark.parametrize("argv, words", [
    (["--target", "eleven"], "error: target 'eleven': not a class of this model"),
    (["--layer", "14"], "error: layer 14 (linear → 10) outputs 10 numbers, not a spatial map"),
    (["--layer", "0"], "error: layer 0: this model has layers 1-14"),
    (["--method", "saliency", "--layer", "2"], "error: --layer chooses Grad-CAM's layer"),
])
def test_cli_mistakes_are_one_line_errors(grey_model, tmp_path, capsys, argv, words):
    good, _ = write_inputs(tmp_path / "in")
    assert main(["explain", str(grey_model), str(good), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(words) and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Evidence that the maps mean something, on a small model trained on real MNIST
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mnist_run(tmp_path_factory) -> Path:
    """The `fast` network trained on a fifth of one MNIST epoch (about 96% accurate)."""
    from cnnlab.config import resolve_config
    from cnnlab.training import fit

    out = tmp_path_factory.mktemp("small-mnist")
    fit(resolve_config("fast", None, {"train": {"epochs": 0.2}}), out, progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def mnist_sample(small_mnist_run):
    bundle = open_run(small_mnist_run)
    data = bundle.load_test_data()
    return bundle, data.test.images[:200], data.test.labels[:200]


def test_blank_pixels_sets_exactly_those_pixels_to_the_background():
    images = torch.full((2, 3, 4, 4), 200, dtype=torch.uint8)
    out = blank_pixels(images, torch.tensor([[0, 5], [15, 1]]), torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1))
    assert out[0, :, 0, 0].tolist() == [1, 2, 3] and out[0, :, 1, 1].tolist() == [1, 2, 3]
    assert out[1, :, 3, 3].tolist() == [1, 2, 3] and out[1, :, 0, 1].tolist() == [1, 2, 3]
    assert int((out != 200).sum()) == 12 and int((images != 200).sum()) == 0


def test_moved_pixels_keep_their_pattern_somewhere_else():
    pixels = torch.tensor([[0, 1, 8, 9], [27, 28, 35, 36]])  # two 2x2 squares on an 8x8 image
    moved = moved_pixels(pixels, (8, 8), torch.Generator().manual_seed(0))
    for before, after in zip(pixels, moved):
        rows, cols = after // 8, after % 8
        dy, dx = (rows - before // 8) % 8, (cols - before % 8) % 8
        assert len(set(dy.tolist())) == 1 and len(set(dx.tolist())) == 1  # one shift for the whole pattern
        assert 2 <= int(dy[0]) <= 6 and 2 <= int(dx[0]) <= 6 and len(set(after.tolist())) == 4


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([5.0, 5.0, 6.0, 7.0])) == pytest.approx(1.0)
    assert np.isnan(spearman(a, torch.zeros(4)))


# The first evidence (docs/EXPLAIN.md) was measured for the four original methods; Layer-CAM and
# SmoothGrad are judged by the faithfulness check (tests/test_faithfulness.py). Layer-CAM is 0 on an
# MNIST background for any weights, so its maps correlate with a randomised model's (0.82 measured).
ORIGINAL_METHODS = ["gradcam", "saliency", "integrated-gradients", "occlusion"]


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("method", ORIGINAL_METHODS)
def test_blanking_the_top_pixels_lowers_the_true_class_more_than_random_pixels(mnist_sample, method):
    bundle, images, labels = mnist_sample
    result = explain(bundle, images, method, target=labels)
    deletion = deletion_test(bundle, images, result.maps, labels)
    assert deletion.top_drop > deletion.random_drop + 0.03, deletion
    assert deletion.top_drop > deletion.moved_drop + 0.03, deletion


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("method", ORIGINAL_METHODS)
def test_maps_of_a_randomised_model_are_unrelated(mnist_sample, method):
    """Adebayo et al. (2018): a map that does not change when the weights are re-initialised explains
    the input, not the model."""
    bundle, images, labels = mnist_sample
    images, labels = images[:50], labels[:50]
    trained = explain(bundle, images, method, target=labels).maps
    random = explain(randomized(bundle, seed=1), images, method, target=labels).maps
    correlations = torch.tensor([spearman(a, b) for a, b in zip(trained, random)])
    assert correlations.isnan().double().mean() < 0.2
    assert correlations.nanmean().abs() < 0.5, correlations


@pytest.mark.parametrize("preset, layer, shape", [("default", 8, "64x7x7"), ("cifar-fast", 17, "128x7x7"),
                                                  ("resnet32", 6, "128x8x8")])
def test_gradcam_default_layer_on_the_presets_has_a_useful_resolution(preset, layer, shape):
    """Not the 3x3 (cifar-fast) or 4x4 (resnet32) last block: the last one of at least 7x7."""
    from cnnlab.layers import parse_layers, trace
    from cnnlab.presets import PRESETS

    channels, size = (1, 28) if preset == "default" else (3, 32)
    infos = trace(parse_layers(PRESETS[preset]["model"]), (channels, size, size), 10)
    assert gradcam_layer(infos) == layer and "x".join(map(str, infos[layer - 1].out_shape)) == shape


def test_layer_by_type_name(grey_model):
    infos = open_run(grey_model).infos()
    assert gradcam_layer(infos, "relu") == 6 and gradcam_layer(infos, "conv2d") == 5 and gradcam_layer(infos, "3") == 3
    with pytest.raises(CnnlabError, match="no such layer with a spatial map in this model"):
        gradcam_layer(infos, "linear")


def test_layercam_smoothgrad_and_the_blurred_baseline(grey_model):
    bundle = open_run(grey_model)
    inputs = inputs_for(bundle, 2)
    blur = explain(bundle, inputs, "integrated-gradients", target=4, baseline="blur")
    assert blur.baseline == "blur" and blur.variant == "integrated-gradients+blur" and "blurred" in blur.title
    from cnnlab.faithfulness import blurred

    prep = bundle.preprocessing
    with torch.no_grad():
        x = prep.normalize(inputs)
        change = bundle.model(x)[:, 4] - bundle.model(blurred(x))[:, 4]
    assert torch.allclose(blur.maps.sum((1, 2)), change, rtol=0.05, atol=0.02)  # completeness from the blurred start
    with pytest.raises(CnnlabError, match="a baseline is where integrated gradients start"):
        explain(bundle, inputs, "saliency", baseline="blur")
    assert explain(bundle, inputs, "layercam", layer=3).layer == 3
    smooth = explain(bundle, inputs, "smoothgrad").maps
    assert torch.equal(smooth, explain(bundle, inputs, "smoothgrad").maps)  # seeded: the same map twice


def test_cli_check_writes_the_file_and_explain_shows_its_caveat(tmp_path, monkeypatch, capsys):
    """`cnnlab explain RUN --check` on the model's test images (here a stand-in set), then `explain`
    prints the check's line for a method that failed it (a random-weight model: nothing to find)."""
    from types import SimpleNamespace

    from cnnlab.runs import Run
    from cnnlab.faithfulness import load_check

    run = tmp_path / "run"
    model = save_tiny_model(run / "model.safetensors")
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fake = SimpleNamespace(test=SimpleNamespace(images=images, labels=torch.zeros(8, dtype=torch.int64)))
    monkeypatch.setattr(Run, "load_test_data", lambda self, *args, **kwargs: fake)
    assert main(["explain", str(run), "--check", "--images", "6", "--methods", "saliency,gradcam"]) == 0
    out = capsys.readouterr().out
    assert "random ranking" in out and f"saved {run / 'explain-check.json'}" in out
    result = load_check(model)
    assert result["images"] == 6 and [row["name"] for row in result["methods"]] == ["saliency", "gradcam"]
    good, _ = write_inputs(tmp_path / "in")
    assert main(["explain", str(run), str(good), "--method", "saliency", "--out", str(tmp_path / "pics")]) == 0
    err = capsys.readouterr().err
    row = result["methods"][0]
    expected = "" if row["beats"] == 3 and row["randomisation"]["passes"] else f"caveat: on this model saliency {row['verdict']}"
    assert err.startswith(expected) and (expected or "caveat" not in err)
    # a check of one more method on the same images adds its row; on other images it starts afresh
    assert main(["explain", str(run), "--check", "--images", "6", "--methods", "layercam"]) == 0
    assert [row["name"] for row in load_check(model)["methods"]] == ["saliency", "gradcam", "layercam"]
    assert "layercam" in capsys.readouterr().out.split("random ranking")[-1]
    assert main(["explain", str(run), "--check", "--images", "5", "--methods", "layercam"]) == 0
    assert [row["name"] for row in load_check(model)["methods"]] == ["layercam"]
    capsys.readouterr()
    for argv, words in ([["explain", str(run), str(good), "--check"], "give no image paths"],
                        [["explain", str(run)], "give one or more images"],
                        [["explain", str(run), "--check", "--images", "1"], "--images must be at least 2"],
                        [["explain", str(run), "--check", "--methods", "nope"], "--methods: unknown nope"]):
        assert main(argv) != 0
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_a_large_batch_is_explained_a_few_images_at_a_time_with_the_same_maps(grey_model, monkeypatch, method):
    """Bounded memory for photos: `explain` splits a batch into passes of `scaled_batch(EXPLAIN_BATCH)` images
    (50 up to 32x32, 1 at 224x224): each image's map, prediction and target are those of the batch in one pass."""
    import cnnlab.explain as ex

    bundle = open_run(grey_model)
    inputs = inputs_for(bundle, 5)
    whole = explain(bundle, inputs, method, target=[0, 1, 2, 3, 4])
    monkeypatch.setattr(ex, "EXPLAIN_BATCH", 2)
    split = explain(bundle, inputs, method, target=[0, 1, 2, 3, 4])
    assert torch.allclose(split.maps, whole.maps, atol=1e-6) and torch.equal(split.target, whole.target)
    assert torch.allclose(split.probabilities, whole.probabilities) and split.layer == whole.layer
    with pytest.raises(CnnlabError, match="expected 5 class indices"):
        explain(bundle, inputs, method, target=[0, 1])
    assert ex.scaled_batch(50, (3, 224, 224)) == 1 and ex.scaled_batch(50, (1, 28, 28)) == 50


def test_cli_check_of_a_large_input_measures_the_default_map_unless_asked(tmp_path, monkeypatch, capsys):
    """Above 64x64 pixels (photos) every method takes minutes: the check measures Grad-CAM, and says how to ask for more."""
    from types import SimpleNamespace

    from cnnlab.explain import check_variants, method_caveat
    from cnnlab.runs import Run
    from cnnlab.faithfulness import load_check

    run = tmp_path / "run"
    model = save_tiny_model(run / "model.safetensors", classes=3, kind="resize", input_shape=(3, 72, 72))
    images = torch.randint(0, 256, (5, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fake = SimpleNamespace(test=SimpleNamespace(images=images, labels=torch.zeros(5, dtype=torch.int64)))
    monkeypatch.setattr(Run, "load_test_data", lambda self, *args, **kwargs: fake)
    # before any check: the command it suggests measures the method shown (gradcam by default on this size)
    assert f"run `cnnlab explain {run} --check` to see" in method_caveat(open_run(run), "gradcam")
    assert f"run `cnnlab explain {run} --check --methods saliency` to see" in method_caveat(open_run(run), "saliency")
    assert main(["explain", str(run), "--check", "--images", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("checking gradcam of run on 4 of its test images (seed 0)\n  on inputs of this size the check "
                          "measures gradcam, the map explain shows by default (minutes per method); --methods all")
    assert "pixels ranked in 4x4 regions" in out
    assert [row["name"] for row in load_check(model)["methods"]] == ["gradcam"]
    assert method_caveat(open_run(run), "saliency").endswith(f"saliency was not part of this model's check "
                                                             f"(`cnnlab explain {run} --check --methods saliency`)")
    assert main(["explain", str(run), "--check", "--images", "4", "--methods", "all"]) == 0
    assert capsys.readouterr().out.startswith("checking the attribution methods of run")
    assert len(load_check(model)["methods"]) == len(check_variants(open_run(run))[0])
