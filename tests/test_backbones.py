"""timm backbones as a layer type (`backbones.py`): a tiny timm model with random weights saved to a
safetensors file stands in for a download, loaded through the same timm loader; then summary, training
with a frozen backbone, export with parity, predict and serve. Never touches the network."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm", reason="the timm extra is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

from cnnlab.runs import open_run  # noqa: E402
from cnnlab.cli import main  # noqa: E402
from cnnlab.config import Config, DataConfig, TrainConfig, resolve_config  # noqa: E402
from cnnlab.data import Dataset  # noqa: E402
from cnnlab.data.tensors import ImageTensors  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.layers import parse_layers  # noqa: E402
from cnnlab.summarize import summarize, summary_to_dict  # noqa: E402
from cnnlab.training import fit  # noqa: E402

NAME = "test_resnet"  # timm's own tiny ResNet for tests: 470k parameters


def spec(pretrained) -> list:
    return [{"type": "timm", "name": NAME, "pretrained": pretrained}, "global_avg_pool", {"type": "linear"}]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """What a download gives: the whole ImageNet model (classifier included) as model.safetensors."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False)
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def colour_data(n_per_class: int = 12, size: int = 32) -> Dataset:
    """Two colour classes: red-ish and blue-ish images with noise."""
    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> ImageTensors:
        images = torch.randint(0, 80, (2 * n, 3, size, size), generator=generator, dtype=torch.uint8)
        images[:n, 0] += 150
        images[n:, 2] += 150
        return ImageTensors(images, torch.tensor([0] * n + [1] * n))

    return Dataset("colours", split(n_per_class), split(4), ["red", "blue"], "resize")


@pytest.fixture(scope="module")
def run(weights, tmp_path_factory):
    lines: list[str] = []
    config = Config(preset=None, model=spec(str(weights)), data=DataConfig(),
                    train=TrainConfig(epochs=2, batch_size=8, lr=0.01, optimizer="adamw", freeze="features",
                                      device="cpu", threads=1))
    out = tmp_path_factory.mktemp("timm-run") / "run"
    fit(config, out, data=colour_data(), progress=False, log=lines.append)
    return out, lines


def test_pretrained_weights_from_a_file_go_through_timms_loader_and_stay_frozen(weights, run):
    out, lines = run
    assert any(line.startswith(f"pretrained weights for layer 1 (timm {NAME}, pretrained: {weights.name}) from {weights}")
               for line in lines), lines
    assert any(line.startswith("frozen: layers 1 (features") for line in lines), lines
    published, trained = load_file(str(weights)), load_file(str(out / "model.safetensors"))
    backbone = {k[len("features.0.model."):]: v for k, v in trained.items() if k.startswith("features.0.model.")}
    assert set(backbone) == set(published) - {"fc.weight", "fc.bias"}  # timm dropped the ImageNet classifier
    for key, value in backbone.items():
        assert torch.equal(value, published[key]), key  # loaded, frozen, BatchNorm statistics kept
    meta = json.loads((out / "model.json").read_text())
    cfg = timm.models.get_pretrained_cfg(NAME)
    assert meta["preprocessing"]["mean"] == pytest.approx(list(cfg.mean))  # the backbone's normalisation
    assert json.loads((out / "init.json").read_text())["source"] == str(weights)


@pytest.mark.slow  # end to end: predict, show, an ONNX export with its parity check and the server
def test_a_trained_model_needs_no_pretrained_file_to_load_predict_export_and_serve(weights, run, tmp_path, capsys):
    out, _ = run
    weights.rename(weights.with_suffix(".moved"))  # the run's own weights are all that is needed now
    try:
        bundle = open_run(out)
        assert bundle.layers[0].type == "timm" and bundle.classes == ["red", "blue"]
        photo = tmp_path / "photo.png"
        Image.new("RGB", (64, 48), (220, 30, 40)).save(photo)
        assert main(["predict", str(out), str(photo), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["label"] in ("red", "blue")
        picture = tmp_path / "maps.png"
        assert main(["show", "feature-maps", str(out), "--image", str(photo), "--out", str(picture)]) == 0
        assert picture.stat().st_size > 10_000
        pytest.importorskip("onnxruntime")
        assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0  # checks parity
        assert (tmp_path / "m.onnx").stat().st_size > 100_000
        from fastapi.testclient import TestClient

        from cnnlab.serve import create_app

        client = TestClient(create_app(out))
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), (20, 30, 220)).save(buffer, "PNG")
        assert client.post("/predict", files={"file": ("b.png", buffer.getvalue())}).json()["label"] in ("red", "blue")
        maps = client.post("/inspect", files={"file": ("b.png", buffer.getvalue())}).json()["feature_maps"]
        assert maps[0]["layer"] == 1 and maps[0]["name"].startswith(f"timm {NAME}")  # the backbone's output maps
    finally:
        weights.with_suffix(".moved").rename(weights)


def test_a_second_stage_trains_the_whole_network_from_the_first(run, tmp_path):
    out, _ = run
    config = resolve_config(None, overrides={"data": {"dataset": "folder:/unused"},
                                             "train": {"init": str(out), "epochs": 1, "threads": 1}})
    assert config.train.freeze is None and parse_layers(config.model)[0].type == "timm"
    lines: list[str] = []
    fit(config, tmp_path / "stage2", data=colour_data(), progress=False, log=lines.append)
    assert any("kept its last layer" in line for line in lines) and not any("pretrained" in line for line in lines)
    before, after = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "stage2" / "model.safetensors"))
    assert not torch.equal(before["features.0.model.conv1.0.weight"], after["features.0.model.conv1.0.weight"])


