"""`cnnlab.faithfulness`: the pieces of the check (blur, ranking, imputation, curves, verdicts), the
check on a hand-made model whose output ignores the left half of the image, the saved file and the
caveat line; and the cross-check of its numbers against the field's reference implementations on the
same maps and images: Quantus 0.6.0 (`PixelFlipping`, the deletion curve) and pytorch-grad-cam 1.5.7
(ROAD: `NoisyLinearImputer`, `ROADMostRelevantFirstAverage`, `ROADLeastRelevantFirstAverage`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("captum", reason="the explain extra (captum) is not installed")

from cnnlab import faithfulness as fa  # noqa: E402
from cnnlab.checkpoint import save_model  # noqa: E402
from cnnlab.runs import open_run  # noqa: E402
from cnnlab.explain import METHODS, check_variants, explain, method_caveat  # noqa: E402
from cnnlab.layers import build_model, parse_layers  # noqa: E402


def save_spec_model(path, spec, input_shape, classes=2, seed=0):
    torch.manual_seed(seed)
    save_model(path, build_model(parse_layers(spec), input_shape, classes).eval(),
               {"layers": spec, "input_shape": list(input_shape), "classes": [f"c{i}" for i in range(classes)],
                "preprocessing": {"kind": "resize", "channels": input_shape[0], "size": list(input_shape[1:]),
                                  "mean": [0.5] * input_shape[0], "std": [0.25] * input_shape[0]}})
    return open_run(path)


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------

def test_blur_keeps_a_flat_image_and_its_mean_and_smooths_noise():
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(fa.blurred(flat), flat, atol=1e-6)
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    smooth = fa.blurred(noise)
    assert smooth.shape == noise.shape and smooth.std() < 0.35 * noise.std()
    assert fa.blur_sigma((32, 32)) == 2.0 and fa.blur_sigma((8, 8)) == 1.0


def test_ranking_puts_the_largest_first_and_breaks_ties_at_random_but_reproducibly():
    maps = torch.zeros((1, 4, 4))
    maps[0, 3, 3], maps[0, 0, 1] = 2.0, 1.0
    first = fa.ranking(maps, torch.Generator().manual_seed(0))
    assert first[0, :2].tolist() == [15, 1] and sorted(first[0].tolist()) == list(range(16))
    assert torch.equal(first, fa.ranking(maps, torch.Generator().manual_seed(0)))
    # the 14 tied zeros are not left in reading order (which would favour the top-left corner)
    assert first[0, 2:].tolist() != sorted(first[0, 2:].tolist())
    mask = fa.first_pixels(first, 2, (4, 4))
    assert mask.shape == (1, 1, 4, 4) and mask.sum() == 2 and mask[0, 0, 3, 3] and mask[0, 0, 0, 1]


def test_large_inputs_are_ranked_in_regions_as_wide_as_the_blur():
    assert [fa.region_side((s, s)) for s in (28, 32, 63, 64, 128, 160, 224)] == [1, 1, 1, 4, 8, 10, 14]
    assert fa.region_side((224, 100)) == 6  # the shorter side
    assert fa.region_side((224, 224)) == fa.blur_sigma((224, 224))
    # one hot 2x2 region of a 4x4 map comes first, as a whole, before any other pixel
    maps = torch.zeros((1, 4, 4))
    maps[0, 2:, 2:] = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # region mean 1.5; one pixel elsewhere 1.4
    maps[0, 0, 0] = 1.4
    order = fa.ranking(maps, torch.Generator().manual_seed(0), side=2)
    assert sorted(order[0].tolist()) == list(range(16))
    assert order[0, :4].tolist() == [10, 11, 14, 15] and order[0, 4:8].tolist() == [0, 1, 4, 5]
    # side 1 is the pixel ranking, unchanged
    assert torch.equal(fa.ranking(maps, torch.Generator().manual_seed(3), side=1),
                       fa.ranking(maps, torch.Generator().manual_seed(3)))


def test_random_regions_cover_every_pixel_once_and_keep_each_region_together():
    order = fa.random_pixel_order(3, (5, 7), 2, torch.Generator().manual_seed(0))  # 3x4 regions, ragged edges
    assert order.shape == (3, 35)
    region_of = lambda pixel: (pixel // 7 // 2, pixel % 7 // 2)  # noqa: E731
    for row in order.tolist():
        assert sorted(row) == list(range(35))
        seen, previous = set(), None
        for pixel in row:
            region = region_of(pixel)
            if region != previous:
                assert region not in seen  # a region is never split
                seen.add(region)
            previous = region
        assert len(seen) == 12
    assert not torch.equal(order[0], order[1])
    assert torch.equal(fa.random_pixel_order(2, (6, 6), 1, torch.Generator().manual_seed(4)),
                       fa.random_ranking(2, 36, torch.Generator().manual_seed(4)))


def test_area_is_the_mean_height_of_the_curve_over_zero_to_one():
    assert torch.allclose(fa.area(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0]])), torch.tensor([1.0, 0.5]))


def test_paired_gain_needs_more_than_noise():
    assert fa.paired_gain(torch.tensor([0.2, 0.3, 0.25, 0.22]))["beats_random"]
    assert not fa.paired_gain(torch.tensor([0.5, -0.5, 0.4, -0.45]))["beats_random"]
    assert not fa.paired_gain(torch.tensor([-0.2, -0.3, -0.25]))["beats_random"]


def test_cascade_ends_with_every_layer_randomised():
    assert fa.cascade_counts(8) == [2, 4, 6, 8] and fa.cascade_counts(2) == [1, 2] and fa.cascade_counts(1) == [1]


def test_randomised_from_top_resets_only_the_top_layers(tmp_path):
    bundle = save_spec_model(tmp_path / "m.safetensors", [{"type": "conv", "out_channels": 4, "kernel_size": 3},
                                                          "relu", "flatten", {"type": "linear"}], (1, 8, 8))
    layers = fa.parameterised_layers(bundle.model)
    assert len(layers) == 2
    top = fa.randomised_from_top(bundle.model, 1, seed=5)
    first_old, last_old = layers
    first_new, last_new = fa.parameterised_layers(top)
    assert torch.equal(first_new.weight, first_old.weight) and not torch.equal(last_new.weight, last_old.weight)


# ---------------------------------------------------------------------------------------------
# Cross-checks against the reference implementations
# ---------------------------------------------------------------------------------------------

def test_imputation_matches_road_sparse_solver():
    """Same masks, noise off: conjugate gradients reach the direct solution of ROAD's system
    (pytorch-grad-cam's `NoisyLinearImputer`, scipy's `spsolve`) to 1e-4."""
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((3, 3, 20, 20), generator=generator)
    order = fa.random_ranking(3, 400, generator)
    for count in (40, 200, 360):
        removed = fa.first_pixels(order, count, (20, 20))
        mine = fa.impute(x, removed, noise=0.0, tolerance=1e-7, iterations=1000)
        reference = torch.stack([road.NoisyLinearImputer(noise=0.0)(x[i], (~removed[i, 0]).float()) for i in range(3)])
        assert (mine - reference).abs().max() < 1e-4
        assert torch.equal(mine[~removed.expand_as(x)], x[~removed.expand_as(x)])  # known pixels untouched


def test_imputation_of_large_images_one_at_a_time_matches_the_sparse_solver():
    """Above 64x64 pixels `impute` solves image by image (speed): still ROAD's direct solution."""
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((2, 3, 70, 70), generator=generator)
    removed = fa.first_pixels(fa.random_ranking(2, 4900, generator), 2000, (70, 70))
    mine = fa.impute(x, removed, noise=0.0, tolerance=1e-7, iterations=1000)
    reference = torch.stack([road.NoisyLinearImputer(noise=0.0)(x[i], (~removed[i, 0]).float()) for i in range(2)])
    assert (mine - reference).abs().max() < 1e-4


