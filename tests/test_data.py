"""Data: in-memory batches and augmentation, image folders, MNIST root resolution."""

import numpy as np
import pytest
import torch

from cnnlab.data.folders import load_folder
from cnnlab.data.mnist import load_mnist
from cnnlab.data.tensors import (EpochBatches, ImageTensors, alternating_flips, channel_stats, normalize, random_flip,
                                 random_rotate, random_shift, shuffled_batches)
from cnnlab.errors import CnnlabError

from tests.support.helpers import write_image_folder


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (10, 3, 4, 5), dtype=torch.uint8)
    mean, std = channel_stats(images)
    array = images.numpy().astype(np.float64) / 255
    assert np.allclose(mean, array.mean(axis=(0, 2, 3)), atol=1e-5)
    assert np.allclose(std, array.std(axis=(0, 2, 3)), atol=1e-5)


def test_random_shift_moves_each_image_within_bounds():
    images = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    images[:, :, 4, 4] = 255
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    positions = [tuple(torch.nonzero(img[0])[0].tolist()) for img in shifted]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in positions)
    assert len(set(positions)) > 5  # different images got different shifts


def test_reflect_padded_shifts_fill_the_border_from_the_image():
    images = torch.arange(1, 1 + 64 * 81, dtype=torch.int32).remainder(250).add(1).to(torch.uint8).view(64, 1, 9, 9)
    zeros = random_shift(images, 2, torch.Generator().manual_seed(0))
    reflected = random_shift(images, 2, torch.Generator().manual_seed(0), padding="reflect")
    assert (zeros == 0).any() and not (reflected == 0).any()
    inside = zeros != 0  # the same draws: where zero padding kept image pixels, reflection keeps the same ones
    assert torch.equal(reflected[inside], zeros[inside])


def test_random_rotate_turns_each_image_about_its_centre_within_the_angle():
    images = torch.zeros(200, 1, 21, 21, dtype=torch.uint8)
    images[:, :, 10, 3:18] = 255  # a horizontal bar through the centre
    turned = random_rotate(images, 30, 0.0, torch.Generator().manual_seed(0))
    assert turned.shape == images.shape and turned.dtype == torch.uint8
    assert turned[:, 0, 10, 10].min() > 200  # the centre stays where it is
    angles = []
    for img in turned.float():  # the bar's angle from its principal axis (ink-weighted)
        ys, xs = torch.meshgrid(torch.arange(21.0) - 10, torch.arange(21.0) - 10, indexing="ij")
        w = img[0] / img[0].sum()
        cxx, cyy, cxy = (w * xs * xs).sum(), (w * ys * ys).sum(), (w * xs * ys).sum()
        angles.append(0.5 * torch.atan2(2 * cxy, cxx - cyy).rad2deg().item())
    assert max(abs(a) for a in angles) <= 31 and max(abs(a) for a in angles) > 20  # within ±30°, and it used the range
    assert min(angles) < -5 < 5 < max(angles)  # both directions


def test_random_zoom_changes_the_size_within_the_fraction():
    images = torch.zeros(100, 1, 41, 41, dtype=torch.uint8)
    images[:, :, 10:31, 10:31] = 255  # a 21x21 square
    zoomed = random_rotate(images, 0, 0.2, torch.Generator().manual_seed(0))
    sides = ((zoomed[:, 0].float() / 255).sum((1, 2)).sqrt()).tolist()  # ink area -> side length
    assert min(sides) >= 21 * 0.8 - 1 and max(sides) <= 21 * 1.2 + 1
    assert min(sides) < 19 and max(sides) > 23  # smaller and larger ones


def test_no_rotation_no_zoom_is_the_identity():
    images = torch.randint(0, 256, (8, 3, 7, 7), dtype=torch.uint8)
    assert torch.equal(random_rotate(images, 0, 0, torch.Generator().manual_seed(0)), images)


