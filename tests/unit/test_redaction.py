import copy
import io
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mltrainer.redaction import (
    MIN_KNOWN_SECRET_LENGTH, REDACTED, Scrubber, is_secret_key, secret_keys_in, secrets_in_environment,
    secrets_in_tree,
)

HF = "hf_" + "a" * 34


@pytest.mark.parametrize(
    "key",
    ["hub_token", "HF_TOKEN", "training.hub_token", "password", "db.passwd", "pwd", "db_pwd", "PWD",
     "passphrase", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "apiKey", "api-key", "API_KEY",
     "access_key", "private_key", "secret_key", "client_secret", "credentials", "auth", "Authorization",
     "use_auth_token", "MLFLOW_TRACKING_PASSWORD", "MY_SERVICE_PASSWORD", "hftoken", "dbpassword",
     "clientsecret", "WANDB_API_KEY", "service_password"],
)  # fmt: skip
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["tokenizer", "model.tokenizer", "max_tokens", "pad_token_id", "eos_token", "author", "tags.author",
     "hub_private_repo", "auth_type", "learning_rate", "key", "keyboard", "password_file", "token_path",
     "AWS_ACCESS_KEY_ID", "secret_name", "include_tokens_per_second", "auth_url", "tokens"],
)  # fmt: skip
def test_non_secret_keys(key):
    assert not is_secret_key(key)


def test_text_replaces_known_values_patterns_url_passwords_and_assignments_in_place():
    scrub = Scrubber(["my-service-pw"])
    assert scrub.text("bert-my-service-pw-x") == f"bert-{REDACTED}-x"
    assert scrub.text(f"run_{HF}_v2") == f"run_{REDACTED}_v2"  # joined by "_" still found
    assert scrub.text("AKIAABCDEFGHIJKLMNOP and sk-" + "x" * 40) == f"{REDACTED} and {REDACTED}"
    assert scrub.text("ghp_" + "b" * 36) == REDACTED
    assert scrub.text("https://bob:s3cr3t@host/p") == f"https://bob:{REDACTED}@host/p"
    assert scrub.text("pwd=abc,betas=0.9") == f"pwd={REDACTED},betas=0.9"
    assert scrub.text('{"api_key": "abc", "lr": 1}') == f'{{"api_key": "{REDACTED}", "lr": 1}}'
    assert scrub.text("eval_loss: 0.3, hf_x") == "eval_loss: 0.3, hf_x"  # nothing secret: unchanged
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----"
    assert scrub.text(f"key:\n{pem}\nrest") == f"key:\n{REDACTED}\nrest"
    assert scrub.text("-----BEGIN PRIVATE KEY-----\nMIIB cut off") == REDACTED  # no END line: to the end


def test_known_values_longest_first_url_encoded_and_short_ones_ignored():
    scrub = Scrubber(["abcdef", "abcdefgh", "p@ss/w0rd!", "short"])
    assert scrub.text("xabcdefghx") == f"x{REDACTED}x"  # not "x***REDACTED***ghx"
    assert scrub.text("https://h/?p=p%40ss%2Fw0rd%21") == f"https://h/?p={REDACTED}"
    assert len("short") < MIN_KNOWN_SECRET_LENGTH
    assert scrub.text("a short note") == "a short note"


def test_tree_redacts_secret_keys_whole_and_scrubs_every_string():
    tree = {
        "training": {"hub_token": "abc", "learning_rate": 3e-5, "list": ["ok", HF], "unset_token": None,
                     "fsdp_config": {"service_password": "x", "note": "with svc-secret-1"}},
        "auth": {"user": "u", "pass": "p"},
        "model": {"tokenizer": "bert"},
        "pair": ("a", HF),
        HF: "a key that is a token",
    }
    assert Scrubber(["svc-secret-1"]).tree(tree) == {
        "training": {"hub_token": REDACTED, "learning_rate": 3e-5, "list": ["ok", REDACTED], "unset_token": None,
                     "fsdp_config": {"service_password": REDACTED, "note": f"with {REDACTED}"}},
        "auth": REDACTED,
        "model": {"tokenizer": "bert"},
        "pair": ("a", REDACTED),
        REDACTED: "a key that is a token",
    }
    assert tree["training"]["hub_token"] == "abc"  # input untouched


