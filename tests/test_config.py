"""Configuration: defaults → preset → file → CLI overrides, with key-naming errors."""

import json
from pathlib import Path

import pytest

from cnnlab.config import DataConfig, TrainConfig, folder_path, resolve_config
from cnnlab.errors import CnnlabError


def test_preset_then_overrides():
    config = resolve_config("tutorial", overrides={"train": {"epochs": 2, "lr": None}})
    assert config.train.epochs == 2 and config.train.lr == 0.01 and config.train.batch_size == 100
    assert config.data.dataset == "mnist"


def test_file_formats_and_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("preset: tutorial\ntrain:\n  epochs: 3\n  batch_size: 50\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text('preset = "tutorial"\n[train]\nepochs = 4\n')
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"model": ["flatten", {"type": "linear"}], "train": {"lr": 0.1}}))
    assert resolve_config(None, yaml_file, {"train": {"epochs": 5}}).train.epochs == 5
    assert resolve_config(None, yaml_file).train.batch_size == 50
    assert resolve_config(None, toml_file).train.epochs == 4
    config = resolve_config(None, json_file)
    assert config.model == ["flatten", {"type": "linear"}] and config.preset is None


@pytest.mark.parametrize("text,fragment", [
    ("train:\n  lrr: 0.1\n", "train.lrr: unknown setting (did you mean 'lr'?)"),
    ("trian:\n  lr: 0.1\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("train:\n  epochs: -1\n", "train.epochs: expected a positive number"),
    ("train:\n  optimizer: rmsprop\n", "train.optimizer"),
    ("train:\n  batch_size: lots\n", "train.batch_size: expected a whole number"),
    ("data:\n  dataset: imagenet\n", "data.dataset"),
    ("model:\n  - type: conv\n    kernel_size: 3\n", "layer 1 (conv): missing required key 'out_channels'"),
    ("train: [1, 2\n", "cannot parse config"),
    ("train:\n  flip_alternate: true\n", "train.flip_alternate changes how train.flip flips: set train.flip: true too"),
])
def test_bad_config_files_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CnnlabError) as err:
        resolve_config(None, path)
    assert fragment in str(err.value)


def test_folder_dataset_defaults_to_rgb_preset():
    assert resolve_config(None, overrides={"data": {"dataset": "folder:/x"}}).preset == "rgb32"
    assert resolve_config(None).preset == "default"


def test_missing_config_file(tmp_path):
    with pytest.raises(CnnlabError, match="config file not found"):
        resolve_config(None, tmp_path / "nope.yaml")


def test_colour_presets_ask_for_an_image_folder():
    with pytest.raises(CnnlabError, match="preset cifar-fast is for folders of colour images.*--dataset folder:PATH"):
        resolve_config("cifar-fast")
    assert resolve_config("cifar-fast", overrides={"data": {"dataset": "folder:/x"}}).train.precision == "bf16"
    with pytest.raises(CnnlabError, match="train.precision: expected auto, fp32, bf16, got 'fp16'"):
        resolve_config("default", overrides={"train": {"precision": "fp16"}})


def test_every_setting_is_explained_in_train_help(capsys):
    """The field docstrings are the documentation: `cnnlab train --help` shows each flag's and every --set key's."""
    import dataclasses

    from cnnlab.cli import main
    from cnnlab.config import field_help

    for cls in (DataConfig, TrainConfig):
        undocumented = [f.name for f in dataclasses.fields(cls) if not field_help(cls, f.name)]
        assert not undocumented, f"{cls.__name__} fields without a docstring: {undocumented}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR Peak learning rate." in text and "--optimizer {adam,adamw,sgd}" in text
    assert "train.norm_lr_scale (default 1.0): Learning-rate multiplier for BatchNorm parameters" in text
    assert "data.test_fraction (default 0.1):" in text and "data.val_fraction (default None):" in text


def test_a_duplicate_yaml_key_is_refused_with_both_lines(tmp_path):
    from cnnlab.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(CnnlabError, match=r"c\.yaml: line 4, column 3: key 'lr' is given twice \(first on line 2\)"):
        read_config_file(path)


def test_a_yaml_merge_may_be_overridden(tmp_path):
    from cnnlab.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 2}\ntrain:\n  <<: *b\n  lr: 0.3\n")
    assert read_config_file(path)["train"] == {"lr": 0.3, "epochs": 2}


@pytest.mark.parametrize("name, text, where", [
    ("c.yaml", "train:\n  lr: [0.1\n  epochs: 2\n", "line 3, column 9"),
    ("c.json", '{"train": {"lr": 0.1,}}', "line 1, column 22"),
])
def test_syntax_errors_give_line_and_column(tmp_path, name, text, where):
    from cnnlab.config import read_config_file

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CnnlabError, match=where) as err:
        read_config_file(path)
    assert "\n" not in str(err.value)


def test_a_config_nested_beyond_recursion_is_one_line(tmp_path):
    from cnnlab.config import read_config_file

    path = tmp_path / "c.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(CnnlabError, match="nested deeper"):
        read_config_file(path)


def test_a_relative_folder_is_kept_as_an_absolute_path(tmp_path, monkeypatch):
    """`--dataset folder:photos` is saved as where photos/ is, so evaluate, explain --check and --resume find it
    from another directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_config(None, overrides={"data": {"dataset": "folder:photos"}}).data.dataset == f"folder:{tmp_path / 'photos'}"
    assert resolve_config(None, overrides={"data": {"dataset": "folder:~/pets"}}).data.dataset == \
        f"folder:{tmp_path / 'home' / 'pets'}"
    assert resolve_config(None, {"data": {"dataset": "folder:/data/pets"}}).data.dataset == "folder:/data/pets"
    assert resolve_config(None, overrides={"data": {"dataset": "mnist"}}).data.dataset == "mnist"


def test_folder_path_is_the_one_reading_of_folder_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert folder_path("folder:~/pets") == tmp_path / "pets"
    assert folder_path("folder:pets.zip") == Path("pets.zip")
    assert [folder_path(value) for value in ("mnist", "folder:", "", None, 3)] == [None] * 5
    with pytest.raises(CnnlabError, match="'folder:' needs a path"):
        DataConfig(dataset="folder:")
