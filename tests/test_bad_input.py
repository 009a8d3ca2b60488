"""Bad input everywhere: configs, layer specs, model files and images.

The rule under test: anything a user (or an attacker) can hand cnnlab either works or gives one
line that names the culprit (a config key, a layer, a file, a weight), with a non-zero exit code
and no traceback; and nothing inside a file is ever executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from cnnlab.checkpoint import load_resume_state, read_metadata, save_model
from cnnlab.runs import open_run
from cnnlab.cli import main
from cnnlab.config import DataConfig, TrainConfig, config_from_dict, resolve_config
from cnnlab.data.preprocess import Preprocessing
from cnnlab.errors import CnnlabError
from cnnlab.layers import LAYER_TYPES, build_model, parse_layers, spec_to_list
from tests.support.helpers import TINY_SPEC
from tests.support.hostile_images import (MARKER_NAME, MarkerPayload, expected_outcome, exif_rotated_jpeg,
                                          pickle_payload, write_corpus)
from tests.support.run_folders import cnnlab_env

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@contextlib.contextmanager
def bounded_memory(what: str, limit_mib: int = 1024):
    """The block may not raise the process's peak memory by `limit_mib` or more: "refused before
    allocating anything large" checked by memory (a 10⁹-channel spec, a decompression bomb), not by
    a stopwatch, which a busy machine would fail."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        yield
    finally:
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown < limit_mib, f"{what}: peak memory grew by {grown:.0f} MiB"


def assert_one_line(error: CnnlabError) -> str:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)
    return text


# ---------------------------------------------------------------------------------------------
# Configs and layer specs (hypothesis)
# ---------------------------------------------------------------------------------------------

WORDS = ["same", "valid", "mnist", "folder:", "adam", "sgd", "relu", "conv", "linear", "flatten", "maxpool", "zeros",
         "reflect", "cuda", "auto", "true", "1e999", "-1", "", "tutorial"]
scalars = (st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=10) | st.sampled_from(WORDS))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(["type", "layers", "kernel_size", "lr"]),
                                        inner, max_size=4), max_leaves=10)
TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
DATA_KEYS = [f.name for f in dataclasses.fields(DataConfig)]
config_files = st.dictionaries(st.sampled_from(["preset", "model", "data", "train"]) | st.text(max_size=6), values, max_size=5)


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(raw=config_files, fmt=st.sampled_from(["json", "yaml"]))
def test_random_config_files_work_or_fail_in_one_line(tmp_path_factory, raw, fmt):
    path = tmp_path_factory.mktemp("cfg") / f"config.{fmt}"
    path.write_text(json.dumps(raw) if fmt == "json" else yaml.safe_dump(raw, allow_unicode=True))
    try:
        resolve_config(None, path)
    except CnnlabError as error:
        assert_one_line(error)


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(section=st.sampled_from(["train", "data"]), data=st.data())
def test_one_bad_setting_is_named_in_the_error(section, data):
    """Mutate one setting of a valid config: if it is refused, the message names exactly that key."""
    keys = TRAIN_KEYS if section == "train" else [k for k in DATA_KEYS if k != "dataset"]
    key = data.draw(st.sampled_from(keys) | st.text(min_size=1, max_size=8), label="key")
    value = data.draw(values, label="value")
    try:
        resolve_config("tutorial", None, {section: {key: value}} if value is not None else {})
    except CnnlabError as error:
        text = assert_one_line(error)
        name = f"{section}.{key}" if str(key).isidentifier() else f"{section}.{str(key)!r}"
        assert text.startswith(name), (text, name)


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(index=st.integers(0, len(TINY_SPEC) - 1), data=st.data())
def test_one_bad_layer_is_named_in_the_error(index, data):
    """Corrupt one layer of a valid spec (a bad value or an unknown key): the error names that layer."""
    spec = json.loads(json.dumps(TINY_SPEC))
    layer = spec[index] if isinstance(spec[index], dict) else {"type": spec[index]}
    key = data.draw(st.sampled_from(sorted(LAYER_TYPES[layer["type"]].keys) or ["p"]) | st.text(min_size=1, max_size=6))
    layer[key] = data.draw(values)
    spec[index] = layer
    try:
        parse_layers(spec)
    except CnnlabError as error:
        assert assert_one_line(error).startswith(f"layer {index + 1}"), (str(error), index + 1)


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(raw=values | st.dictionaries(st.sampled_from(["preset", "model", "data", "train"]), values))
def test_tampered_run_config_json(raw):
    """A run folder's config.json is read back by --resume; whatever it holds, one line or a config."""
    try:
        config_from_dict(raw)
    except CnnlabError as error:
        assert_one_line(error)