def test_flat_judges_dotted_keys():
    flat = {"config.training.hub_token": "abc", "tags.pwd": "p", "plain": "hello", "note": f"use {HF}"}
    assert Scrubber().flat(flat) == {"config.training.hub_token": REDACTED, "tags.pwd": REDACTED,
                                     "plain": "hello", "note": f"use {REDACTED}"}


def test_secrets_in_tree_and_environment():
    tree = {"training": {"hub_token": "tok-123456", "optim_args": "pwd=optim-secret,b=1", "lr": 1e-4,
                         "fsdp_config": {"auth": {"user": "alice", "key": "k-999999"}}, "use_auth_token": True}}
    assert sorted(secrets_in_tree(tree)) == sorted(["tok-123456", "optim-secret", "alice", "k-999999"])
    env = {"HF_TOKEN": HF, "MY_SERVICE_PASSWORD": "svc-pw-1", "PWD": "/work/main", "OLDPWD": "/tmp",
           "HOME": "/root", "DATABASE_URL": "postgresql://u:db-pass-1@h/db", "TOKEN_FILE": "/run/secret"}
    assert sorted(secrets_in_environment(env)) == sorted([HF, "svc-pw-1", "db-pass-1"])


def test_for_run_scrubs_config_and_environment_values_anywhere():
    scrub = Scrubber.for_run({"training": {"hub_token": "cfg-token-1"}}, environ={"MY_SERVICE_PASSWORD": "svc-pw-1",
                                                                                "PWD": "/work/main"})
    assert scrub.text("/work/main/run-cfg-token-1-svc-pw-1") == f"/work/main/run-{REDACTED}-{REDACTED}"
    assert "svc-pw-1" not in repr(scrub) and "cfg-token-1" not in repr(scrub)


def test_secret_keys_in_names_paths():
    assert secret_keys_in({"hidden_size": 4, "extra": {"api_key": "k", "pwd": None}, "l": [{"token": "t"}]}) == [
        "extra.api_key", "l.0.token"]


def test_training_arguments_pickle_without_secrets_but_keep_them_live():
    import torch
    from mltrainer.secret_free_args import SecretFreeTrainingArguments
    from transformers import TrainingArguments

    scrub = Scrubber.for_run({"training": {"hub_token": HF}}, environ={"MY_SERVICE_PASSWORD": "svc-pw-123"})
    args = SecretFreeTrainingArguments.create(
        scrub, output_dir="/tmp/out", use_cpu=True, report_to="none", hub_token=HF, max_steps=7,
        fsdp_config={"service_password": "nested-pw-1", "note": "svc-pw-123"}, optim_args="pwd=optim-pw-1,b=1",
        activation_checkpointing_kwargs={"pwd": "kwargs-pw-1"})
    buffer = io.BytesIO()
    torch.save(args, buffer)
    data = buffer.getvalue()
    for secret in (HF, "nested-pw-1", "svc-pw-123", "optim-pw-1", "kwargs-pw-1"):
        assert secret.encode() not in data, secret
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    assert type(loaded) is TrainingArguments  # readable without mltrainer
    assert loaded.hub_token == REDACTED and loaded.optim_args == f"pwd={REDACTED},b=1"
    assert loaded.fsdp_config["service_password"] == REDACTED and loaded.fsdp_config["note"] == REDACTED
    assert loaded.activation_checkpointing_kwargs == {"pwd": REDACTED}
    assert loaded.max_steps == 7 and loaded.output_dir == "/tmp/out"
    # The live object and its copies keep the real values (pushing to the Hub needs the token).
    assert args.hub_token == HF and args.fsdp_config["service_password"] == "nested-pw-1"
    assert copy.deepcopy(args).hub_token == HF and copy.copy(args).hub_token == HF


TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def test_run_name_is_stored_without_secrets(monkeypatch):
    from mltrainer.config import load_config

    monkeypatch.setenv("MY_SERVICE_PASSWORD", "svc-pw-123")
    cfg = load_config(TINY, [f"experiment.run_name={{model}}-ghp_{'c' * 36}-svc-pw-123-{{timestamp}}"])
    name = cfg.run_name(datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert name == f"tiny-bert-{REDACTED}-{REDACTED}-20300102-030405"


def test_secret_in_model_config_overrides_is_refused():
    from mltrainer.config import load_config
    from mltrainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.config_overrides\.api_token: names a secret"):
        load_config(TINY, ["model.config_overrides.api_token=abc"])
    assert load_config(TINY, ["model.config_overrides.hidden_dropout_prob=0.2"]).model.config_overrides == {
        "hidden_dropout_prob": 0.2}
