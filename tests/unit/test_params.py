import hashlib

import pytest
from mltrainer.params import REDACTED, flatten, is_secret_key, redact, redact_tree, shorten_key, truncate_values


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


@pytest.mark.parametrize(
    "key",
    ["hub_token", "HF_TOKEN", "training.hub_token", "password", "db.passwd", "aws_secret_access_key",
     "apiKey", "api-key", "API_KEY", "access_key", "private_key", "credentials", "auth", "Authorization",
     "use_auth_token", "MLFLOW_TRACKING_PASSWORD"],
)  # fmt: skip
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["tokenizer", "model.tokenizer", "max_tokens", "pad_token_id", "eos_token", "author", "tags.author",
     "hub_private_repo", "auth_type", "learning_rate", "key", "keyboard"],
)  # fmt: skip
def test_non_secret_keys(key):
    assert not is_secret_key(key)


def test_redact_by_key_and_value():
    flat = {
        "training.hub_token": "abc",
        "unset_token": "None",
        "note": "use hf_" + "a" * 34,
        "aws": "AKIAABCDEFGHIJKLMNOP",
        "openai": "sk-" + "x" * 40,
        "tracking.uri": "https://bob:s3cr3t@mlflow.example.com/path",
        "plain": "hello",
        "short": "hf_x",
    }
    assert redact(flat) == {
        "training.hub_token": REDACTED,
        "unset_token": "None",
        "note": REDACTED,
        "aws": REDACTED,
        "openai": REDACTED,
        "tracking.uri": f"https://bob:{REDACTED}@mlflow.example.com/path",
        "plain": "hello",
        "short": "hf_x",
    }
    assert flat["training.hub_token"] == "abc"  # input untouched


def test_redact_tree():
    tree = {
        "training": {"hub_token": "abc", "learning_rate": 3e-5, "list": ["ok", "hf_" + "b" * 34]},
        "auth": {"user": "u", "pass": "p"},
        "model": {"tokenizer": "bert"},
    }
    assert redact_tree(tree) == {
        "training": {"hub_token": REDACTED, "learning_rate": 3e-5, "list": ["ok", REDACTED]},
        "auth": REDACTED,
        "model": {"tokenizer": "bert"},
    }


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
