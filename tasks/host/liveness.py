"""Which process a run belongs to, and whether that process is gone: how runs a crash left RUNNING are found.

A run records its host, pid and the pid's start time (so a reused pid is not taken for the run's process). Only runs
of this host can be judged; another host's runs are left to that host's cleanup.
"""

from __future__ import annotations

import os
import socket

from tasks.base.settings import HOME, OWNER


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), '' where unknown."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]  # fields after "(comm)" start at field 3


def identity() -> dict[str, str]:
    """This process: host, pid, pid start time."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), "started": start_time(os.getpid())}


def gone(host: str, pid: str | int, started: str = "") -> str | None:
    """Why the process `pid` on `host` no longer runs, or None if it may (another host: cannot tell)."""
    if host != socket.gethostname() or not str(pid).isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its process {pid} on {host} is gone"
    except PermissionError:
        pass  # exists, another user's
    if started and start_time(int(pid)) not in ("", started):
        return f"its process {pid} on {host} is gone (the pid now belongs to another process)"
    return None


def environ(pid: int) -> dict[str, str]:
    """The environment process `pid` started with ({} where unreadable: gone, or another user's)."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


# Set by flows/env.configure() in every enginewright process; what it starts (Prefect's temporary server) inherits
# it, so a helper process whose owner was killed can be recognised: orphans().
OWNER_ENV = OWNER


def owner_token() -> str:
    me = identity()
    return f"{me['host']}:{me['pid']}:{me['started']}"


def home_of(env: dict[str, str], pid: int) -> str:
    """The enginewright home a process was started for: its ENGINEWRIGHT_HOME (default .enginewright), a relative one
    taken from the process's working directory; '' where that cannot be read."""
    value = env.get(HOME, ".enginewright")
    if not os.path.isabs(value):
        try:
            value = os.path.join(os.readlink(f"/proc/{pid}/cwd"), value)
        except OSError:
            return ""
    return os.path.realpath(value)


def orphaned_helpers() -> list[dict]:
    """Processes of this user started by an enginewright process that is gone (OWNER_ENV in their environment names
    it): {"pid", "reason", "home", "environ", "cmdline"} each; which of them to stop is the caller's decision."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        env = environ(pid)
        owner = env.get(OWNER_ENV, "")
        if not owner:
            continue
        host, _, rest = owner.partition(":")
        owner_pid, _, started = rest.partition(":")
        reason = gone(host, owner_pid, started)
        if not reason:
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append({"pid": pid, "reason": reason, "home": home_of(env, pid), "environ": env, "cmdline": cmdline})
    return found


def orphans(marker: str) -> list[tuple[int, str]]:
    """Processes of this user whose command line contains `marker` and whose owner (OWNER_ENV in their environment)
    is gone: (pid, why)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry.name}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        owner = environ(int(entry.name)).get(OWNER_ENV, "") if marker in cmdline else ""
        host, _, rest = owner.partition(":")
        pid, _, started = rest.partition(":")
        reason = gone(host, pid, started) if owner else None
        if reason:
            found.append((int(entry.name), reason))
    return found
