"""One builder at a time for a cache folder shared by processes, containers and hosts.

Lightning prepares data on local rank 0 of every node, and the cache folder is often on a
shared file system, so builders of the same cache may run at once on several machines.
``flock``/``fcntl`` locks are unreliable on NFS; what every file system does atomically is
``rename`` a folder onto a name that does not exist (or fail when a non-empty folder holds
it). So every entry this module makes beside the cache folder ``<base>`` is a folder
holding ``owner.json`` (hostname, boot id, PID namespace, pid, process start time, a random
token), whose modification time is its owner's heartbeat:

* ``.<base>.wait-<token>``: a builder waiting; renamed to ``.<base>.lock`` to take the lock;
* ``.<base>.lock``: the builder that holds the lock;
* ``.<base>.tmp-<token>``: the holder's build in progress (see :func:`BuildLock.new_folder`);
* ``.<base>.gone-<token>``: an entry being deleted.

While a builder holds the lock (or waits for it) a daemon thread touches its entries every
few seconds. Another builder counts an owner as gone only when that is certain:

* an owner on this host, boot and PID namespace is gone when its process is (no such pid,
  a zombie, or another process under its pid); this needs no waiting, so a build killed on
  this machine is taken over at once;
* any other owner (another host, container or namespace, whose pid means nothing here) is
  gone when its heartbeat is older than ``LIGHTNING_MOE_CACHE_STALE_AFTER`` seconds
  (default 300). The age is measured against the waiting builder's own heartbeat, just
  touched on the same file system, so both times come from one clock (the file server's
  on NFS) and the machines' clocks need not agree.

Only the lock holder deletes other builders' entries, and only those of owners gone by
these rules. A waiter gives up after ``LIGHTNING_MOE_CACHE_LOCK_TIMEOUT`` seconds (default a
day) with an error naming the holder.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from lightning_moe.errors import ConfigError

STALE_ENV = "LIGHTNING_MOE_CACHE_STALE_AFTER"
TIMEOUT_ENV = "LIGHTNING_MOE_CACHE_LOCK_TIMEOUT"
STALE_AFTER = 300.0
"""Default seconds without a heartbeat after which a builder on another host counts as gone."""
LOCK_TIMEOUT = 86400.0
"""Default seconds a builder waits for another one before giving up."""
#: The file in every lock and temporary folder that says who holds it.
OWNER_RECORD = "owner.json"
_REPORT_EVERY = 60.0  # seconds between two "still waiting" lines


class CacheLockTimeout(TimeoutError):
    """Another builder held the cache's lock for longer than the waiter was willing to wait."""


@dataclass(frozen=True)
class Owner:
    """Who made an entry: enough to tell, from another process, whether it is still running."""

    host: str
    boot_id: str | None  # /proc/sys/kernel/random/boot_id: tells two machines of one hostname apart
    pid_ns: str | None  # the pid means something only inside this PID namespace
    pid: int
    start_time: int | None  # in clock ticks after boot: tells the owner from a later process given its pid
    token: str

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


def current_owner(token: str) -> Owner:
    pid = os.getpid()
    # /proc describes this process's PID namespace only when it was mounted in it (a
    # namespace made without remounting /proc sees the parent's, whose pids are not ours).
    stat = _proc_stat(pid) if _readlink("/proc/self") == str(pid) else None
    return Owner(
        host=socket.gethostname(),
        boot_id=_read("/proc/sys/kernel/random/boot_id"),
        pid_ns=_readlink("/proc/self/ns/pid"),
        pid=pid,
        start_time=stat[1] if stat else None,
        token=token,
    )


def _alive_here(owner: Owner, me: Owner) -> bool | None:
    """Whether ``owner``'s process runs, when this process can tell (same host, boot and PID namespace)."""
    if owner.boot_id is None or owner.pid_ns is None:
        return None
    if (owner.host, owner.boot_id, owner.pid_ns) != (me.host, me.boot_id, me.pid_ns):
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process has the pid
    if owner.start_time is None or me.start_time is None:
        return None  # a process has the pid; whether it is the owner cannot be checked
    stat = _proc_stat(owner.pid)
    return stat is not None and stat[0] != "Z" and stat[1] == owner.start_time  # a zombie has ended


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State and start time (clock ticks after boot) of process ``pid``: fields 3 and 22 of its stat."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[19])


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name``; ``ConfigError`` naming it otherwise."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{name}={value!r} must be a number of seconds > 0 (unset: {default:g})")
    return seconds


