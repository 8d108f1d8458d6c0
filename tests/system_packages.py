"""Debian programs the tests drive for real (a browser, a load balancer, kubectl).

CI starts from a clean machine: a missing program is installed with apt-get when we are root
and apt-get exists, once per session; otherwise the test fails with the command to run. It never
skips: a skipped check guards nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

_installed_lock = threading.Lock()


class MissingProgram(RuntimeError):
    pass


def ensure_programs(programs: dict[str, str]) -> None:
    """Make each program (name -> the Debian package that has it) available on PATH."""
    with _installed_lock:
        missing = sorted({package for program, package in programs.items() if shutil.which(program) is None})
        if not missing:
            return
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise MissingProgram(f"install {' '.join(missing)} (apt-get install {' '.join(missing)}, as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"[tests] installing with apt-get: {' '.join(missing)}", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise MissingProgram(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        still_missing = [program for program in programs if shutil.which(program) is None]
        if still_missing:
            raise MissingProgram(f"apt-get installed {' '.join(missing)} but {' '.join(still_missing)} is not on PATH")