small = (st.integers(-1, 6) | st.booleans() | st.none() | st.floats(-1, 2) | st.just(float("nan"))
         | st.sampled_from(["same", "valid", "zeros", "reflect", "circular", "replicate", "x"])
         | st.lists(st.integers(-1, 5), max_size=3))
layer_types = st.sampled_from(sorted(LAYER_TYPES) + ["conv2d", "fc", "bn", "softmax", ""])
layers = layer_types.flatmap(lambda kind: st.just(kind) | st.fixed_dictionaries(
    {"type": st.just(kind)}, optional={k: small for k in (LAYER_TYPES[kind].keys if kind in LAYER_TYPES else {"p": None})}))


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=st.lists(layers, min_size=1, max_size=7), shape=st.sampled_from([(1, 8, 8), (3, 5, 7), (2, 1, 1)]))
def test_random_layer_specs_build_and_run_or_fail_in_one_line(spec, shape):
    """Parsing, the output-size formula, building and a forward pass: a spec either works end to end
    or is refused before any tensor is made, naming the layer (or the model as a whole)."""
    try:
        model = build_model(parse_layers(spec), shape, 3)
    except CnnlabError as error:
        assert assert_one_line(error).startswith(("layer ", "model", "input shape")), str(error)
        return
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 3)
    assert parse_layers(spec_to_list(parse_layers(spec)))  # what a checkpoint stores parses again


# ---------------------------------------------------------------------------------------------
# The CLI: one line, exit 2, no traceback
# ---------------------------------------------------------------------------------------------