def test_road_scores_match_pytorch_grad_cam_on_the_same_maps(tmp_path):
    """ROAD's MoRF and LeRF averages, against pytorch-grad-cam's on a small colour model, its maps and
    images, noise off. Mapping: pytorch-grad-cam reports the change from the unperturbed probability
    (`return_diff`), so its average = ours − p(original); and it removes the pixels at or above a
    percentile threshold, i.e. f·(N − 1) + 1 of N pixels for fraction f (here N = 121, so the
    counts are whole), which our `fractions` reproduce exactly. Tolerance 1e-4 (the solvers)."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds, PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    bundle = save_spec_model(tmp_path / "c.safetensors", [{"type": "conv", "out_channels": 6, "kernel_size": 3,
                                                           "padding": 1}, "relu", "flatten", {"type": "linear"}],
                             (3, 11, 11), classes=4)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((4, 3, 11, 11), generator=generator)
    maps = torch.rand((4, 11, 11), generator=generator)  # continuous: no ties, both orders agree
    targets = bundle.model(x).argmax(1)
    pixels = 121
    fractions = [(f * (pixels - 1) + 1) / pixels for f in fa.ROAD_FRACTIONS]
    morf, lerf = fa.road_curves(bundle.model, x, fa.ranking(maps, generator), targets, generator, fractions, noise=0.0)
    before = fa.target_probabilities(bundle.model, x, targets).numpy()
    percentiles = [round(100 * (1 - f)) for f in fa.ROAD_FRACTIONS]

    def averager(removal):
        return AveragerAcrossThresholds(lambda p: PerturbationConfidenceMetric(removal(p, NoisyLinearImputer(noise=0.0))),
                                        percentiles)

    cams = maps.numpy()
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    their_morf = averager(RemoveMostRelevantFirst)(x, cams, wanted, bundle.model)
    their_lerf = averager(RemoveLeastRelevantFirst)(x, cams, wanted, bundle.model)
    assert np.abs(morf.mean(1).numpy() - before - their_morf).max() < 1e-4
    assert np.abs(lerf.mean(1).numpy() - before - their_lerf).max() < 1e-4


def test_deletion_curve_matches_quantus_pixel_flipping(tmp_path):
    """The deletion curve against Quantus' `PixelFlipping` on the same grey model, maps and images,
    with a constant substrate (Quantus replaces pixels by a value, not by a blurred copy; the curve
    machinery is what is compared). Mapping: Quantus returns the probabilities after each step
    (ours also has the unperturbed point 0) and its AUC is the trapezoid rule with dx = 1 over its points,
    so ours × steps = Quantus' AUC + (p₀ + p₁)/2. Tolerance 1e-5 (float32)."""
    quantus = pytest.importorskip("quantus")
    bundle = save_spec_model(tmp_path / "g.safetensors", [{"type": "conv", "out_channels": 4, "kernel_size": 3,
                                                           "padding": 1}, "relu", "flatten", {"type": "linear"}],
                             (1, 16, 16), classes=3)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((5, 1, 16, 16), generator=generator)
    maps = torch.rand((5, 16, 16), generator=generator)
    targets = bundle.model(x).argmax(1)
    steps = 16
    curves = fa.perturbation_curves(bundle.model, x, torch.zeros_like(x), fa.ranking(maps, generator), targets,
                                    insertion=False, steps=steps)
    metric = quantus.PixelFlipping(features_in_step=256 // steps, perturb_baseline=0.0, normalise=False,
                                   disable_warnings=True, return_auc_per_sample=False)
    theirs = np.array(metric(model=bundle.model, x_batch=x.numpy(), y_batch=targets.numpy(),
                             a_batch=maps.unsqueeze(1).numpy(), device="cpu", softmax=True))
    assert np.abs(curves[:, 1:].numpy() - theirs).max() < 1e-5
    their_auc = np.trapezoid(theirs, dx=1, axis=1)  # what quantus.helpers.utils.calculate_auc computes (np.trapz)
    mapped = fa.area(curves).numpy() * steps - (curves[:, 0] + curves[:, 1]).numpy() / 2
    assert np.abs(mapped - their_auc).max() < 1e-4


