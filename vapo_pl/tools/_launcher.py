"""Runs inside the sandbox's new namespaces (as their root), before the tool code: private mounts with a fresh tmpfs
over every world-writable directory, a working directory owned by the unprivileged user, resource limits, then the
user is dropped and the tool's Python takes over (code from stdin, or from the config for a long-lived worker).
Standard library only; argv[1] is JSON."""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def main() -> None:
    cfg = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit(f"sandbox: cannot make mounts private (errno {ctypes.get_errno()})")
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                                           b"size=%dm" % cfg["disk_mb"]) != 0:
            sys.exit(f"sandbox: cannot mount a tmpfs on {d} (errno {ctypes.get_errno()})")
    # home directories (the trainer's files, keys, caches) are hidden behind empty tmpfs; the interpreter's own
    # prefix, if it lives under one of them, is bound back read-only at the same path so that it still runs
    prefix = cfg["prefix"]
    hidden = [d for d in ("/root", "/home") if os.path.isdir(d)]
    keep = next((d for d in hidden if prefix.startswith(d + "/")), None)
    if keep:
        os.makedirs("/tmp/.prefix")
        _mount(libc, prefix, "/tmp/.prefix", None, MS_BIND | MS_REC)
    for d in hidden:
        _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    if keep:
        os.makedirs(prefix)
        _mount(libc, "/tmp/.prefix", prefix, None, MS_BIND | MS_REC)
        _mount(libc, "none", prefix, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    work = "/tmp/work"
    os.makedirs(work)
    uid, gid = cfg["uid"], cfg["gid"]
    os.chown(work, uid, gid)
    set_limits(cfg["memory_mb"], cfg["cpu_s"], cfg["disk_mb"], cfg["nproc"])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    os.chdir(work)
    # the tool's code from stdin, or (a long-lived worker) from cfg["code"], stdin then being its request channel
    args = ["-c", cfg["code"]] if cfg.get("code") else ["-"]
    os.execve(cfg["python"], [cfg["python"], "-I", *args], cfg["env"])


def set_limits(memory_mb: int, cpu_s: int, disk_mb: int, nproc: int | None) -> None:
    """The call's resource limits (``nproc`` None: not set, e.g. for root, which ignores it)."""
    limits = {resource.RLIMIT_AS: memory_mb * 2**20, resource.RLIMIT_CPU: cpu_s, resource.RLIMIT_FSIZE: disk_mb * 2**20,
              resource.RLIMIT_NOFILE: 64, resource.RLIMIT_CORE: 0}
    if nproc is not None:
        limits[resource.RLIMIT_NPROC] = nproc
    for what, value in limits.items():
        resource.setrlimit(what, (value, value))


def _mount(libc, source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda v: None if v is None else v.encode())
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        sys.exit(f"sandbox: cannot mount {source} on {target} (errno {ctypes.get_errno()})")


if __name__ == "__main__":
    main()
