"""``mlstack up|down|status``: the native stack's command line (used by make stack/stack-down/stack-status)."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from mlstack import settings as s
from mlstack.native.stack import Stack, StackError


def _stack(args: argparse.Namespace) -> Stack:
    return Stack(Path(args.state_dir), Path(args.env_file) if args.env_file else None)


def cmd_up(args: argparse.Namespace) -> int:
    stack = _stack(args)
    started = time.monotonic()
    env = stack.up()
    uri = env["MLFLOW_PUBLIC_URL"]
    print(f"Stack is up in {time.monotonic() - started:.1f}s (state in {stack.state_dir})")
    print(f"  Tracking URI : {uri}")
    print(f"  MLflow UI    : {uri}/  (log in as {env['MLFLOW_ADMIN_USER']} or {env['MLFLOW_TRAINER_USER']})")
    secrets_file = stack.state_dir / "secrets.env"
    where = f"{secrets_file}" if secrets_file.exists() else "your .env"
    print(f"  Passwords    : {where}")
    print(f"  Trainer env  : MLFLOW_TRACKING_URI={uri} MLFLOW_TRACKING_USERNAME={env['MLFLOW_TRAINER_USER']} "
          "MLFLOW_TRACKING_PASSWORD=<MLFLOW_TRAINER_PASSWORD>"
          + (f" MLFLOW_TRACKING_SERVER_CERT_PATH={env['MLFLOW_TRACKING_SERVER_CERT_PATH']}"
             if env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") else ""))
    if uri.startswith("https:"):
        tls = stack.tls_material(env)
        print(f"  Servers      : {stack.servers(env)} MLflow server instance(s) behind HAProxy (TLS)")
        print(f"  Certificate  : {tls.certificate}{' (self-signed)' if tls.self_signed else ''}")
        print(f"  SHA-256      : {tls.fingerprint}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    def progress(service: str, seconds: float | None) -> None:
        # A line as each stop begins, so the wait for a slow one is visibly that service's.
        if seconds is None:
            print(f"stopping {service} ...", end="", flush=True)
        else:
            print(f" stopped in {seconds:.1f}s", flush=True)

    started = time.monotonic()
    stopped = _stack(args).down(progress=progress)
    print(f"stopped {', '.join(stopped)} in {time.monotonic() - started:.1f}s" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = _stack(args)
    status = stack.status()
    print(f"{'service':<10} {'state':<9} {'pid':<8} address")
    for name, info in status.items():
        state = "running" if info["running"] else "stopped"
        print(f"{name:<10} {state:<9} {str(info['pid'] or '-'):<8} {info['address'] or '-'}")
    uri = stack.tracking_uri()
    if uri and status["mlflow"]["running"]:
        print(f"Tracking URI: {uri}    UI: {uri}/")
    return 0 if all(i["running"] for i in status.values()) else 3


def client_exports(env: dict[str, str], keep: dict[str, str] | None = None) -> list[str]:
    """``export`` lines pointing a client at this stack as the trainer account.

    With ``keep`` (the caller's environment), a variable set there is left out: what the user
    exported wins, so `make train` neither swaps a teammate's server for this one nor "fixes" a
    wrong password with the trainer's.
    """
    values = {
        "MLFLOW_TRACKING_URI": env["MLFLOW_PUBLIC_URL"],
        "MLFLOW_TRACKING_USERNAME": env["MLFLOW_TRAINER_USER"],
        "MLFLOW_TRACKING_PASSWORD": env["MLFLOW_TRAINER_PASSWORD"],
    }
    if env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        # The balancer's self-signed certificate: the MLflow client (and the trainer, which sends
        # through it) verifies the server against this file.
        values["MLFLOW_TRACKING_SERVER_CERT_PATH"] = env["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    return [f"export {name}={shlex.quote(value)}" for name, value in values.items()
            if keep is None or not keep.get(name)]


def cmd_env(args: argparse.Namespace) -> int:
    """Print the client variables for a trainer, for `eval $(mlstack env)` and the Makefile."""
    env = _stack(args).environment()
    for line in client_exports(env, dict(os.environ) if args.keep_set else None):
        print(line)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    """A person's account on the running native stack, through the users-init entrypoint compose runs too."""
    stack = _stack(args)
    if not stack.status()["mlflow"]["running"]:
        raise StackError(f"the MLflow server of {stack.state_dir} is not running: start it with `make stack`")
    env = stack.environment()
    cmd = stack.command("users-init") + ["--add", args.name]
    cmd += ["--reset-password"] if args.reset_password else []
    cmd += ["--password-stdin"] if args.password_stdin else []
    # Not through the job log: the password is printed once, to the terminal, and kept nowhere.
    code = subprocess.run(cmd, env=s.service_environment("users-init", env, env)).returncode
    if code == 0 and env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        # Behind the balancer's self-signed certificate, the teammate needs it too.
        print(f"  export MLFLOW_TRACKING_SERVER_CERT_PATH=<a copy of {env['MLFLOW_TRACKING_SERVER_CERT_PATH']}>  "
              f"(SHA-256 {stack.tls_material(env).fingerprint})")
    return code


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Back up, migrate both databases to the installed MLflow and start it (mlstack.native.upgrade)."""
    from mlstack.native.upgrade import upgrade

    started = time.monotonic()
    report = upgrade(_stack(args), Path(args.into))
    print(f"upgraded to MLflow {version('mlflow')} in {time.monotonic() - started:.1f}s; "
          f"the backup taken before migrating: {report.backup}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlstack", description="Run the MLflow tracking stack without Docker.")
    parser.add_argument("--state-dir", default=os.environ.get("STACK_STATE_DIR", ".stack"),
                        help="directory holding all state (default: $STACK_STATE_DIR or .stack)")
    parser.add_argument("--env-file", default=".env" if Path(".env").exists() else None,
                        help="file of NAME=value settings (default: .env when present)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in [
        ("up", cmd_up, "start PostgreSQL, the S3 server and MLflow (no-op for what already runs)"),
        ("down", cmd_down, "stop every process the stack started, children included"),
        ("status", cmd_status, "show what runs where; exit 3 when something is down"),
        ("env", cmd_env, "print MLFLOW_TRACKING_* exports for the trainer account"),
    ]:
        sub.add_parser(name, help=help_text).set_defaults(func=func)
    sub.choices["env"].add_argument("--keep-set", action="store_true",
                                    help="leave out the variables already set in this environment")
    user = sub.add_parser("user", help="create a person's MLflow account (admin credentials; prints the password once)")
    user.add_argument("name", help="the username")
    user.add_argument("--reset-password", action="store_true", help="give an existing account a new password")
    user.add_argument("--password-stdin", action="store_true", help="read the password from stdin, don't generate one")
    user.set_defaults(func=cmd_user)
    upgrade = sub.add_parser("upgrade", help="move the stack's data to the MLflow now installed: check, stop the "
                             "server, back up, migrate both databases, start it")
    upgrade.add_argument("--into", default="backups", help="directory the backup is made in (default: backups)")
    upgrade.set_defaults(func=cmd_upgrade)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (StackError, RuntimeError) as exc:
        print(f"mlstack {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