def test_insertion_is_deletion_from_the_substrate():
    generator = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 6 * 6, 3))
    x, substrate = torch.randn((2, 2, 6, 6), generator=generator), torch.randn((2, 2, 6, 6), generator=generator)
    order, targets = fa.random_ranking(2, 36, generator), torch.tensor([0, 2])
    inserted = fa.perturbation_curves(model, x, substrate, order, targets, insertion=True, steps=6)
    assert torch.allclose(inserted, fa.perturbation_curves(model, substrate, x, order, targets, insertion=False, steps=6))



def test_large_inputs_are_measured_a_few_images_at_a_time_with_the_same_curves(monkeypatch):
    """Bounded memory for photos: `measure` perturbs `images_at_once` images together; split or not,
    deletion and insertion are the same numbers (ROAD's noise comes in another order: close, not equal)."""
    generator = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 10 * 10, 3))
    x = torch.randn((5, 3, 12, 12), generator=generator)
    order, targets = fa.random_ranking(5, 144, generator), torch.tensor([0, 1, 2, 0, 1])
    whole = fa.measure(model, x, order, targets, seed=3)
    assert fa.images_at_once(x) >= 5
    monkeypatch.setattr(fa, "PERTURBED_BYTES", 2 * (fa.STEPS + 1) * x[0].numel() * 4)
    assert fa.images_at_once(x) == 2
    split = fa.measure(model, x, order, targets, seed=3)
    assert torch.allclose(split.deletion, whole.deletion) and torch.allclose(split.insertion, whole.insertion)
    assert (split.morf - whole.morf).abs().max() < 0.05 and split.morf.shape == whole.morf.shape == (5, 9)
    assert fa.images_at_once(torch.zeros((1, 3, 224, 224))) < 40  # not 200 photos' 2 GB at once
    assert fa.forward_batch(torch.zeros((1, 3, 224, 224))) == 10 and fa.forward_batch(torch.zeros((1, 1, 28, 28))) == 512
    assert fa.default_methods((1, 28, 28)) is None and fa.default_methods((3, 64, 64)) is None  # every method
    assert fa.default_methods((3, 224, 224)) == ("gradcam",)


