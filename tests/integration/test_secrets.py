"""No secret given in the config or the environment reaches any stored byte of a run (real stack).

One training carries secrets in many places and under many names: ``training.hub_token``, a
secret-named key inside a TrainingArguments dict field, a ``pwd`` key, a ``key=value`` string,
the run name, a tag value, and environment variables (``HF_TOKEN``, ``MY_SERVICE_PASSWORD``,
the tracking password itself). It is interrupted (Ctrl-C) after its first checkpoints and
resumed on a fresh output folder to the end, with the final model logged and registered. Then everything the product stored is
read back behind the server's back and searched for every secret, in several encodings:
every object in the bucket (zip members such as ``training_args.bin``'s pickle unpacked too),
every row of every table in every database of the stack, the local output folders, and what
the MLflow API answers for the run, the logged model and the registered model.
"""

from __future__ import annotations

import base64
import io
import secrets
import signal
import string
import subprocess
import zipfile
from pathlib import Path

import psutil
import psycopg2
import pytest
import yaml

from trainer_support import (
    REPO, TINY, artifact_prefix, cli_command, metric_steps, run_cli, stored_checkpoints, trainer_client,
    trainer_env, unique_experiment, wait_for,
)

# Long enough that the first run is still training when the fixture sees its first stored
# checkpoint: the tiny model trains 24 steps in well under 2 s, and a run that ends first leaves
# nothing to interrupt. Saves every SAVE_STEPS: 6 of them.
STEPS = 96
SAVE_STEPS = 16
REDACTED = "***REDACTED***"


def _alnum(n: int) -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.fixture(scope="module")
def planted():
    """Fresh random secrets: none can be in the store unless this test's run put it there."""
    return {
        "hub_token": "hf_" + _alnum(34),                 # training.hub_token
        "nested": "nested-" + secrets.token_hex(12),     # training.fsdp_config.service_password
        "pwd": "pwd-" + secrets.token_hex(12),           # a key named just "pwd", in a kwargs dict and a tag
        "optim": "optim-" + secrets.token_hex(12),       # inside the optim_args string: "pwd=<it>,..."
        "run_token": "ghp_" + _alnum(36),                # a token-looking string in the run name
        "env_hf": "hf_" + _alnum(34),                    # HF_TOKEN in the environment
        "env_service": "svc-" + secrets.token_hex(12),   # MY_SERVICE_PASSWORD in the environment
    }


def secrets_config(root: Path, planted: dict[str, str], experiment: str) -> Path:
    cfg = yaml.safe_load((REPO / TINY).read_text())
    # The environment's secret appears literally in the run name and a tag value: only its being
    # known as a secret (by its variable's name) can keep it out.
    cfg["experiment"] = {
        "name": experiment,
        "run_name": f"{{model}}-{planted['run_token']}-{planted['env_service']}",
        "tags": {"pwd": planted["pwd"], "endpoint": f"db://svc@{planted['env_service']}/x",
                 "uses": f"token {planted['env_hf']} for the hub"},
    }
    cfg["training"].update(
        max_steps=STEPS,
        save_steps=SAVE_STEPS,
        eval_steps=SAVE_STEPS,
        hub_token=planted["hub_token"],
        # Dict fields TrainingArguments keeps (and pickles) even when the feature is off.
        fsdp_config={"service_password": planted["nested"], "note": planted["env_service"]},
        activation_checkpointing_kwargs={"pwd": planted["pwd"]},
        optim_args=f"pwd={planted['optim']},betas=0.9",
    )
    cfg["checkpoints"] = {"upload": "every_save", "save_last_k": 3}
    cfg["registered_model"] = {"name": f"{experiment}-model"}
    cfg["log_final_model"] = True
    path = root / "secrets.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def encodings(secret: str) -> dict[str, bytes]:
    """The forms a string takes in files and database rows: text, UTF-16, hex (bytea), base64."""
    raw = secret.encode()
    forms = {"utf-8": raw, "utf-16-le": secret.encode("utf-16-le"), "utf-16-be": secret.encode("utf-16-be"),
             "hex": raw.hex().encode()}
    for shift in range(3):  # base64 of a substring depends on its alignment: each of the three, whole groups only
        chunk = raw[shift:]
        chunk = chunk[: len(chunk) - len(chunk) % 3]
        forms[f"base64+{shift}"] = base64.b64encode(chunk)
    return forms


def find_secrets(data: bytes, wanted: dict[str, str]) -> list[str]:
    found = []
    for name, secret in wanted.items():
        found += [f"{name} ({form})" for form, pattern in encodings(secret).items() if pattern in data]
    if data[:4] == b"PK\x03\x04":  # torch.save writes a zip: search the members' unpacked bytes too
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                found += [f"{hit} in {member}" for hit in find_secrets(archive.read(member), wanted)]
    return found


