"""Start and stop long-running processes so that stopping leaves nothing behind.

Each service starts in a session of its own, so its whole process group can be signalled; the
recorded start time tells a live process from a recycled pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil


@dataclass
class Handle:
    pid: int
    create_time: float

    def to_dict(self) -> dict:
        return {"pid": self.pid, "create_time": self.create_time}

    @classmethod
    def from_dict(cls, d: dict) -> "Handle":
        return cls(int(d["pid"]), float(d["create_time"]))

    def process(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def spawn(cmd: list[str], *, env: dict[str, str], log_path: Path, preexec: Callable[[], None] | None = None,
          cwd: Path | None = None) -> Handle:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec, cwd=cwd,
        )
    return Handle(proc.pid, psutil.Process(proc.pid).create_time())


def stop_tree(handle: Handle, first_signal: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal the process, its group and every descendant; SIGKILL whatever outlives the timeout."""
    root = handle.process()
    if root is None:
        return
    procs = [root, *root.children(recursive=True)]
    try:
        os.killpg(root.pid, first_signal)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.send_signal(first_signal)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], *, what: str, timeout: float, handle: Handle | None = None,
               log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if handle is not None and not handle.alive():
            raise RuntimeError(f"{what} exited during start-up; see {log_path}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s; see {log_path}:\n{tail(log_path)}")
        time.sleep(0.3)


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