# ---------------------------------------------------------------------------------------------
# A model that ignores the left half of the image
# ---------------------------------------------------------------------------------------------

def left_blind_model(tmp_path):
    """Two classes, 'red texture' and 'green texture', read only from the right half of a 3x16x16
    image: an edge filter on the red and on the green channel, rectified, summed by the linear
    layer over columns 10-15 only (the filter reaches one column to each side, so no output depends
    on columns 0-8)."""
    bundle = save_spec_model(tmp_path / "left.safetensors",
                             [{"type": "conv", "out_channels": 2, "kernel_size": 3, "padding": 1}, "relu", "flatten",
                              {"type": "linear"}], (3, 16, 16))
    conv, linear = bundle.model.features[0], bundle.model.head[-1]
    laplace = torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]])
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 0], conv.weight[1, 1] = laplace, laplace
        weight = torch.zeros((2, 2, 16, 16))
        weight[0, 0, :, 10:] = weight[1, 1, :, 10:] = 0.05
        linear.weight.copy_(weight.view(2, -1))
        linear.bias.zero_()
    return bundle


def textured_images(count: int, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 3, 16, 16): noise textures, each image's red or green texture stronger (at random)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand((count, 3, 16, 16), generator=generator) - 0.5
    strong = torch.rand((count, 1), generator=generator) < 0.5
    amplitude = torch.stack([torch.where(strong, 200.0, 80.0)[:, 0], torch.where(strong, 80.0, 200.0)[:, 0],
                             torch.full((count,), 120.0)], 1).view(count, 3, 1, 1)
    return (128 + amplitude * noise).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("method", [m for m in METHODS])
