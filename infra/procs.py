"""Background processes tracked by pid files under ``<state>/run``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def _pidfile(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) is not running.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


def running(run_dir: Path, name: str) -> int | None:
    """The pid of the live process ``name``, or None (a stale pid file is removed)."""
    path = _pidfile(run_dir, name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def tracked(run_dir: Path) -> dict[str, int]:
    if not run_dir.is_dir():
        return {}
    names = sorted(p.stem for p in run_dir.glob("*.pid"))
    return {n: pid for n in names if (pid := running(run_dir, n)) is not None}


def spawn(
    run_dir: Path, name: str, argv: list[str], *, log_path: Path,
    env: dict[str, str] | None = None, cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so ``stop`` can end its whole group)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=cwd,
        )
    _pidfile(run_dir, name).write_text(str(proc.pid))
    return proc


def stop(run_dir: Path, name: str, *, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the process group, SIGKILL after ``timeout_s``; the pid stopped or None."""
    pid = running(run_dir, name)
    if pid is None:
        return None
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if alive(pid):
        _signal_group(pid, signal.SIGKILL)
        while alive(pid):
            _reap(pid)
            time.sleep(0.05)
    _pidfile(run_dir, name).unlink(missing_ok=True)
    return pid


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