# --------------------------------------------------------------------------- entries


def _make_entry(folder: str, owner: Owner) -> None:
    os.mkdir(folder)
    with open(os.path.join(folder, OWNER_RECORD), "w", encoding="utf-8") as fh:
        json.dump(asdict(owner), fh)


def _read_entry(folder: str) -> tuple[Owner | None, float]:
    """The entry's owner (None when unrecorded) and heartbeat; ``FileNotFoundError`` once it is gone.

    The owner file is opened before its time is read: on NFS an open revalidates the
    file's attributes, where a plain ``stat`` may return ones cached for a minute.
    """
    try:
        with open(os.path.join(folder, OWNER_RECORD), encoding="utf-8") as fh:
            heartbeat = os.fstat(fh.fileno()).st_mtime
            return Owner(**json.load(fh)), heartbeat
    except (ValueError, TypeError):  # half written: its time still says when it was made
        return None, heartbeat
    except FileNotFoundError:  # an entry from before owners were recorded, or one being made
        return None, os.stat(folder).st_mtime


def _touch(folder: str) -> float:
    """Renew the entry's heartbeat; the file system's time now."""
    path = os.path.join(folder, OWNER_RECORD)
    os.utime(path)
    with open(path, "rb") as fh:
        return os.fstat(fh.fileno()).st_mtime


