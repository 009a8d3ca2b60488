"""The HTTP API under attack, in-process (no socket is opened): schemathesis against the app's own
OpenAPI schema, the hostile image corpus in every accepted encoding, size limits, and paths.

Skips cleanly when the serve extra (FastAPI) or schemathesis is not installed.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("cnnlab.serve.app")
schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance, response_schema_conformance  # noqa: E402

from cnnlab.checkpoint import save_model  # noqa: E402
from cnnlab.layers import build_model, parse_layers  # noqa: E402
from cnnlab.serve.app import create_app  # noqa: E402
from tests.support.helpers import TINY_SPEC  # noqa: E402
from tests.support.hostile_images import MARKER_NAME, expected_outcome, write_corpus  # noqa: E402

UPLOAD_LIMIT = 1 << 20


META = {"layers": TINY_SPEC, "input_shape": [1, 28, 28], "classes": ["zero", "one", "two"], "dataset": "synthetic",
        "preprocessing": {"kind": "digit", "channels": 1, "size": [28, 28], "mean": [0.13], "std": [0.31]},
        "epoch": 1, "metrics": {}, "config": {}, "versions": {"cnnlab": "test"}}


def tiny_model() -> torch.nn.Module:
    """A random-weight digit model (1x28x28, 3 classes): serving does not care whether it is any good."""
    torch.manual_seed(0)
    return build_model(parse_layers(TINY_SPEC), (1, 28, 28), 3)


# Built at import: schemathesis' pytest integration parametrizes from a schema object.
APP = create_app((tiny_model(), META), max_upload_bytes=UPLOAD_LIMIT, max_batch=40)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("served")
    save_model(run_dir / "model.safetensors", tiny_model(), META)
    return run_dir


@pytest.fixture(scope="module")
def app():
    return APP


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "images"
    return folder, write_corpus(folder)


# --- schemathesis: generated requests from the OpenAPI schema -----------------------------------

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.mark.slow  # a schemathesis fuzz campaign
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_fuzzed_no_server_errors(case):
    """Generated requests, valid and invalid: never a 5xx, only documented status codes and content types.

    `positive_data_acceptance` is left out: to the schema any bytes are a valid image, but a 1x1
    PNG or random bytes are rightly refused with a 4xx."""
    case.call_and_validate(excluded_checks=[response_schema_conformance, positive_data_acceptance])


@pytest.mark.slow  # a schemathesis fuzz campaign
@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_fuzzed_responses_match_the_schema(case):
    """Every response body also matches the schema (error bodies too: one `detail` line)."""
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


# --- the hostile corpus through every way of sending an image ----------------------------------

def _one_line_detail(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    return detail


@pytest.mark.parametrize("encoding", ["multipart", "raw", "json"])
def test_hostile_images(client, corpus, encoding):
    folder, expectations = corpus
    statuses = {}
    for name, expectation in expectations.items():
        expectation = expected_outcome(expectation, "digit")
        data = (folder / name).read_bytes()
        if encoding == "multipart":
            response = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
        elif encoding == "raw":
            response = client.post("/predict", content=data, headers={"content-type": "image/png"})
        else:
            response = client.post("/predict", json={"image": base64.b64encode(data).decode()})
        statuses[name] = response.status_code
        assert response.status_code in (200, 413, 415, 422), (name, response.status_code, response.text)
        if response.status_code == 200:
            assert response.json()["label"] in ("zero", "one", "two")
        else:
            _one_line_detail(response)
        if expectations[name] == "blank":
            assert response.status_code == 422 and _one_line_detail(response).startswith("no digit found"), name
        if expectation == "ok":
            assert response.status_code == 200, (name, response.text)
        elif expectation == "reject" and data:  # an empty raw/JSON body is a malformed request: also a 4xx
            assert response.status_code != 200, name
    assert not (folder.parent / MARKER_NAME).exists()


def test_hostile_batch_gets_one_answer_per_file(client, corpus):
    folder, expectations = corpus
    files = [("files", (name, (folder / name).read_bytes(), "application/octet-stream")) for name in expectations]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(expectations)


def test_limits(client, app):
    too_big = b"\x89PNG" + b"\x00" * (UPLOAD_LIMIT + 1)
    response = client.post("/predict", content=too_big, headers={"content-type": "image/png"})
    assert response.status_code == 413
    _one_line_detail(response)
    response = client.post("/predict", files={"file": ("big.png", too_big, "image/png")})
    assert response.status_code == 413
    many = [("files", (f"{i}.png", b"x", "image/png")) for i in range(41)]
    assert client.post("/predict/batch", files=many).status_code == 413
    assert client.post("/predict", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/predict?top_k=-1", json={"image": ""}).status_code == 422


def test_no_endpoint_reads_or_writes_arbitrary_paths(client, app, model_dir):
    for path in app.openapi()["paths"]:  # no route takes a path or file name from the client
        assert "{" not in path, path
    assert create_app(model_dir).openapi()["paths"].keys() == app.openapi()["paths"].keys()
    for probe in ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                  "/static/..%2f..%2f..%2fetc%2fpasswd", f"/static/{model_dir}/model.safetensors",
                  "/../model.safetensors", "/model.safetensors", "/docs/../../etc/passwd"]:
        response = client.get(probe)
        assert response.status_code in (200, 400, 404, 405), (probe, response.status_code)
        assert b"root:" not in response.content and b"__metadata__" not in response.content, probe
    for body in ({"image": "data:image/png;base64,AAAA", "path": "/etc/passwd"}, {"images": ["/etc/passwd"]}):
        response = client.post("/predict", json=body)
        assert response.status_code in (413, 415, 422), (body, response.status_code)


def test_serve_binds_loopback_by_default():
    import argparse

    from cnnlab.commands.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["runs/x"]).host == "127.0.0.1"


def test_errors_are_json_with_one_line(client):
    for method, path in [("get", "/nope"), ("post", "/health"), ("delete", "/predict"), ("get", "/predict")]:
        response = getattr(client, method)(path)
        assert 400 <= response.status_code < 500
        assert json.loads(response.text)["detail"]
