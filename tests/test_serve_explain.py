"""POST /explain with FastAPI's TestClient on tiny random-weight models: the same input forms as
/predict, every method, targets and layers, errors as one-line JSON 4xx, the OpenAPI schema, and
explanations that run beside predictions without disturbing them."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("captum", reason="the explain extra (captum) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

from cnnlab.runs import open_run  # noqa: E402
from cnnlab.explain import explain  # noqa: E402
from cnnlab.predict import Predictor  # noqa: E402
from cnnlab.serve import create_app  # noqa: E402

from tests.support.user_digits import drawn_one, encode, save_tiny_model  # noqa: E402

PNG = encode(drawn_one())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model.safetensors")


@pytest.fixture(scope="module")
def client(tiny_model) -> TestClient:
    return TestClient(create_app(tiny_model), raise_server_exceptions=False)


def png_size(data_url: str) -> tuple[tuple[int, int], str]:
    header, _, data = data_url.partition(",")
    assert header == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return image.size, image.mode


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated-gradients", "occlusion"])
def test_explain_returns_the_prediction_and_the_map(client, tiny_model, method):
    response = client.post(f"/explain?method={method}", files={"file": ("one.png", PNG, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == method and body["prediction"]["label"] == body["target"]["label"]
    assert body["target_index"] == body["prediction"]["index"] and len(body["prediction"]["top_k"]) == 3
    assert np.asarray(body["map"]).shape == (28, 28) and body["limit"] > 0
    assert body["signed"] == (method != "gradcam") and (body["layer"] == 7) == (method == "gradcam")
    assert png_size(body["overlay_png"]) == ((28, 28), "RGBA") and png_size(body["input_png"]) == ((28, 28), "L")
    # The same numbers as the Python function on the same input.
    predictor = Predictor.from_path(tiny_model)
    expected = explain(predictor.run, predictor.prepare(predictor.load(PNG)), method)
    assert np.allclose(body["map"], expected.maps[0].numpy(), rtol=2e-3, atol=1e-6)


def test_every_input_form_of_predict_works(client):
    multipart = client.post("/explain", files={"file": ("one.png", PNG, "image/png")}).json()
    raw = client.post("/explain", content=PNG, headers={"content-type": "image/png"}).json()
    as_json = client.post("/explain", json={"image": base64.b64encode(PNG).decode(), "top_k": 2}).json()
    assert multipart["map"] == raw["map"] == as_json["map"] and len(as_json["prediction"]["top_k"]) == 2


def test_target_and_layer(client):
    body = client.post("/explain?target=3&layer=1", content=PNG, headers={"content-type": "image/png"}).json()
    assert body["target"]["label"] == "3" and body["target_index"] == 3 and body["layer"] == 1
    assert body["layer_name"].startswith("1: conv 6x28x28")


@pytest.mark.parametrize("query, words", [
    ("?target=cat", "target 'cat': not a class of this model"),
    ("?layer=9", "layer 9 (flatten) outputs 288 numbers, not a spatial map"),
    ("?layer=99", "layer 99: this model has layers 1-14"),
    ("?method=lime", "query.method: Input should be"),
    ("?method=saliency&layer=2", "works on the input pixels"),
    ("?layer=0", "query.layer"),
])
def test_mistakes_are_422_with_one_line(client, query, words):
    response = client.post(f"/explain{query}", content=PNG, headers={"content-type": "image/png"})
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert "\n" not in response.json()["detail"]


def test_bad_images_get_the_same_answers_as_predict(client):
    for body, content_type in ((b"not an image", "image/png"), (b"", "image/png"), (PNG, "text/plain")):
        explained = client.post("/explain", content=body, headers={"content-type": content_type})
        predicted = client.post("/predict", content=body, headers={"content-type": content_type})
        assert explained.status_code == predicted.status_code >= 400 and explained.json() == predicted.json()


def test_in_the_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert {p["name"] for p in operation["parameters"]} == {"method", "target", "layer", "top_k"}
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "application/json", "image/*"}
    assert "ExplainOut" in schema["components"]["schemas"]


def test_colour_model(tmp_path):
    path = save_tiny_model(tmp_path / "colour.safetensors", classes=4, kind="resize", input_shape=(3, 32, 32))
    client = TestClient(create_app(path), raise_server_exceptions=False)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    body = client.post("/explain?method=integrated-gradients&target=class-2", content=encode(photo),
                       headers={"content-type": "image/png"}).json()
    assert np.asarray(body["map"]).shape == (32, 32) and body["target"]["label"] == "class-2"
    assert png_size(body["input_png"]) == ((32, 32), "RGB")


def test_explanations_run_beside_predictions_without_mixing_them(tiny_model):
    """Grad-CAM hooks a layer while it runs: it uses the server's private copy of the model, so
    concurrent /predict answers stay exact and the served model never carries a hook."""
    app = create_app(tiny_model)
    client = TestClient(app, raise_server_exceptions=False)
    expected = client.post("/predict", content=PNG, headers={"content-type": "image/png"}).json()
    gradcam = client.post("/explain", content=PNG, headers={"content-type": "image/png"}).json()["map"]
    failures: list[str] = []

    def predict_many():
        for _ in range(15):
            got = client.post("/predict", content=PNG, headers={"content-type": "image/png"}).json()
            if got != expected:
                failures.append(str(got))

    def explain_many():
        for _ in range(8):
            got = client.post("/explain", content=PNG, headers={"content-type": "image/png"}).json()
            if got.get("map") != gradcam:
                failures.append(str(got)[:200])

    threads = [threading.Thread(target=predict_many), threading.Thread(target=explain_many),
               threading.Thread(target=explain_many)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    served = app.state.cnnlab.predictor.model
    assert all(not module._forward_hooks for module in served.modules())
    assert app.state.cnnlab.explainer.bundle.model is not served
    assert open_run(tiny_model).classes == app.state.cnnlab.predictor.classes