def test_random_flip_flips_some():
    images = torch.arange(16 * 4, dtype=torch.uint8).view(16, 1, 1, 4).repeat(1, 1, 2, 1)
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    same = [(f == i).all().item() for f, i in zip(flipped, images)]
    mirrored = [(f == i.flip(2)).all().item() for f, i in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_alternating_flips_show_each_image_both_ways_over_two_epochs():
    epochs = [alternating_flips(1000, seed=3, epoch=e) for e in (1, 2, 3, 4)]
    assert torch.equal(epochs[0], ~epochs[1]) and torch.equal(epochs[0], epochs[2]) and torch.equal(epochs[1], epochs[3])
    assert 400 < int(epochs[0].sum()) < 600  # a random half, not a block
    assert not torch.equal(epochs[0], alternating_flips(1000, seed=4, epoch=1))


def test_shuffled_batches_cover_the_data():
    whole = torch.cat(shuffled_batches(100, 10, torch.Generator().manual_seed(3)))
    assert sorted(whole.tolist()) == list(range(100))


def test_ranks_share_each_global_batch_and_together_see_what_one_process_sees():
    """batch_size is the global batch: two ranks take halves of the very batches (and augmentation) one
    process would train on, so the number of processes does not change what is learned."""
    images = torch.arange(40 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(40, 1, 4, 4)
    data = ImageTensors(images, torch.arange(40) % 4)
    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)

    def served(rank, world_size):
        return list(EpochBatches(data, 8, zero, one, seed=5, epoch=2, shift=1, flip=True, rank=rank, world_size=world_size))

    alone = served(0, 1)
    halves = [served(r, 2) for r in (0, 1)]
    assert len(alone) == len(halves[0]) == len(halves[1]) == 5
    for k, (x, y) in enumerate(alone):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), x)
        assert torch.equal(torch.cat([halves[0][k][1], halves[1][k][1]]), y)
    with pytest.raises(CnnlabError, match="must divide evenly"):
        EpochBatches(data, 8, zero, one, seed=5, epoch=1, rank=0, world_size=3)


def _epoch_batches(data, epoch=1, **augment):
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    return EpochBatches(data, 8, mean, std, seed=3, epoch=epoch, **augment)


def test_epoch_batches_are_index_slices_shifted_flipped_and_normalised_from_one_generator():
    """The batch iterator draws, per batch, the shifts then the flips from the (seed, epoch) generator that
    shuffled the epoch: written out by hand here, it gives exactly the same batches."""
    data = ImageTensors(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30) % 3)
    served = list(_epoch_batches(data, epoch=2, shift=1, flip=True))
    generator = torch.Generator().manual_seed(3 * 100_003 + 2)
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    expected = []
    for index in shuffled_batches(30, 8, generator):  # 3 full batches; the last 6 images are dropped
        x = random_flip(random_shift(data.images[index], 1, generator), generator)
        expected.append((normalize(x, mean, std), data.labels[index]))
    assert len(served) == 3
    for (x, y), (x_ref, y_ref) in zip(served, expected):
        assert x.dtype == torch.float32 and torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_epoch_batches_resume_where_they_stopped_and_stop_at_a_limit():
    data = ImageTensors(torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8), torch.arange(40) % 3)
    straight = [x for x, _ in _epoch_batches(data, shift=2, flip=True)]
    first = _epoch_batches(data, shift=2, flip=True)
    served = []
    for x, _ in first:
        served.append(x)
        if first.done == 2:
            break  # a stop after the second batch: what a resume file keeps
    rest = _epoch_batches(data, shift=2, flip=True)
    rest.resume(first.done, first.generator.get_state())
    served += [x for x, _ in rest]
    assert len(served) == len(straight) == 5 and all(torch.equal(a, b) for a, b in zip(served, straight))
    limited = _epoch_batches(data, shift=2, flip=True)
    limited.limit(3)  # a fractional last epoch
    assert len(limited) == 3 and len(list(limited)) == 3