def database_rows(stack) -> bytes:
    """Every row of every table of every database on the stack's PostgreSQL, as text."""
    env = stack.env
    connect = dict(host="127.0.0.1", port=int(env["DB_PORT"]), user=env["POSTGRES_USER"],
                   password=env["POSTGRES_PASSWORD"])
    with psycopg2.connect(dbname=env["POSTGRES_DB"], **connect) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")
        databases = [row[0] for row in cur.fetchall()]
    out = io.StringIO()
    for database in databases:
        conn = psycopg2.connect(dbname=database, **connect)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT table_schema, table_name FROM information_schema.tables "
                            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')")
                for schema, table in cur.fetchall():
                    cur.execute(f'SELECT t::text FROM "{schema}"."{table}" t')
                    out.writelines(f"{database}.{table}: {row[0]}\n" for row in cur.fetchall())
        finally:
            conn.close()
    return out.getvalue().encode()


def interrupt(proc) -> None:
    """Ctrl-C: the trainer marks its run KILLED and lets go of it, so a resume may start at once.
    A trainer stopped by the fixture (SIGSTOP) gets the Ctrl-C as it continues."""
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained(native_stack, planted, tmp_path_factory):
    """Train with secrets, interrupt after a stored checkpoint, resume on a fresh output root to the end."""
    root = tmp_path_factory.mktemp("secrets")
    experiment = unique_experiment("secrets")
    config = secrets_config(root, planted, experiment)
    env = trainer_env(native_stack, HF_TOKEN=planted["env_hf"], MY_SERVICE_PASSWORD=planted["env_service"])
    machine_a, machine_b = root / "machine-a", root / "machine-b"
    log = root / "first.log"
    with trainer_client(native_stack) as client, open(log, "w") as out:
        first = subprocess.Popen(cli_command("--config", str(config), "--set", f"output_root={machine_a}"),
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            # The trainer's own log says when a checkpoint is stored: reading a local file keeps up
            # with a run of a few seconds, where a loaded CI host's S3 listing did not (the run
            # ended first, twice). The trainer is then stopped while the store is checked.
            wait_for(lambda: "stored checkpoint checkpoints/step-" in log.read_text() or first.poll() is not None,
                     timeout=240, what="a checkpoint stored")
            assert first.poll() is None, log.read_text()[-4000:]
            first.send_signal(signal.SIGSTOP)
            run_id = log.read_text().split(" trains in ")[0].rsplit("run ", 1)[1].split()[0]
            prefix = artifact_prefix(client, run_id)
            assert stored_checkpoints(native_stack, prefix)
        finally:
            if first.poll() is None:
                interrupt(first)
        assert first.returncode not in (0, -signal.SIGKILL), log.read_text()[-4000:]
        assert client.get_run(run_id).info.status == "KILLED"
        assert max(m["step"] for m in stored_checkpoints(native_stack, prefix).values()) < STEPS

        resumed = run_cli(native_stack, "--config", str(config), "--set", f"output_root={machine_b}",
                          "--resume", run_id, env=env, timeout=400)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
        yield {"client": client, "run_id": run_id, "prefix": prefix, "resumed": resumed,
               "local": [machine_a, machine_b], "model_name": f"{experiment}-model", "env": env}


def all_secrets(planted, stack) -> dict[str, str]:
    return {**planted, "tracking_password": stack.trainer_auth[1]}


def test_resume_from_a_stored_checkpoint_continues(trained):
    client, run_id = trained["client"], trained["run_id"]
    out = trained["resumed"].stdout + trained["resumed"].stderr
    assert "Downloading checkpoints/step-" in out
    assert f"finished at step {STEPS}" in trained["resumed"].stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [s for s, _ in metric_steps(client, run_id, "loss")]
    assert steps == list(range(2, STEPS + 1, 2))  # continued to the end, each step once


def test_no_secret_in_any_object_of_the_bucket(native_stack, planted, trained):
    wanted = all_secrets(planted, native_stack)
    s3, keys = native_stack.s3_root(), native_stack.bucket_keys()
    # The bucket holds this run's checkpoints, config and plots, and the logged model's files.
    stored = stored_checkpoints(native_stack, trained["prefix"])
    assert {trained["prefix"] + f["stored_at"] for m in stored.values() for f in m["files"]
            if f["path"] == "training_args.bin"} <= set(keys)
    assert any(k.endswith("/MLmodel") for k in keys)
    leaks = {}
    for key in keys:
        if hits := find_secrets(s3.get_object(Bucket=native_stack.bucket, Key=key)["Body"].read(), wanted):
            leaks[key] = hits
    assert not leaks, leaks


def test_stored_training_args_hold_no_secret_and_load(native_stack, planted, trained):
    """The pickled TrainingArguments still unpickle, as plain TrainingArguments, with secrets replaced."""
    import torch
    from transformers import TrainingArguments

    checkpoints = stored_checkpoints(native_stack, trained["prefix"])
    manifest = checkpoints[max(checkpoints)]
    entry = next(f for f in manifest["files"] if f["path"] == "training_args.bin")
    key = trained["prefix"] + entry["stored_at"]
    data = native_stack.s3_root().get_object(Bucket=native_stack.bucket, Key=key)["Body"].read()
    args = torch.load(io.BytesIO(data), weights_only=False)
    assert type(args) is TrainingArguments
    assert args.hub_token == REDACTED
    assert args.fsdp_config["service_password"] == REDACTED
    assert args.activation_checkpointing_kwargs == {"pwd": REDACTED}
    assert args.optim_args == f"pwd={REDACTED},betas=0.9"
    assert args.max_steps == STEPS and args.learning_rate == pytest.approx(5e-4)  # the rest is intact


def test_no_secret_in_any_database_row(native_stack, planted, trained):
    rows = database_rows(native_stack)
    assert trained["run_id"].encode() in rows  # the dump does hold the run
    assert not find_secrets(rows, all_secrets(planted, native_stack))


def test_no_secret_in_what_the_api_answers(native_stack, planted, trained):
    client, run_id = trained["client"], trained["run_id"]
    run = client.get_run(run_id)
    answered = [run.info.run_name, *run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
    for model in client.search_logged_models([run.info.experiment_id]):
        answered += [model.name, model.source_run_id, *model.params.items(), *model.tags.items()]
    for version in client.search_model_versions(f"name = '{trained['model_name']}'"):
        answered += [version.source, version.description or "", *version.tags.items()]
    text = repr(answered).encode()
    assert not find_secrets(text, all_secrets(planted, native_stack))
    # Redacted where they were, and the run keeps a readable name.
    assert run.info.run_name == f"tiny-bert-{REDACTED}-{REDACTED}"
    assert run.data.tags["mlflow.runName"] == run.info.run_name
    assert run.data.tags["pwd"] == REDACTED
    assert run.data.tags["endpoint"] == f"db://svc@{REDACTED}/x"
    assert run.data.params["config.training.fsdp_config.service_password"] == REDACTED


def test_no_secret_in_local_output_files(planted, native_stack, trained):
    """The checkpoints on the training machines (which resume reads) hold none either."""
    wanted = all_secrets(planted, native_stack)
    files = [p for root in trained["local"] for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)
    leaks = {str(p): hits for p in files if (hits := find_secrets(p.read_bytes(), wanted))}
    assert not leaks, leaks


# -- runs that are not trainings: a sweep's parent and a cross-validation's parent ----------------

FAST = ["training.max_steps=2", "training.save_steps=2", "training.eval_steps=2", "training.logging_steps=1",
        "data.max_train_samples=32", "data.max_eval_samples=16", "log_final_model=false"]


def test_sweep_and_cross_validation_parents_store_no_secret(native_stack, tmp_path):
    """Their runs are created outside a training: name, tags, params and the sweep file stored with them."""
    planted = {"hub_token": "hf_" + _alnum(34), "pwd": "pwd-" + secrets.token_hex(12),
               "sweep_token": "ghp_" + _alnum(36), "env_service": "svc-" + secrets.token_hex(12)}
    env = trainer_env(native_stack, MY_SERVICE_PASSWORD=planted["env_service"], RAY_USAGE_STATS_ENABLED="0")
    experiment = unique_experiment("secrets-side")
    secret_sets = [f"training.hub_token={planted['hub_token']}", f"experiment.tags.pwd={planted['pwd']}",
                   f"experiment.tags.endpoint=db://svc@{planted['env_service']}/x", f"experiment.name={experiment}",
                   f"output_root={tmp_path / 'out'}"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": f"lr-{planted['sweep_token']}", "base": str(REPO / TINY), "overrides": [*FAST, *secret_sets],
        "search": {"space": {"training.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
                   "trials": 1, "metric": "eval_loss", "direction": "minimize"},
    }, sort_keys=False))
    done = run_cli(native_stack, "sweep", "--config", str(sweep), env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    cv_args = ["cv", "--config", str(REPO / TINY), "--folds", "2", "--metric", "eval_loss"]
    for override in [*FAST, *secret_sets]:
        cv_args += ["--set", override]
    done = run_cli(native_stack, *cv_args, env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    with trainer_client(native_stack) as client:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(runs) == 1 + 1 + 2 + 1 and len(parents) == 2  # sweep + trial, cv + 2 folds
        for run in runs:
            assert run.data.tags["pwd"] == REDACTED, run.info.run_name
            assert run.data.tags["endpoint"] == f"db://svc@{REDACTED}/x", run.info.run_name
        stored = {key: native_stack.s3_root().get_object(Bucket=native_stack.bucket, Key=key)["Body"].read()
                  for run in parents for key in native_stack.bucket_keys(artifact_prefix(client, run.info.run_id))}
    assert any(key.endswith("sweep/sweep.yaml") for key in stored)
    leaks = {key: hits for key, data in stored.items() if (hits := find_secrets(data, planted))}
    assert not leaks, leaks
    assert not find_secrets(database_rows(native_stack), planted)
