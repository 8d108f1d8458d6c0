"""A request's JSON becomes its protobuf message once per request, and metric batches the fast way.

MLflow 3.17 turns a request's JSON into its protobuf message with protobuf's ``json_format``,
pure Python that visits every field of every metric. A ``log_batch`` is converted twice: once by
the auth check (``validate_can_log_batch`` reads each metric's ``model_id``) and once by the
handler. Measured in-process with a CPU-time profiler on the server's own app (bench/README.md),
those two conversions of a 100-point batch were the largest part of the server's CPU per request,
more than storing the points.

Both go through ``mlflow.server.handlers.parse_dict``, which this replaces with a version that:

* converts a ``LogBatch`` whose metrics, params and tags have exactly the usual shape (known keys,
  JSON strings, whole numbers for timestamp and step, finite numbers for values) by handing each
  entry to protobuf's C constructor; anything else, and anything that raises, goes to
  ``json_format`` as before, so every odd request is parsed and refused exactly as MLflow does;
* remembers, for the current Flask request, the message parsed from the request's JSON object,
  so the handler copies what the auth check parsed (or gets the same ``ParseError``).
"""

from __future__ import annotations

import math

from mlstack.patches.app_routes import asks_for
from mlstack.patches.self_check import Patch

# Entry keys the fast conversion accepts; any other key (camelCase spellings, model ids, dataset
# fields, keys protobuf would ignore) sends the whole request to json_format.
METRIC_KEYS = frozenset({"key", "value", "timestamp", "step"})
STRING_PAIR_KEYS = frozenset({"key", "value"})
BATCH_KEYS = frozenset({"run_id", "metrics", "params", "tags"})
INT64 = (-(2**63), 2**63 - 1)


def install_request_parsing() -> None:
    from mlflow.server import handlers

    if not getattr(handlers.parse_dict, "_parses_once", False):
        handlers.parse_dict = _make_parse_dict(handlers.parse_dict)


def check_request_parsing(app) -> str | None:
    """``_get_request_message`` still converts through the module's ``parse_dict``, which is ours,
    and the auth checks call that same function (else each batch is parsed twice again)."""
    from mlflow.server import auth, handlers

    ours = handlers.parse_dict
    if not getattr(ours, "_parses_once", False):
        return "mlflow.server.handlers.parse_dict is not the parse-once converter"
    if not asks_for(handlers._get_request_message, "parse_dict", ours):
        return "mlflow.server.handlers._get_request_message no longer converts with the module's parse_dict"
    if getattr(auth, "_get_request_message", None) is not handlers._get_request_message:
        return "mlflow.server.auth parses requests with a function other than handlers._get_request_message"
    return None


PATCH = Patch(
    name="request_parsing",
    without_it="each log_batch request's JSON is converted to protobuf twice by pure-Python json_format, "
               "visiting every field of every point (the largest part of the server's CPU per batch)",
    install=install_request_parsing,
    check=check_request_parsing,
)


def _make_parse_dict(json_format_parse):
    from google.protobuf.json_format import ParseError

    def parse_dict(js_dict, message):
        remembered = _remembered_for_this_request()
        name = message.DESCRIPTOR.full_name
        if remembered is not None and remembered.get("json") is js_dict and name in remembered["parsed"] \
                and message.ByteSize() == 0:
            parsed = remembered["parsed"][name]
            if isinstance(parsed, ParseError):
                raise ParseError(str(parsed))
            message.CopyFrom(parsed)
            return
        try:
            if not (name == "mlflow.LogBatch" and fast_log_batch(js_dict, message)):
                json_format_parse(js_dict, message)
        except ParseError as exc:
            _remember(remembered, js_dict, name, exc)
            raise
        parsed = type(message)()
        parsed.CopyFrom(message)
        _remember(remembered, js_dict, name, parsed)

    parse_dict._parses_once = True
    return parse_dict


def _remembered_for_this_request() -> dict | None:
    """The per-request memo on Flask's ``g`` (one app context per request), None outside a request."""
    from flask import g, has_request_context

    if not has_request_context():
        return None
    return g.setdefault("_mlstack_parsed_request", {"json": None, "parsed": {}})


def _remember(remembered: dict | None, js_dict, name: str, parsed) -> None:
    if remembered is None or not isinstance(js_dict, dict):
        return
    if remembered["json"] is not js_dict:  # another JSON object: forget what the last one gave
        remembered["json"], remembered["parsed"] = js_dict, {}
    remembered["parsed"][name] = parsed


def fast_log_batch(js_dict, message) -> bool:
    """Fill ``message`` (an empty LogBatch) from the usual shape of a batch and return True; return
    False, leaving it empty, for any other shape. The result equals json_format's (tests/unit)."""
    if type(js_dict) is not dict or not js_dict.keys() <= BATCH_KEYS:
        return False
    run_id = js_dict.get("run_id")
    metrics, params, tags = (js_dict.get(k, []) for k in ("metrics", "params", "tags"))
    if (run_id is not None and type(run_id) is not str) or not all(type(x) is list for x in (metrics, params, tags)):
        return False
    metric_entries = [_metric_fields(m) for m in metrics]
    pairs = [[_string_pair(p) for p in entries] for entries in (params, tags)]
    if None in metric_entries or None in pairs[0] or None in pairs[1]:
        return False
    try:
        if run_id is not None:
            message.run_id = run_id
        for fields in metric_entries:
            message.metrics.add(**fields)
        for fields in pairs[0]:
            message.params.add(**fields)
        for fields in pairs[1]:
            message.tags.add(**fields)
    except Exception:  # noqa: BLE001 - whatever protobuf refuses, json_format parses and reports
        message.Clear()
        return False
    return True


def _metric_fields(entry) -> dict | None:
    if type(entry) is not dict or not entry.keys() <= METRIC_KEYS:
        return None
    fields = dict(entry)
    if "key" in fields and type(fields["key"]) is not str:
        return None
    for name in ("timestamp", "step"):
        if name in fields and not (type(fields[name]) is int and INT64[0] <= fields[name] <= INT64[1]):
            return None
    if "value" in fields:
        value = fields["value"]
        if type(value) is int and abs(value) < 2**63:
            fields["value"] = float(value)
        elif not (type(value) is float and math.isfinite(value)):
            return None  # "NaN", "Infinity", NaN literals, huge ints: json_format's rules and messages
    return fields


def _string_pair(entry) -> dict | None:
    if type(entry) is not dict or not entry.keys() <= STRING_PAIR_KEYS:
        return None
    if any(type(v) is not str for v in entry.values()):
        return None
    return entry