def test_left_blind_model_maps_leave_the_left_half_empty(tmp_path, method):
    """Every method but Grad-CAM puts (almost) no attribution on columns 0-8, which the output cannot
    see. Grad-CAM does: its channel weights are gradients averaged over all positions, so it paints
    the layer's activations wherever they are (the weakness HiResCAM and Layer-CAM mend); the check
    below flags it."""
    bundle = left_blind_model(tmp_path)
    maps = explain(bundle, textured_images(8), method).maps.abs()
    left = maps[:, :, :9].sum() / maps.sum()
    if method == "gradcam":
        assert left > 0.3
    elif method == "occlusion":
        # its 2x2 squares (stride 1) that touch column 9 reach column 8; columns 0-7 hold only float32
        # rounding (a logit recomputed in another batch differs by about 1e-6), far below the real scores
        assert maps[:, :, :8].max() < 1e-4 * maps.max() and left < 0.05
    else:
        assert left < 1e-6


def test_check_on_the_left_blind_model(tmp_path):
    """The check's verdicts on the left-blind model: the methods whose maps leave the left half
    empty beat the random ranking on all three tests. Grad-CAM, which paints the left half too,
    still beats random (its right half is right), but gains far less than the best method, and its
    caveat line says so."""
    bundle = left_blind_model(tmp_path)
    images = textured_images(40, seed=1)
    variants, details = check_variants(bundle)
    chosen = {name: variants[name] for name in ("gradcam", "layercam", "saliency", "integrated-gradients")}
    result = fa.check(bundle, images, chosen, details=details, randomisation_images=8)
    rows = {row["name"]: row for row in result["methods"]}
    for name in ("layercam", "saliency", "integrated-gradients"):
        assert rows[name]["beats"] == 3, rows[name]["verdict"]
    assert rows["gradcam"]["deletion_auc"] > rows["layercam"]["deletion_auc"]
    for test in fa.TESTS:  # the least gain over random of all, on every test
        assert min(rows.values(), key=lambda row: row["tests"][test]["mean_gain"])["name"] == "gradcam"
    assert len(rows["gradcam"]["weaker_than"]) >= 2
    text = fa.caveat(result, "gradcam", "cnnlab explain left --check")
    assert text.startswith("note: on this model gradcam beats random but gains less than half") and "\n" not in text
    assert fa.caveat(result, "integrated-gradients", "cnnlab explain left --check") == ""
    json.dumps(result)  # JSON-able as it is


def test_caveat_lines(tmp_path):
    bundle = left_blind_model(tmp_path)
    assert "not checked for this model: run `cnnlab explain" in method_caveat(bundle, "saliency")
    result = fa.check(bundle, textured_images(12), {"saliency": check_variants(bundle)[0]["saliency"]},
                      randomisation_images=4)
    path = fa.save_check(result, bundle.path)
    assert path == bundle.path.with_suffix(".explain-check.json") and fa.load_check(bundle.path)["images"] == 12
    assert "was not part of this model's check" in method_caveat(bundle, "occlusion")
    assert method_caveat(bundle, "saliency") == fa.caveat(result, "saliency", "x")
    path.write_text("{not json")
    assert fa.load_check(bundle.path) is None


def test_check_of_a_large_input_ranks_regions_and_says_so(tmp_path):
    bundle = save_spec_model(tmp_path / "big.safetensors", [{"type": "conv", "out_channels": 2, "kernel_size": 3},
                                                            "relu", {"type": "avgpool", "kernel_size": 8}, "flatten",
                                                            {"type": "linear"}], (3, 64, 64))
    images = torch.randint(0, 256, (6, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    result = fa.check(bundle, images, {"saliency": check_variants(bundle)[0]["saliency"]}, randomisation_images=2)
    assert result["settings"]["region_side"] == 4
    assert "pixels ranked in 4x4 regions" in fa.table(result).splitlines()[0]
    small = fa.check(left_blind_model(tmp_path), textured_images(6), {"saliency": check_variants(bundle)[0]["saliency"]},
                     randomisation_images=2)
    assert small["settings"]["region_side"] == 1 and "regions" not in fa.table(small)
