import hashlib

import pytest
from mltrainer.params import flatten, shorten_key, truncate_values


def test_flatten():
    d = {
        "a": {"b": 1, "c": {"d": None}},
        "lst": [1, "x", 2.5, None, True],
        "nested": [{"k": 1}, [1, 2]],
        "empty": {},
        "flag": False,
    }
    assert flatten(d) == {
        "a.b": "1",
        "a.c.d": "None",
        "lst": '[1, "x", 2.5, null, true]',
        "nested.0.k": "1",
        "nested.1": "[1, 2]",
        "empty": "{}",
        "flag": "False",
    }
    assert flatten({"x": {"y": 1}}, prefix="cfg", sep="/") == {"cfg/x/y": "1"}


def test_truncate_values_exact_length():
    flat = {"short": "x" * 6000, "long": "y" * 7000, "k" * 300: "v"}
    out, changed = truncate_values(flat)
    assert out["short"] == "x" * 6000
    assert len(out["long"]) == 6000 and out["long"].endswith("...[truncated]")
    assert out["long"] == "y" * (6000 - len("...[truncated]")) + "...[truncated]"
    long_key = shorten_key("k" * 300)
    assert len(long_key) == 250
    assert long_key.endswith("~" + hashlib.sha256(("k" * 300).encode()).hexdigest()[:8])
    assert out[long_key] == "v"
    assert changed == ["long", "k" * 300]


def test_truncate_custom_limits_and_bad_marker():
    out, changed = truncate_values({"a": "abcdefghij"}, limit=8, marker="..")
    assert out == {"a": "abcdef.."} and changed == ["a"]
    with pytest.raises(ValueError, match="must be shorter than limit"):
        truncate_values({"a": "b"}, limit=3, marker="...")


def test_shorten_key_is_deterministic_and_distinct():
    a, b = "p" * 260 + "a", "p" * 260 + "b"
    assert shorten_key(a) == shorten_key(a)
    assert shorten_key(a) != shorten_key(b)
    assert shorten_key("short") == "short"
