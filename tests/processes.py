"""Helpers for tests that run datm in subprocesses and kill them."""

from __future__ import annotations

import subprocess

import psutil  # a dependency of accelerate


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every process it started, as a crash or `kill -9` would. torchrun
    puts its workers in sessions of their own: killing the launcher's group leaves them running."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
