"""mlstack.patches.request_parsing: a log_batch's JSON becomes the same protobuf message as
json_format makes (or the same refusal), and a request is converted once however many times
MLflow asks, checked with MLflow's own ``_get_request_message`` in a real Flask request."""

from __future__ import annotations

import math
import random

import pytest
from flask import Flask
from google.protobuf.json_format import ParseDict
from mlflow.protos.service_pb2 import LogBatch, LogMetric
from mlflow.server import handlers

from mlstack.patches import request_parsing
from mlstack.patches.request_parsing import check_request_parsing, fast_log_batch


def json_format(js) -> tuple[str, bytes | str]:
    message = LogBatch()
    try:
        ParseDict(js, message, ignore_unknown_fields=True)
    except Exception as exc:  # noqa: BLE001 - ParseError, and OverflowError for a 400-digit number
        return type(exc).__name__, str(exc)
    return "parsed", message.SerializeToString()


def ours(js) -> tuple[str, bytes | str]:
    """The patch's converter on its own: the fast path, else json_format as the patch calls it."""
    parse = request_parsing._make_parse_dict(lambda d, m: ParseDict(d, m, ignore_unknown_fields=True))
    message = LogBatch()
    try:
        parse(js, message)
    except Exception as exc:  # noqa: BLE001 - whatever json_format raises, ours must too
        return type(exc).__name__, str(exc)
    return "parsed", message.SerializeToString()


USUAL = {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1700000000000, "step": 3},
                                      {"key": "acc", "value": 1, "timestamp": 0, "step": 0}],
         "params": [{"key": "lr", "value": "0.1"}], "tags": [{"key": "t", "value": ""}]}

ODD = [
    {"run_id": "abc", "metrics": [{"key": "loss", "value": "NaN", "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": "Infinity", "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": math.nan, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": math.inf, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": "17", "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1.0, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1, "step": True}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 2**63, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 10**400, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": None, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": 7, "value": 0.5, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1, "step": 1, "modelId": "m-1"}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1, "step": 1, "model_id": "m-1"}]},
    {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1, "step": 1, "unknown": [1]}]},
    {"run_id": "abc", "metrics": [{"key": "lo\ud800ss", "value": 0.5, "timestamp": 1, "step": 1}]},
    {"run_id": "abc", "metrics": {"key": "loss"}},
    {"run_id": "abc", "metrics": ["loss"]},
    {"runId": "abc", "metrics": []},
    {"run_id": None, "metrics": []},
    {"run_id": 12, "metrics": []},
    {"run_id": "abc", "params": [{"key": "lr", "value": 0.1}]},
    {"run_id": "abc", "tags": [{"key": "t"}]},
    {"run_id": "abc", "extra": 1},
    {},
]


@pytest.mark.parametrize("js", [USUAL, *ODD], ids=lambda js: repr(js)[:70])
def test_every_shape_gives_json_formats_message_or_its_refusal(js):
    assert ours(js) == json_format(js)


def test_the_usual_shape_takes_the_fast_path_and_odd_ones_do_not():
    assert fast_log_batch(USUAL, LogBatch())
    for js in ODD:
        message = LogBatch()
        if not fast_log_batch(js, message):
            assert message.ByteSize() == 0, js  # nothing half-filled is left for json_format


def test_random_batches_match_json_format():
    rng = random.Random(18)
    values = [0.0, -0.0, 1e-300, 1e308, -2.5, 3, -(2**53), 2**62, 1.5e10, "NaN", "-Infinity", "1.5", None, True]
    ints = [0, 1, -1, 2**62, -(2**63), 2**63 - 1, 2**63, "5", 1.0, None, False]
    for _ in range(300):
        metric = {"key": rng.choice(["loss", "eval/acc", "", "x" * 300, 5]), "value": rng.choice(values),
                  "timestamp": rng.choice(ints), "step": rng.choice(ints)}
        for field in ("value", "timestamp", "step"):
            if rng.random() < 0.1:
                del metric[field]
        js = {"run_id": rng.choice(["r1", "", None]), "metrics": [metric] * rng.randint(0, 3)}
        if js["run_id"] is None:
            del js["run_id"]
        assert ours(js) == json_format(js), js


@pytest.fixture
def patched(monkeypatch):
    """handlers.parse_dict replaced the way the server installs it, counting json_format's calls."""
    calls = []
    real = handlers.parse_dict

    def counting(js, message):
        calls.append(message.DESCRIPTOR.full_name)
        return real(js, message)

    monkeypatch.setattr(handlers, "parse_dict", counting)
    request_parsing.install_request_parsing()
    return calls


def in_request(body, *requests):
    app = Flask(__name__)
    with app.test_request_context("/api/2.0/mlflow/runs/log-batch", method="POST", json=body):
        return [handlers._get_request_message(message) for message in requests]


def test_a_request_is_converted_once_for_the_auth_check_and_the_handler(patched):
    odd = {"run_id": "abc", "metrics": [{"key": "loss", "value": 0.5, "timestamp": 1, "step": 1, "modelId": "m-1"}]}
    first, second = in_request(odd, LogBatch(), LogBatch())
    assert patched == ["mlflow.LogBatch"]  # json_format ran once, for the auth check
    assert first == second and second.metrics[0].model_id == "m-1"
    assert first is not second


def test_each_request_and_each_message_type_is_converted_on_its_own(patched):
    body = {"run_id": "abc", "key": "loss", "value": 0.5, "timestamp": 1, "step": 1, "metrics": [{"modelId": "x"}]}
    in_request(body, LogBatch(), LogMetric(), LogMetric())
    in_request(body, LogBatch())
    assert patched == ["mlflow.LogBatch", "mlflow.LogMetric", "mlflow.LogBatch"]


def test_a_refused_conversion_is_refused_again_the_same_way(patched):
    body = {"run_id": 5, "metrics": [{"key": "loss", "value": "lots", "timestamp": 1, "step": 1}]}
    app = Flask(__name__)
    with app.test_request_context("/x", method="POST", json=body):
        errors = []
        for _ in range(2):
            with pytest.raises(Exception) as raised:
                handlers._get_request_message(LogBatch(), schema={"run_id": [handlers._assert_string]})
            errors.append(str(raised.value))
    assert patched == ["mlflow.LogBatch"]
    assert errors[0] == errors[1] and "run_id" in errors[0]


def test_the_check_fails_when_the_converter_is_not_ours(monkeypatch):
    monkeypatch.setattr(handlers, "parse_dict", request_parsing._make_parse_dict(handlers.parse_dict))
    assert check_request_parsing(None) is None
    monkeypatch.setattr(handlers, "parse_dict", lambda js, message: None)
    assert "is not the parse-once converter" in check_request_parsing(None)