def test_summary_shows_the_backbone_block_by_block_verified_by_pytorch():
    summary = summarize(parse_layers(spec(False)), (3, 64, 64), 5)  # verify=True: every block's shape and params
    backbone = summary.layers[0]
    blocks = [child.spec.params["block"] for child in backbone.children]
    assert blocks == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    model = timm.create_model(NAME, num_classes=0, global_pool="")
    assert backbone.params == sum(p.numel() for p in model.parameters())
    assert backbone.out_shape == backbone.children[-1].out_shape == tuple(model(torch.zeros(1, 3, 64, 64)).shape[1:])
    assert backbone.macs == sum(child.macs for child in backbone.children) > 0
    assert summary_to_dict(summary)["layers"][0]["children"][4]["description"] == "layer1 (Sequential)"
    assert main(["summary", "--config", _write_config(), "--input", "1x40x40"]) == 0  # grey input: in_chans 1


def _write_config() -> str:
    import tempfile

    path = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"model": spec(False)}, path)
    path.close()
    return path.name


def test_the_backbone_sets_the_image_size_and_the_finetune_preset_resolves():
    resolved = resolve_config("finetune", overrides={"data": {"dataset": "folder:/photos"}})
    assert resolved.data.image_size == 224 and resolved.train.freeze == "features"
    assert parse_layers(resolved.model)[0].params["name"] == "resnet18"


def test_offline_pretrained_true_says_how_to_get_the_weights(tmp_path):
    config = Config(preset=None, model=spec(True), train=TrainConfig(epochs=1, batch_size=8, device="cpu", threads=1))
    with pytest.raises(CnnlabError) as err:
        fit(config, tmp_path / "run", data=colour_data(), progress=False, log=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message and "CNNLAB_OFFLINE" in message and "pretrained: /path/to/model.safetensors" in message
    assert "timm/test_resnet" in message and not (tmp_path / "run").exists()


def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once, and nothing leaves the machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_network_fails_at_once_with_one_whole_line(tmp_path, monkeypatch):
    from cnnlab.layers import backbones

    monkeypatch.delenv("CNNLAB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # the hub, unreachable
    monkeypatch.setattr(backbones, "_cached_hub_file", lambda hub_id: None)  # not in this machine's cache

    def no_download(*args, **kwargs):
        raise AssertionError("timm's download must not start when the hub cannot be reached")

    monkeypatch.setattr(backbones, "_create", no_download)
    config = Config(preset=None, model=spec(True), train=TrainConfig(epochs=1, batch_size=8, device="cpu", threads=1))
    with pytest.raises(CnnlabError) as err:
        backbones.load_pretrained(None, parse_layers(config.model)[0], "layer 1")
    message = str(err.value)
    assert "\n" not in message and "cannot reach" in message and "cannot connect to 127.0.0.1" in message
    assert message.endswith("and write pretrained: /path/to/model.safetensors")


def test_the_probe_says_when_a_host_answers():
    import socket

    from cnnlab.layers.backbones import unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    assert "cannot connect" in unreachable(f"http://127.0.0.1:{closed_port()}")


def test_a_long_download_error_is_cut_at_a_word():
    from cnnlab.layers.backbones import _words

    text = _words(RuntimeError("connection " * 40 + "\nsecond line"))
    assert text.endswith("connection ...") and len(text) <= 164 and "second" not in text


@pytest.mark.parametrize("layer, words", [
    ({"type": "timm", "name": NAME, "pretrained": "weights.pth"}, "or a .safetensors file (other formats would be unpickled)"),
    ({"type": "timm", "name": NAME, "pretrained": "efficientnet-lite0"}, "holds the weights of timm tf_efficientnet_lite0"),
    ({"type": "timm", "name": "no_such_net"}, "timm has no model 'no_such_net'"),
    ({"type": "timm", "name": 3}, "name must be a timm model name"),
    ({"type": "timm_block", "block": "layer1"}, "write {type: timm, name: ...} instead"),
])
def test_spec_mistakes_are_one_line_errors(layer, words):
    with pytest.raises(CnnlabError) as err:
        summarize(parse_layers([layer, "global_avg_pool", "linear"]), (3, 32, 32), 2)
    assert words in str(err.value) and str(err.value).startswith("layer 1") and "\n" not in str(err.value)


def test_gradcam_reads_a_block_inside_the_backbone_as_summary_numbers_it(run):
    """`--layer 1.N`: the CAM hooks that block of the timm model (the rows `cnnlab summary` shows)."""
    from cnnlab.explain import explain, gradcam_layer, module_at

    out, _ = run
    bundle = open_run(out)
    infos = bundle.infos()
    spatial = [child for child in infos[0].children if len(child.out_shape) == 3 and min(child.out_shape[1:]) >= 2]
    inner, earlier = spatial[-1], spatial[0]  # (on 32x32 inputs the backbone's own output is 1x1)
    assert gradcam_layer(infos, inner.path) == inner.path and len(inner.path.split(".")) == 2
    block = bundle.model.features[0].model.get_submodule(inner.spec.params["block"])
    assert module_at(bundle.model, inner.path) is block
    images = torch.randint(0, 255, (2, *bundle.input_shape), dtype=torch.uint8)
    result = explain(bundle, images, "gradcam", layer=inner.path)
    assert result.maps.shape == (2, *bundle.input_shape[1:]) and torch.isfinite(result.maps).all()
    assert result.layer == inner.path and result.layer_name.startswith(f"{inner.path}: {inner.spec.params['block']}")
    assert not torch.equal(result.maps, explain(bundle, images, "gradcam", layer=earlier.path).maps)
    with pytest.raises(CnnlabError, match="layer 1.99: no such layer inside a block"):
        gradcam_layer(infos, "1.99")
