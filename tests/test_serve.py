"""The HTTP API with FastAPI's TestClient on a tiny random-weight model: every route, every way to
send an image, limits, and bad input of every kind answered with a JSON 4xx, never a 500."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cnnlab.runs import open_run  # noqa: E402
from cnnlab.cli import build_parser  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.serve import create_app  # noqa: E402

from tests.support.user_digits import drawn_one, encode, png_with_header, save_tiny_model  # noqa: E402

LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model.safetensors")


@pytest.fixture(scope="module")
def client(tiny_model) -> TestClient:
    # raise_server_exceptions=False: a bug must show up as the 500 a real client would get.
    return TestClient(create_app(tiny_model, max_upload_bytes=LIMIT, max_batch=4), raise_server_exceptions=False)


PNG = encode(drawn_one())


def check_prediction(body: dict, k: int) -> None:
    assert set(body) == {"label", "index", "confidence", "top_k"}
    assert len(body["top_k"]) == k and body["top_k"][0]["label"] == body["label"] == str(body["index"])
    assert abs(body["top_k"][0]["probability"] - body["confidence"]) < 1e-9


def test_health_and_model(client):
    assert client.get("/health").json() == {"status": "ok", "model": "model.safetensors", "classes": 10}
    info = client.get("/model").json()
    assert info["classes"] == [str(i) for i in range(10)] and info["input_shape"] == [1, 28, 28]
    assert info["preprocessing"]["kind"] == "digit" and info["parameters"] > 0
    assert info["layers"][0]["type"] == "conv" and info["layers"][0]["output_shape"] == [6, 28, 28]
    assert info["limits"] == {"max_upload_bytes": LIMIT, "max_pixels": 40_000_000, "max_batch": 4,
                              "max_decoded_bytes": 64_000_000}


def test_predict_multipart_json_and_raw_agree(client):
    multipart = client.post("/predict", files={"file": ("one.png", PNG, "image/png")})
    as_json = client.post("/predict", json={"image": base64.b64encode(PNG).decode()})
    data_url = client.post("/predict", json={"image": "data:image/png;base64," + base64.b64encode(PNG).decode()})
    raw = client.post("/predict", content=PNG, headers={"content-type": "image/png"})
    for response in (multipart, as_json, data_url, raw):
        assert response.status_code == 200, response.text
        check_prediction(response.json(), 3)
    assert multipart.json() == as_json.json() == data_url.json() == raw.json()


def test_top_k_from_query_form_or_json(client):
    check_prediction(client.post("/predict?top_k=5", files={"file": ("a.png", PNG)}).json(), 5)
    check_prediction(client.post("/predict", files={"file": ("a.png", PNG)}, data={"top_k": "2"}).json(), 2)
    check_prediction(client.post("/predict", json={"image": base64.b64encode(PNG).decode(), "top_k": 1}).json(), 1)
    check_prediction(client.post("/predict?top_k=99", files={"file": ("a.png", PNG)}).json(), 10)  # at most all classes


def test_batch_gives_each_image_its_prediction_or_error(client):
    files = [("files", ("one.png", PNG, "image/png")), ("files", ("notes.png", b"text", "image/png")),
             ("files", ("one.jpg", encode(drawn_one(), "JPEG"), "image/jpeg"))]
    body = client.post("/predict/batch?top_k=2", files=files).json()
    assert body["failed"] == 1 and [r["filename"] for r in body["results"]] == ["one.png", "notes.png", "one.jpg"]
    assert body["results"][1]["error"]["status"] == 415 and body["results"][1]["prediction"] is None
    check_prediction(body["results"][0]["prediction"], 2)
    assert body["results"][0]["prediction"]["label"] == body["results"][2]["prediction"]["label"]
    as_json = client.post("/predict/batch", json={"images": [base64.b64encode(PNG).decode()] * 2}).json()
    assert as_json["failed"] == 0 and len(as_json["results"]) == 2
    too_many = client.post("/predict/batch", files=[("files", (f"{i}.png", PNG, "image/png")) for i in range(5)])
    assert too_many.status_code == 413 and "at most 4" in too_many.json()["detail"]


def test_inspect_returns_the_model_input_and_feature_maps(client):
    body = client.post("/inspect", files={"file": ("one.png", PNG, "image/png")}).json()
    check_prediction(body["prediction"], 3)
    assert body["input_shape"] == [1, 28, 28] and body["input_png"].startswith("data:image/png;base64,")
    seen = Image.open(__import__("io").BytesIO(base64.b64decode(body["input_png"].split(",", 1)[1])))
    assert seen.size == (28, 28)
    names = [m["name"].split()[0] for m in body["feature_maps"]]
    assert names == ["conv", "relu", "maxpool", "conv", "relu", "maxpool"]  # batchnorm and dropout left out
    assert body["feature_maps"][0]["shape"] == [6, 28, 28] and body["feature_maps"][-1]["shape"] == [8, 6, 6]
    # ...and named, in their place, with the reason (the tiny model: batchnorm after layers 1 and 6)
    assert [(m["layer"], m["name"]) for m in body["skipped_layers"]] == [(2, "batchnorm"), (7, "batchnorm")]
    assert "rescales and shifts each channel of layer 1" in body["skipped_layers"][0]["reason"]


def test_feature_maps_are_signed_for_conv_outputs_as_in_the_cli(client):
    """conv outputs: RdBu_r around 0 (blue negative, white 0, red positive); after ReLU: magma from 0."""
    import io

    import numpy as np

    maps = {m["layer"]: m for m in client.post("/inspect", files={"file": ("one.png", PNG, "image/png")}).json()["feature_maps"]}
    conv, relu = maps[1], maps[3]
    assert conv["colormap"] == "RdBu_r" and conv["scale"][0] == -conv["scale"][1] < 0
    assert relu["colormap"] == "magma" and relu["scale"][0] == 0 < relu["scale"][1]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(conv["png"].split(",", 1)[1]))).convert("RGB"), dtype=int)
    red, blue = pixels[..., 0] - pixels[..., 2], pixels[..., 2] - pixels[..., 0]
    assert red.max() > 100 and blue.max() > 100  # both signs drawn, in their own colours


def test_favicon(client):
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml") and b"<svg" in icon.content
    assert 'rel="icon"' in client.get("/").text and client.get("/static/favicon.svg").status_code == 200


BLANK = encode(Image.new("RGBA", (280, 280), (0, 0, 0, 0)))  # an empty canvas: no digit to classify


def test_a_picture_without_a_digit_is_a_422_no_digit_found(client):
    for path in ("/predict", "/inspect"):
        for kwargs in ({"files": {"file": ("blank.png", BLANK, "image/png")}},
                       {"json": {"image": base64.b64encode(BLANK).decode()}},
                       {"content": BLANK, "headers": {"content-type": "image/png"}}):
            response = client.post(path, **kwargs)
            assert response.status_code == 422 and response.json()["detail"].startswith("no digit found"), response.text
    body = client.post("/predict/batch", files=[("files", ("blank.png", BLANK, "image/png")),
                                                ("files", ("one.png", PNG, "image/png"))]).json()
    assert body["failed"] == 1 and body["results"][1]["prediction"]["label"]
    assert body["results"][0]["error"]["status"] == 422
    assert body["results"][0]["error"]["detail"].startswith("no digit found")


HUGE_HEADER = png_with_header(50_000, 50_000)


@pytest.mark.parametrize("kwargs, status, words", [
    ({"files": {"file": ("notes.png", b"just some text", "image/png")}}, 415, "not an image"),
    ({"files": {"file": ("empty.png", b"", "image/png")}}, 422, "empty"),
    ({"files": {"file": ("cut.png", PNG[: len(PNG) // 2], "image/png")}}, 422, "truncated"),
    ({"files": {"file": ("head.png", PNG[:40], "image/png")}}, 422, "corrupt PNG"),
    ({"files": {"file": ("bomb.png", HUGE_HEADER, "image/png")}}, 413, "limit"),
    ({"files": {"file": ("dot.png", encode(Image.new("L", (1, 1))), "image/png")}}, 422, "1x1"),
    ({"data": {"top_k": "3"}}, 415, "unsupported content type"),  # a form without a file is urlencoded
    ({"files": {"file": ("a.png", b"")}, "data": {"top_k": "3"}}, 422, "empty"),
    ({"files": {"file": ("a.png", PNG)}, "data": {"top_k": "many"}}, 422, "top_k"),
    ({"files": {"file": ("a.png", PNG)}, "data": {"top_k": "0"}}, 422, "top_k"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "empty"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "not valid JSON"),
    ({"json": {"picture": "abc"}}, 422, "image"),
    ({"json": {"image": "%%% not base64 %%%"}}, 422, "base64"),
    ({"json": {"image": 12}}, 422, "image"),
    ({"json": {"image": base64.b64encode(b"text").decode()}}, 415, "not an image"),
    ({"json": {"image": "data:text/plain,hello"}}, 422, "base64"),
    ({"json": ["a", "list"]}, 422, "invalid JSON body"),
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422, ""),
    ({"content": b"a=1", "headers": {"content-type": "multipart/form-data"}}, 422, ""),
])
def test_bad_input_gets_a_json_4xx(client, kwargs, status, words):
    for path in ("/predict", "/inspect"):
        response = client.post(path, **kwargs)
        assert response.status_code == status, (path, response.text)
        assert response.headers["content-type"] == "application/json" and words in response.json()["detail"]
    assert client.get("/health").status_code == 200  # and the server is fine


def test_bad_query_top_k_is_a_422(client):
    response = client.post("/predict?top_k=0", files={"file": ("a.png", PNG)})
    assert response.status_code == 422 and response.json()["detail"]


def test_too_large_upload_is_413_before_parsing(client):
    big = b"\0" * (LIMIT + 1)
    for kwargs in ({"files": {"file": ("big.png", big, "image/png")}}, {"content": big, "headers": {"content-type": "image/png"}}):
        response = client.post("/predict", **kwargs)
        assert response.status_code == 413 and "upload too large" in response.json()["detail"]


def test_chunked_upload_without_length_is_counted(client):
    def chunks():
        for _ in range(40):
            yield b"\0" * (64 * 1024)  # 2.5 MiB in total, no Content-Length

    response = client.post("/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), content_type=st.sampled_from(["image/png", "application/json", "multipart/form-data",
                                                                   "application/octet-stream", "text/html", ""]))
def test_random_bytes_never_cause_a_500(client, data, content_type):
    for body in (data, PNG[:16] + data):
        response = client.post("/predict", content=body, headers={"content-type": content_type} if content_type else {})
        assert 400 <= response.status_code < 500, response.text
        assert isinstance(response.json()["detail"], (str, list))


def test_docs_and_page(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/inspect", "/health", "/model"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and 'id="clear"' in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_create_app_takes_a_loaded_model(tiny_model):
    bundle = open_run(tiny_model)
    app_client = TestClient(create_app((bundle.model, bundle.meta)))
    check_prediction(TestClient(create_app(bundle)).post("/predict", files={"file": ("a.png", PNG)}).json(), 3)
    check_prediction(app_client.post("/predict", files={"file": ("a.png", PNG)}).json(), 3)
    with pytest.raises(CnnlabError):
        create_app(tiny_model.parent / "missing.safetensors")


def test_inference_runs_off_the_event_loop(tiny_model):
    """Blocked inference must not block other requests: /health answers while four predictions are
    all inside the model at once (so they overlap, not one after another). Proven with events, not
    timings: the model waits until the test releases it."""
    import threading

    import httpx

    app = create_app(tiny_model)
    predictor = app.state.cnnlab.predictor
    original = predictor.probabilities
    inside, lock, release = [0], threading.Lock(), threading.Event()

    def blocked(inputs):
        with lock:
            inside[0] += 1
        release.wait(timeout=10)  # the timeout only guards against a hang if the test fails
        return original(inputs)

    predictor.probabilities = blocked

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            predictions = [asyncio.create_task(http.post("/predict", files={"file": ("a.png", PNG)})) for _ in range(4)]
            for _ in range(6000):  # until all four are inside the model (a guard of at most 60 s, not a measurement)
                if inside[0] == 4 or all(task.done() for task in predictions):
                    break
                await asyncio.sleep(0.01)
            all_inside = inside[0]
            health = await http.get("/health")  # answered while every prediction still waits
            still_waiting = not any(task.done() for task in predictions)
            release.set()
            return all_inside, health, still_waiting, await asyncio.gather(*predictions)

    try:
        all_inside, health, still_waiting, responses = asyncio.run(scenario())
    finally:
        release.set()
    assert all_inside == 4  # four requests in the model at the same time: inference runs in threads
    assert health.status_code == 200 and still_waiting
    assert all(r.status_code == 200 for r in responses)


def test_cli_defaults_to_localhost_and_reports_a_busy_port(tiny_model, capsys):
    args = build_parser("serve").parse_args(["serve", str(tiny_model)])
    assert args.host == "127.0.0.1" and args.port == 8000
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        from cnnlab.cli import main

        assert main(["serve", str(tiny_model), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


@pytest.mark.slow  # a schemathesis fuzz campaign
def test_openapi_schema_fuzzing_finds_no_server_error(tiny_model):
    """schemathesis sends schema-shaped requests to every route of the OpenAPI schema: none may give a 500."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(tiny_model))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.text[:200])

        check()


def test_onnx_runtime_answers_as_pytorch_does(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    import shutil

    from cnnlab.export import export_model

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_model, model)
    shutil.copy(tiny_model.with_suffix(".json"), model.with_suffix(".json"))
    export_model(model, "onnx", check_real=False)
    picture = encode(drawn_one())
    answers = {}
    for runtime in ("onnx", "torch"):
        with TestClient(create_app(model, runtime=runtime)) as client:
            response = client.post("/predict?top_k=3", files={"file": ("one.png", picture, "image/png")})
            assert response.status_code == 200
            answers[runtime] = response.json()
    assert answers["onnx"]["label"] == answers["torch"]["label"]
    assert abs(answers["onnx"]["confidence"] - answers["torch"]["confidence"]) < 1e-4