def test_image_folder_with_seeded_split_and_corrupt_file(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", n_per_class=10)
    (root / "square" / "broken.png").write_bytes(b"\x89PNG not really")
    folder = load_folder(root, image_size=16, seed=0, progress=False)
    train, test, classes, channels = folder.train, folder.test, folder.classes, folder.channels
    assert classes == ["horizontal", "square", "vertical"] and folder.val is None
    assert channels == 1 and train.images.shape[1:] == (1, 16, 16)
    assert len(train) + len(test) == 30
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped 1 file(s) of" in err
    again = load_folder(root, image_size=16, seed=0, progress=False)  # from the cache
    assert torch.equal(again.train.images, train.images)
    assert again.stats["modes"] and folder.stats["sizes"] == again.stats["sizes"]


def test_image_folder_train_test_layout_rgb(tmp_path):
    write_image_folder(tmp_path / "d" / "train", n_per_class=6, rgb=True)
    write_image_folder(tmp_path / "d" / "test", n_per_class=2, rgb=True)
    folder = load_folder(tmp_path / "d", image_size=8, progress=False)
    assert folder.channels == 3 and folder.train.images.shape == (18, 3, 8, 8) and folder.test.images.shape == (6, 3, 8, 8)


def test_a_val_folder_is_the_validation_split_and_a_missing_test_folder_is_held_out(tmp_path):
    write_image_folder(tmp_path / "d" / "train", n_per_class=10, rgb=True)
    write_image_folder(tmp_path / "d" / "val", n_per_class=3, rgb=True)
    folder = load_folder(tmp_path / "d", image_size=8, test_fraction=0.2, progress=False)
    assert len(folder.val) == 9 and len(folder.test) == 6 and len(folder.train) == 24
    assert sorted(torch.bincount(folder.test.labels).tolist()) == [2, 2, 2]  # stratified


def test_load_dataset_holds_out_a_stratified_seeded_validation_split_and_limits_classes(tmp_path):
    from cnnlab.config import DataConfig
    from cnnlab.data import load_dataset

    root = write_image_folder(tmp_path / "data", n_per_class=20)
    config = DataConfig(dataset=f"folder:{root}", image_size=8)
    data = load_dataset(config, seed=3, progress=False)
    assert len(data.val) == 6 and torch.bincount(data.val.labels).tolist() == [2, 2, 2]
    assert len(data.train) + len(data.val) + len(data.test) == 60
    assert data.split["val_fraction"] == 0.1 and len(data.split["val_indices"]) == 6
    again = load_dataset(config, seed=3, progress=False)
    assert torch.equal(again.val.images, data.val.images)  # seeded: the same split every time
    small = load_dataset(DataConfig(dataset=f"folder:{root}", image_size=8, limit_per_class=5, val_fraction=0),
                         seed=3, progress=False)
    assert small.val is None and torch.bincount(small.train.labels).tolist() == [5, 5, 5]
    assert max(torch.bincount(small.test.labels).tolist()) <= 5


def test_image_folder_errors(tmp_path):
    with pytest.raises(CnnlabError, match="does not exist"):
        load_folder(tmp_path / "missing")
    (tmp_path / "one").mkdir()
    with pytest.raises(CnnlabError, match="one sub-folder per class"):
        load_folder(tmp_path)


def test_missing_mnist_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_OFFLINE", "1")
    with pytest.raises(CnnlabError) as err:
        load_mnist(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message and "\n" not in message


def test_epoch_batches_rotate_and_zoom_first_from_the_same_generator():
    data = ImageTensors(torch.randint(0, 256, (30, 1, 6, 6), dtype=torch.uint8), torch.arange(30) % 3)
    served = list(_epoch_batches(data, shift=1, rotate=10, scale=0.1))
    generator = torch.Generator().manual_seed(3 * 100_003 + 1)
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)
    for (x, _), index in zip(served, shuffled_batches(30, 8, generator)):
        expected = random_shift(random_rotate(data.images[index], 10, 0.1, generator), 1, generator)
        assert torch.equal(x, normalize(expected, mean, std))
    plain = list(_epoch_batches(data, shift=1))
    assert not torch.equal(served[0][0], plain[0][0])


@pytest.mark.parametrize("key, value", [("rotate", -1), ("rotate", 181), ("scale", 1.0)])
def test_rotation_and_zoom_settings_are_checked(key, value):
    from cnnlab.config import TrainConfig

    with pytest.raises(CnnlabError, match=f"train.{key}"):
        TrainConfig(**{key: value})


def test_a_relative_folder_is_named_with_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    """A run trained on `folder:photos` names it relatively: used from another folder, the error says where."""
    import re

    monkeypatch.chdir(tmp_path)
    here = re.escape(str(tmp_path / "photos"))
    with pytest.raises(CnnlabError, match=f"dataset folder photos \\(here: {here}\\) does not exist"):
        load_folder("photos", progress=False)
    (tmp_path / "photos" / "only").mkdir(parents=True)
    with pytest.raises(CnnlabError, match=f"photos \\(here: {here}\\): expected one sub-folder per class"):
        load_folder("photos", progress=False)
    with pytest.raises(CnnlabError, match=f"^{here}: expected one sub-folder per class"):
        load_folder(tmp_path / "photos", progress=False)