class _Heartbeat(threading.Thread):
    """Touches the given entries every ``interval`` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="cache-build-heartbeat", daemon=True)
        self.interval = interval
        self.folders: list[str] = []
        self._halt = threading.Event()

    def beat(self) -> None:
        # In list order: a build folder goes before the lock, so the lock is never fresher
        # than the folder, and when the lock is stale the folder is too.
        for folder in list(self.folders):
            try:
                _touch(folder)
            except OSError:
                pass  # renamed or deleted meanwhile (a finished build, a lock taken over)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


# --------------------------------------------------------------------------- the lock


class BuildLock:
    """The lock of the cache folder ``path``: ``with BuildLock(path) as lock:`` waits for it, then holds it.

    ``stale_after`` and ``timeout`` (seconds) default to the environment variables
    ``LIGHTNING_MOE_CACHE_STALE_AFTER`` and ``LIGHTNING_MOE_CACHE_LOCK_TIMEOUT``.
    """

    def __init__(self, path: str, *, stale_after: float | None = None, timeout: float | None = None) -> None:
        self.path = os.path.abspath(path)
        self.parent, self.base = os.path.split(self.path)
        self.stale_after = stale_after if stale_after is not None else seconds_from_env(STALE_ENV, STALE_AFTER)
        self.timeout = timeout if timeout is not None else seconds_from_env(TIMEOUT_ENV, LOCK_TIMEOUT)
        self.lock = self._entry("lock")
        self.token = uuid.uuid4().hex[:12]
        self.owner = current_owner(self.token)
        self._heartbeat: _Heartbeat | None = None
        self._entries = re.compile(rf"\.{re.escape(self.base)}\.(wait|tmp|gone)-[A-Za-z0-9-]+")

    def _entry(self, kind: str, token: str | None = None) -> str:
        return os.path.join(self.parent, f".{self.base}.{kind}" + (f"-{token}" if token else ""))

    def _trash(self) -> str:
        # A new name each time: a folder whose deletion left files behind (NFS keeps files
        # that a reader still has open) must not block the next rename.
        return self._entry("gone", f"{self.token}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Wait until this builder holds the lock (taking it over from an owner that is gone)."""
        waiting = self._entry("wait", self.token)
        _make_entry(waiting, self.owner)
        self._heartbeat = _Heartbeat(min(10.0, self.stale_after / 30))
        self._heartbeat.folders.append(waiting)  # so that the holder leaves this waiter's entry alone
        self._heartbeat.start()
        try:
            self._wait(waiting)
        except BaseException:
            self._heartbeat.stop()
            shutil.rmtree(waiting, ignore_errors=True)
            raise
        self._heartbeat.folders[:] = [self.lock]

    def _wait(self, waiting: str) -> None:
        start = time.monotonic()
        reported = -math.inf
        poll = min(1.0, self.stale_after / 10)
        while True:
            try:
                os.rename(waiting, self.lock)  # fails while another (non-empty) lock folder is there
                return
            except OSError as err:
                failure = err
                if self._holder() == self.token:  # NFS: a retried rename that had already succeeded
                    return
                if not os.path.isdir(waiting):  # deleted by a holder that wrongly judged this waiter gone
                    _make_entry(waiting, self.owner)
                    continue
            try:
                holder, heartbeat = _read_entry(self.lock)
            except FileNotFoundError:
                if failure.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # released since: take it now
                raise failure from None
            age = _touch(waiting) - heartbeat
            gone = self._gone(holder, age)
            if gone:
                if self._remove_lock(holder.token if holder else None):
                    print(f"token cache {self.path}: took over the build lock of {self._who(holder)}: {gone}",
                          file=sys.stderr, flush=True)
                continue
            waited = time.monotonic() - start
            if waited > self.timeout:
                raise CacheLockTimeout(
                    f"token cache {self.path}: {self._who(holder)} has been building"
                    f" it for longer than the {self.timeout:g} s this process waits (heartbeat {age:.0f} s ago);"
                    f" wait for it, or if no such build runs delete {self.lock}, or set {TIMEOUT_ENV}"
                )
            if waited - reported >= _REPORT_EVERY:
                print(f"token cache {self.path}: waiting for {self._who(holder)} to finish building it"
                      f" (heartbeat {age:.0f} s ago; waited {waited:.0f} s)", file=sys.stderr, flush=True)
                reported = waited
            time.sleep(min(poll, self.timeout - waited + 0.01))

    def _gone(self, owner: Owner | None, age: float) -> str:
        """Why ``owner``'s entry (heartbeat ``age`` seconds old) is abandoned, or ``""`` while it may be in use."""
        alive = None if owner is None else _alive_here(owner, self.owner)
        if alive is False:
            return "its process has ended"
        if alive is None and age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (more than {STALE_ENV}={self.stale_after:g})"
        return ""

    @staticmethod
    def _who(owner: Owner | None) -> str:
        return owner.describe() if owner else "an unrecorded builder"

    def _holder(self) -> str | None:
        try:
            owner, _ = _read_entry(self.lock)
        except OSError:
            return None
        return owner.token if owner else None

    def _remove_lock(self, token: str | None) -> bool:
        """Delete the lock if it is still ``token``'s (moved aside first, so only one remover gets it)."""
        gone = self._trash()
        try:
            os.rename(self.lock, gone)
        except FileNotFoundError:
            return False
        owner, _ = _read_entry(gone)
        if (owner.token if owner else None) != token:  # a newer lock, made after the check: put it back
            try:
                os.rename(gone, self.lock)
                return False
            except OSError:
                pass  # yet another one took its place; that build's folder stays safe, its lock is lost
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def release(self) -> None:
        """Stop the heartbeat and delete the lock (when it is still this builder's)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._holder() == self.token:
            self._remove_lock(self.token)

    # ----------------------------------------------------------------- while holding it

    def new_folder(self) -> str:
        """A folder to build in (``.<base>.tmp-<token>``), kept alive by this builder's heartbeat."""
        folder = self._entry("tmp", self.token)
        _make_entry(folder, self.owner)
        self._heartbeat.folders.insert(0, folder)
        self._heartbeat.beat()
        return folder

    def set_aside(self, path: str) -> None:
        """Delete folder ``path`` after renaming it out of readers' way in one step."""
        gone = self._trash()
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def remove_abandoned(self) -> None:
        """Delete the entries of this cache (builds, waiters) whose owners are gone; after :meth:`new_folder`."""
        now = _touch(self._entry("tmp", self.token))  # the file system's clock, as the heartbeats are
        for name in os.listdir(self.parent):
            if not self._entries.fullmatch(name) or f"-{self.token}" in name:  # others' entries only
                continue
            folder = os.path.join(self.parent, name)
            try:
                owner, heartbeat = _read_entry(folder)
            except OSError:
                continue
            if self._gone(owner, now - heartbeat):
                shutil.rmtree(folder, ignore_errors=True)

    def finish(self, folder: str) -> None:
        """``folder`` (from :meth:`new_folder`) no longer needs its heartbeat or owner record."""
        self._heartbeat.folders.remove(folder)
        os.unlink(os.path.join(folder, OWNER_RECORD))