def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("content, where", [
    ("model: [{type: conv, out_channels: 0, kernel_size: 3}, flatten, linear]", "layer 1"),
    ("model: [relu, {type: maxpool}, flatten, linear]", "layer 2"),
    ("model: [flatten, {type: linear, bias: maybe}]", "layer 2"),
    ("train: {lr: -1}", "train.lr"),
    ("train: {epochs: many}", "train.epochs"),
    ("train: {optimiser: adam}", "train.optimiser"),
    ("data: {image_size: 3}", "data.image_size"),
    ("data: [1, 2]", "data"),
    ("preset: [tutorial]", "preset"),
    ("model: 7", "model"),
    ("{{{", "cannot parse config"),
    ("modle: []", "unknown key 'modle'"),
])
def test_cli_bad_config_is_one_line(tmp_path, capsys, content, where):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, err = run_main(capsys, "train", "--config", str(path), "--out", str(tmp_path / "run"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], err


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(key=st.sampled_from([k for k in TRAIN_KEYS if k not in ("threads", "compile", "device")]), value=st.text(max_size=12))
def test_cli_set_flags_fuzz(tmp_path_factory, capsys, key, value):
    """`--set train.KEY=VALUE` with arbitrary text; the (absent) dataset stops valid configs before training."""
    out = tmp_path_factory.mktemp("set")
    code, err = run_main(capsys, "train", "--preset", "tutorial", "--dataset", f"folder:{out / 'none'}",
                         "--set", f"train.{key}={value}", "--out", str(out / "run"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err


# ---------------------------------------------------------------------------------------------
# Model files: truncated, tampered, disagreeing, pickles
# ---------------------------------------------------------------------------------------------

PREPROCESSING = {"kind": "resize", "channels": 1, "size": [12, 12], "mean": [0.5], "std": [0.25]}


def tiny_metadata(**changes) -> dict:
    meta = {"layers": TINY_SPEC, "input_shape": [1, 12, 12], "classes": ["a", "b", "c"],
            "preprocessing": PREPROCESSING, "dataset": "patterns", "epoch": 1, "metrics": {}, "config": {}}
    meta.update(changes)
    return meta


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, build_model(parse_layers(TINY_SPEC), (1, 12, 12), 3), tiny_metadata())
    open_run(path)  # the untampered file loads
    return path


def _resave(source: Path, target: Path, tensors=None, meta: dict | None = None, raw_meta: dict | None = None) -> Path:
    header = read_metadata(source)
    tensors = load_file(str(source)) if tensors is None else tensors
    if raw_meta is None:
        raw_meta = {"cnnlab": json.dumps({**header, **(meta or {})})}
    save_file(tensors, str(target), metadata=raw_meta)
    return target


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("cut", ["empty", "4", "8", "mid-header", "header", "mid-data", "last-byte"])
def test_truncated_model_file(model_file, tmp_path, cut):
    data = model_file.read_bytes()
    end = _header_end(data)
    size = {"empty": 0, "4": 4, "8": 8, "mid-header": end // 2, "header": end,
            "mid-data": (end + len(data)) // 2, "last-byte": len(data) - 1}[cut]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[:size])
    with pytest.raises(CnnlabError, match="model.safetensors: (not a valid safetensors|cannot read the weights)") as error:
        open_run(path)
    assert_one_line(error.value)


def test_header_length_field_lies(model_file, tmp_path):
    data = bytearray(model_file.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # a header "4 EiB long"
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match="not a valid safetensors"):
        open_run(path)


def _drop(tensors: dict, key: str) -> dict:
    return {k: v for k, v in tensors.items() if k != key}


TAMPERED = {
    # name: (how to change (tensors, meta), expected words in the error)
    "metadata not JSON": (lambda t, m: (t, None, {"cnnlab": "{not json"}), "not valid JSON"),
    "no cnnlab metadata": (lambda t, m: (t, None, {"other": "x"}), "without cnnlab metadata"),
    "unknown format": (lambda t, m: (t, {"format": "pytorch-pickle/9"}, None), "unknown model format"),
    "metadata is a list": (lambda t, m: (t, None, {"cnnlab": "[1, 2]"}), "unknown model format"),
    "missing layers": (lambda t, m: (t, {"layers": None}, None), "layer spec is invalid"),
    "wider conv than the weights": (lambda t, m: (t, {"layers": [dict(TINY_SPEC[0], out_channels=5)] + TINY_SPEC[1:]}, None),
                                    "has shape"),
    "more classes than the weights": (lambda t, m: (t, {"classes": ["a", "b", "c", "d"]}, None), "has shape"),
    "other input size than the weights": (lambda t, m: (t, {"input_shape": [1, 20, 20], "preprocessing": dict(
        PREPROCESSING, size=[20, 20])}, None), "has shape"),
    "other input channels than the weights": (lambda t, m: (t, {"input_shape": [3, 12, 12], "preprocessing": dict(
        PREPROCESSING, channels=3, mean=[0.5] * 3, std=[0.25] * 3)}, None), "has shape"),
    "preprocessing disagrees with the input shape": (lambda t, m: (t, {"input_shape": [1, 20, 20]}, None),
                                                     "preprocessing makes 1x12x12 inputs"),
    "a weight missing": (lambda t, m: (_drop(t, "head.1.bias"), None, None), "missing ['head.1.bias']"),
    "an extra weight": (lambda t, m: ({**t, "features.9.weight": torch.zeros(2)}, None, None), "unexpected"),
    "NaN weights": (lambda t, m: ({**t, "head.1.bias": torch.full((3,), float("nan"))}, None, None), "NaN"),
    "billions of weights asked": (lambda t, m: (t, {"layers": [dict(TINY_SPEC[0], out_channels=10**9)] + TINY_SPEC[1:]}, None),
                                  "needs"),
    "unknown layer type": (lambda t, m: (t, {"layers": ["flatten", {"type": "exec", "code": "import os"}]}, None),
                           "unknown layer type"),
    "preprocessing malformed": (lambda t, m: (t, {"preprocessing": {"kind": "resize"}}, None), "preprocessing"),
    "preprocessing channels disagree": (lambda t, m: (t, {"preprocessing": dict(PREPROCESSING, channels=3)}, None),
                                        "preprocessing"),
    "classes not a list": (lambda t, m: (t, {"classes": "abc"}, None), "classes"),
    "input shape not numbers": (lambda t, m: (t, {"input_shape": ["x", 1, 1]}, None), "malformed"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_or_disagreeing_model_file(model_file, tmp_path, case):
    change, expected = TAMPERED[case]
    tensors, meta, raw_meta = change(load_file(str(model_file)), read_metadata(model_file))
    path = _resave(model_file, tmp_path / "model.safetensors", tensors, meta, raw_meta)
    with bounded_memory("opening " + case):  # refused before allocating anything large
        with pytest.raises(CnnlabError) as error:
            open_run(path)
    text = assert_one_line(error.value)
    assert expected in text and str(path) in text, text


@pytest.mark.slow  # a hypothesis fuzz campaign (hundreds of examples)
@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=6))
def test_random_byte_flips_in_a_model_file(model_file, tmp_path_factory, flips):
    data = bytearray(model_file.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    path = tmp_path_factory.mktemp("flip") / "model.safetensors"
    path.write_bytes(bytes(data))
    try:
        model = open_run(path).model
    except CnnlabError as error:
        assert_one_line(error)
        return
    assert torch.isfinite(model(torch.rand(1, 1, 12, 12))).all()  # a flip inside a weight: still a model


@pytest.fixture()
def marker(tmp_path) -> Path:
    marker = tmp_path / MARKER_NAME
    yield marker
    assert not marker.exists(), "a file's code was executed"


def _pickles(marker: Path) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"model": MarkerPayload(marker)}, buffer)  # the zip format torch.load reads
    return {"raw pickle": pickle_payload(marker), "torch.save zip": buffer.getvalue(),
            "pickle after a fake header": (16).to_bytes(8, "little") + b'{"a":1}' + b" " * 9 + pickle_payload(marker)}


def test_the_pickle_payload_is_live(tmp_path):
    """The control experiment: unpickling the payload does create the marker, so its absence means something."""
    marker = tmp_path / "control"
    pickle.loads(pickle_payload(marker))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["raw pickle", "torch.save zip", "pickle after a fake header"])
def test_pickle_renamed_to_safetensors_is_refused_unexecuted(tmp_path, capsys, marker, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "model.safetensors"
    path.write_bytes(_pickles(marker)[kind])
    for target in (path, run_dir):
        with pytest.raises(CnnlabError, match="not a valid safetensors model file"):
            open_run(target)
    with pytest.raises(CnnlabError):
        load_resume_state(path)
    for argv in (["evaluate", str(run_dir)], ["predict", str(path), str(tmp_path)], ["export", str(run_dir)],
                 ["summary", str(path)], ["serve", str(path), "--host", "256.0.0.1"]):
        try:
            code, err = run_main(capsys, *argv)
        except SystemExit as exit:  # argparse: a command's own usage error
            code, err = exit.code, capsys.readouterr().err
        if argv[0] in ("evaluate", "predict", "serve"):
            assert code == 2, (argv, err)
        if code:
            assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("error: ", "usage", "cnnlab")), err


@pytest.mark.slow  # a `cnnlab train` process
def test_resume_with_a_pickled_resume_file(tmp_path, marker):
    from tests.support.run_folders import pattern_folder, run_cnnlab, write_config

    env = cnnlab_env(CNNLAB_CACHE=str(tmp_path / "cache"))
    config = write_config(tmp_path / "c.json", f"folder:{pattern_folder(tmp_path / 'patterns', 20)}", 2)
    run_dir = tmp_path / "run"
    result = run_cnnlab("train", "--config", str(config), "--out", str(run_dir), "--epochs", "1", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    (run_dir / "resume.safetensors").write_bytes(pickle_payload(marker))
    result = run_cnnlab("train", "--resume", str(run_dir), "--epochs", "2", "--no-progress", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read the resume state" in result.stderr.strip().splitlines()[-1]
    (run_dir / "config.json").write_bytes(b"\x80\x04\x95 not json \xff")
    result = run_cnnlab("train", "--resume", str(run_dir), "--no-progress", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "config.json: not valid JSON" in result.stderr


# ---------------------------------------------------------------------------------------------
# Images: a hostile corpus through the prediction path and the `predict` command
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile") / "images"
    return folder, write_corpus(folder)


@pytest.fixture(scope="module", params=["digit", "resize"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """A random-weight model of each preprocessing kind (28x28 grey digits; 16x16 colour photos)."""
    shape = (1, 28, 28) if request.param == "digit" else (3, 16, 16)
    prep = {"kind": request.param, "channels": shape[0], "size": list(shape[1:]), "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0]}
    run_dir = tmp_path_factory.mktemp(f"model-{request.param}")
    torch.manual_seed(0)
    save_model(run_dir / "model.safetensors", build_model(parse_layers(TINY_SPEC), shape, 3),
               tiny_metadata(input_shape=list(shape), preprocessing=prep))
    return run_dir


def test_hostile_images_through_the_predictor(corpus, tiny_model_dir):
    from cnnlab.predict import BadImage, Predictor

    folder, expectations = corpus
    predictor = Predictor.from_path(tiny_model_dir)
    outcomes = {}
    for name, expectation in expectations.items():
        expectation = expected_outcome(expectation, predictor.preprocessing.kind)
        try:
            with bounded_memory(name):  # a decompression bomb is refused, never decoded
                prediction = predictor.predict_bytes((folder / name).read_bytes())
            outcomes[name] = "ok"
            assert prediction.label in predictor.classes and 0 <= prediction.confidence <= 1
        except BadImage as error:
            outcomes[name] = "reject"
            assert_one_line(error)
            assert error.status in (413, 415, 422)
            if expectations[name] == "blank":
                assert str(error).startswith("no digit found") and error.status == 422, error
        assert expectation in ("any", outcomes[name]), (name, expectation, outcomes[name])
    assert not (folder.parent / MARKER_NAME).exists()


def test_exif_orientation_is_applied(tiny_model_dir):
    from cnnlab.predict import open_image

    prep = Preprocessing.from_dict(read_metadata(tiny_model_dir)["preprocessing"])
    rotated, upright = exif_rotated_jpeg()
    seen = prep.image_to_uint8(open_image(rotated)).float()
    expected = prep.image_to_uint8(upright).float()
    unrotated = prep.image_to_uint8(upright.transpose(1 + 1)).float()  # ROTATE_90 without the EXIF fix
    assert (seen - expected).abs().mean() < (seen - unrotated).abs().mean() / 3


@pytest.mark.slow  # `cnnlab predict` processes
def test_predict_command_on_the_hostile_corpus(corpus, tiny_model_dir):
    """One line per file (a prediction or an error), exit 1, no traceback, bounded memory."""
    folder, expectations = corpus
    command = [sys.executable, "-c",
               "import resource, sys; from cnnlab.cli import main; code = main(sys.argv[1:]); "
               "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)",
               "predict", str(tiny_model_dir), str(folder), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, env=cnnlab_env(), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # in a folder, a file whose extension is not an image's is skipped (counted once), whatever it holds
    from cnnlab.predict import IMAGE_EXTENSIONS

    skipped = [name for name in expectations if Path(name).suffix.lower() not in IMAGE_EXTENSIONS]
    assert skipped == ["no-extension"] and "skipped 1 file(s) whose extension is not an image's" in result.stderr
    assert sorted(Path(line["path"]).name for line in lines) == sorted(set(expectations) - set(skipped))
    kind = read_metadata(tiny_model_dir)["preprocessing"]["kind"]
    for line in lines:
        expectation = expected_outcome(expectations[Path(line["path"]).name], kind)
        assert expectation in ("any", "reject" if "error" in line else "ok"), line
    maxrss_mb = int(result.stderr.split("maxrss")[-1]) / 1024
    rejected = sum("error" in line for line in lines)
    print(f"\npredict on {len(lines)} hostile files: {len(lines) - rejected} classified, {rejected} refused, "
          f"peak memory {maxrss_mb:.0f} MB")
    assert maxrss_mb < 2048
    assert not (folder.parent / MARKER_NAME).exists()


@pytest.mark.parametrize("flag, value", [("--epochs", "nan"), ("--epochs", "inf"), ("--epochs", "0"), ("--epochs", "-2"),
                                         ("--threads", "-3"), ("--device", "tpu")])
def test_cli_resume_flags_are_checked_like_a_new_run(tmp_path, capsys, flag, value):
    """--resume may change --epochs/--threads/--device; bad values are refused before anything is rewritten."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = json.dumps(resolve_config("tutorial").to_dict())
    (run_dir / "config.json").write_text(saved)
    code, err = run_main(capsys, "train", "--resume", str(run_dir), flag, value)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: train."), err
    assert (run_dir / "config.json").read_text() == saved
