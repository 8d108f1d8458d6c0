"""``mlstack upgrade``: move the native stack's data to the MLflow now installed (make stack-upgrade).

The new MLflow is installed first (the pin changed, ``make stack-upgrade`` stopped the stack and
re-installed .venv). Then, in this order:

1. check   refuse, with nothing changed (a server still running keeps serving), when a database
           was written by a newer MLflow or a server patch does not take hold (``mlstack.upgrade check``);
2. stop    the MLflow server, so nothing writes during the backup and the migration;
3. backup  both databases and the bucket (``mlstack.backup``, as ``make stack-backup``): MLflow's
           migrations are not transactional, and this backup is the way back;
4. migrate both databases (``mlstack.upgrade migrate``);
5. start   the server of the new version; its entrypoint checks both schemas again and its
           patches check themselves.

Steps 1 and 4 run as the compose image runs them (``python -m mlstack.upgrade``), with the
environment the server gets, so both stacks upgrade through the same code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlstack import settings as s
from mlstack.backup.create import create
from mlstack.backup.targets import BackupError, NativeTarget
from mlstack.native.stack import Stack, StackError


@dataclass
class UpgradeReport:
    backup: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per step, in order


def _run(stack: Stack, step: str, cmd: list[str], env: dict[str, str]) -> str:
    """Run one step, its output into the stack's upgrade log; a failure names the step and shows
    the end of that log (the refusal's reason)."""
    log = stack.logs / "upgrade.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"--- {step}: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        fh.flush()
        start = fh.tell()
        result = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    output = log.read_bytes()[start:].decode(errors="replace")
    if result.returncode != 0:
        # The step's own output (its refusal, then what it quotes), not the end of a log of earlier runs.
        shown = "\n".join(output.rstrip().splitlines()[-40:])
        raise StackError(f"upgrade stopped at '{step}' (exit {result.returncode}); {log} has it all:\n{shown}")
    return output


def upgrade(stack: Stack, backups: Path, say=print) -> UpgradeReport:
    report = UpgradeReport()

    def timed(step: str, began: float) -> None:
        report.seconds[step] = round(time.monotonic() - began, 2)
        say(f"{step}: done in {report.seconds[step]:.1f}s")

    began = time.monotonic()
    env = stack.up(services=("postgres", "s3"))
    server_env = s.service_environment("mlflow", env, env)
    upgrade_cmd = [sys.executable, "-m", "mlstack.upgrade"]
    say(_run(stack, "check", upgrade_cmd + ["check"], server_env).rstrip())
    timed("check", began)

    began = time.monotonic()
    stack.down(only={"mlflow"})
    timed("stop server", began)

    began = time.monotonic()
    try:
        report.backup = create(NativeTarget(stack.state_dir, stack.env_file), backups, say=say)
    except BackupError as exc:
        raise StackError(f"upgrade stopped at 'backup' with the server stopped and nothing migrated: {exc}. "
                         "Run `make stack-upgrade` again once that is fixed.") from None
    say(f"backup written to {report.backup}")
    timed("backup", began)

    began = time.monotonic()
    say(_run(stack, "migrate", upgrade_cmd + ["migrate"], server_env).rstrip())
    timed("migrate", began)

    began = time.monotonic()
    stack.up()
    timed("start server", began)
    return report

