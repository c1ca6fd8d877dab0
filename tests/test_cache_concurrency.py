"""Several builders of one token cache at once: processes, another host, another PID namespace, crashes.

Every builder here is a real process (forked, so it starts in milliseconds with the modules
already imported). A builder "on another host" is a forked child that reports another
hostname and a process id that names no live process here, which is what a builder on
another machine sharing the cache folder looks like. The PID-namespace test puts a builder
in a real second PID namespace (skipped where the kernel refuses one).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from lightning_moe.data import BOS_ID
from lightning_moe.data.cache import CacheDamaged, build_cache, open_cache
from lightning_moe.data.tokenizers import load_tokenizer
from lightning_moe.errors import ConfigError

TEXTS = {f"doc_{i:02d}.txt": f"document {i}: " + "shared folders need one builder. " * (2 + i % 5) for i in range(24)}
DELAY = 0.04  # seconds to read one document: a build takes about a second
FORK = multiprocessing.get_context("fork")


def slow_documents(log: Path, gate: Path | None = None):
    """The corpus, one document every ``DELAY`` seconds, once file ``gate`` exists (if given).

    A build that starts reading adds a line to ``log``.
    """
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 60  # a builder left behind by a test run that was stopped does not linger
    while gate is not None and not gate.exists():
        assert time.monotonic() < deadline, "the gate was never opened"
        time.sleep(0.01)
    for name in sorted(TEXTS):
        time.sleep(DELAY)
        yield name, TEXTS[name].encode()


def build(path: Path, log: Path, gate: Path | None = None):
    return build_cache(str(path), slow_documents(log, gate), load_tokenizer("bytes"), meta={"key": "k"},
                       val_fraction=0.2, seed=0)


def check_corpus(corpus) -> None:
    """``corpus`` holds every document once, byte-level tokenised: its start token, then its UTF-8 bytes."""
    assert sorted(corpus.documents(0) + corpus.documents(1)) == sorted(TEXTS)
    for split, stream in ((0, corpus.train), (1, corpus.val)):
        text = np.frombuffer(b"".join(b"\0" + TEXTS[n].encode() for n in corpus.documents(split)), dtype=np.uint8)
        expected = np.where(text == 0, BOS_ID, text.astype(np.uint16))  # the texts hold no NUL byte
        assert np.array_equal(np.asarray(stream), expected)


def builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped): no live process here has it."""
    child = FORK.Process(target=lambda: None)
    child.start()
    child.join()
    return child.pid


def _builder(path, log, start=None, host=None, pid=None, gate=None):
    if host is not None:  # a builder on another machine: another hostname, a pid that means nothing here
        socket.gethostname = lambda: host
        os.getpid = lambda: pid
    if start is not None:
        assert start.wait(timeout=60)
    corpus = build(path, log, gate)
    assert corpus.path == str(path)
    check_corpus(corpus)


def start_builder(path, log, **kwargs):
    child = FORK.Process(target=_builder, args=(path, log), kwargs=kwargs)
    child.start()
    return child


def wait_for(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def started(path: Path, log: Path) -> bool:
    """A build of ``path`` has its temporary folder and has begun reading the documents."""
    return bool(list(path.parent.glob(f".{path.name}.tmp-*/documents.jsonl"))) and builds(log) > 0


def test_builders_started_together_build_once_and_readers_never_see_the_cache_replaced(tmp_path):
    path, log = tmp_path / "shared" / "cache", tmp_path / "builds.log"
    start = FORK.Event()
    children = [start_builder(path, log, start=start) for _ in range(3)]
    start.set()
    # This process reads the cache as soon as it appears and for as long as a builder runs.
    seen, errors = set(), []
    while any(c.is_alive() for c in children):
        if path.is_dir():
            try:
                seen.add(os.stat(path).st_ino)
                open_cache(str(path), {"key": "k"}, verify=False)
            except (CacheDamaged, OSError) as err:
                errors.append(repr(err))
        time.sleep(0.002)
    assert [c.exitcode for c in children] == [0, 0, 0]
    assert errors == [] and len(seen) == 1  # the finished cache was never removed or replaced
    assert builds(log) == 1  # one builder built; the others waited and opened its cache
    check_corpus(open_cache(str(path), {"key": "k"}))
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]  # no lock or temporary folder left


def open_later(gate: Path, seconds: float = 1.0) -> None:
    """Let builders held at ``gate`` go on in ``seconds``, while this process is busy."""
    threading.Timer(seconds, gate.touch).start()


def test_builder_on_another_host_keeps_its_folder_and_the_local_builder_waits_for_it(tmp_path, capfd):
    path, log, gate = tmp_path / "shared" / "cache", tmp_path / "builds.log", tmp_path / "gate"
    remote = start_builder(path, log, host="node-b", pid=dead_pid(), gate=gate)
    wait_for(lambda: started(path, log), "the other host's build to start")
    open_later(gate)
    local = build(path, log)  # must neither delete the other host's folder nor build a second copy
    remote.join()
    assert remote.exitcode == 0  # its folder was left alone
    assert builds(log) == 1
    check_corpus(local)
    assert f"token cache {path}: waiting for host node-b pid" in capfd.readouterr().err


def _unshare_pid_namespace() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newpid, clone_newuser = 0x20000000, 0x10000000
    return libc.unshare(clone_newpid) == 0 or libc.unshare(clone_newpid | clone_newuser) == 0


def _first_free_pid() -> int:
    """The lowest process id no process of this namespace has."""
    return next(pid for pid in range(2, 1 << 22) if not os.path.exists(f"/proc/{pid}"))


def _namespaced_builder(path, log, report, gate):
    """Build in a new PID namespace, as a pid that no process here has (when that is cheap to reach)."""
    target = min(_first_free_pid(), 5000)
    if not _unshare_pid_namespace():
        os._exit(77)
    init = os.fork()  # pid 1 of the new namespace
    if init == 0:
        while True:  # processes get consecutive ids in a new namespace: use up those below target
            pid = os.fork()
            if pid == 0:
                code = 0
                if os.getpid() >= target:
                    report.write_text(f"{os.getpid()} {os.readlink('/proc/self/ns/pid')}")
                    try:
                        build(path, log, gate)
                    except BaseException:
                        traceback.print_exc()
                        code = 1
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if pid >= target:
                os._exit(os.waitstatus_to_exitcode(status))
    _, status = os.waitpid(init, 0)
    os._exit(os.waitstatus_to_exitcode(status))


def test_builder_in_another_pid_namespace_keeps_its_folder(tmp_path):
    path, log, report = tmp_path / "shared" / "cache", tmp_path / "builds.log", tmp_path / "namespaced.txt"
    gate = tmp_path / "gate"
    other = FORK.Process(target=_namespaced_builder, args=(path, log, report, gate))
    other.start()
    wait_for(lambda: started(path, log) or not other.is_alive(), "the namespaced build to start")
    if not other.is_alive() and other.exitcode == 77:
        pytest.skip("this kernel or container refuses a new PID namespace")
    pid, namespace = report.read_text().split()
    assert namespace != os.readlink("/proc/self/ns/pid")
    open_later(gate)
    local = build(path, log)
    other.join()
    assert other.exitcode == 0, f"the builder in the other namespace (pid {pid} there) failed"
    assert builds(log) == 1
    check_corpus(local)


def test_killed_builder_on_another_host_is_taken_over_once_when_its_heartbeat_is_stale(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE_STALE_AFTER", "1.5")
    path, log = tmp_path / "shared" / "cache", tmp_path / "builds.log"
    remote = start_builder(path, log, host="node-b", pid=dead_pid(), gate=tmp_path / "never")
    wait_for(lambda: started(path, log), "the other host's build to start")
    os.kill(remote.pid, signal.SIGKILL)
    remote.join()
    capfd.readouterr()
    start = FORK.Event()
    local = [start_builder(path, log, start=start) for _ in range(2)]  # both find the lock stale at about once
    start.set()
    for child in local:
        child.join()
    err = capfd.readouterr().err
    assert [c.exitcode for c in local] == [0, 0]
    # Its pid names no process here, but that says nothing about a process on another host:
    # only its stopped heartbeat shows it is gone.
    assert err.count("took over the build lock of host node-b") == 1
    assert "no heartbeat for" in err and "process has ended" not in err
    assert builds(log) == 2  # the killed build and one more
    check_corpus(open_cache(str(path), {"key": "k"}))
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]  # its lock and temporary folder removed


def test_killed_builder_here_is_taken_over_at_once_even_before_it_is_reaped(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE_LOCK_TIMEOUT", "30")  # far below the heartbeat's stale time
    path, log = tmp_path / "shared" / "cache", tmp_path / "builds.log"
    child = start_builder(path, log, gate=tmp_path / "never")
    wait_for(lambda: started(path, log), "the build to start")
    os.kill(child.pid, signal.SIGKILL)
    # Not joined: a zombie still answers kill(pid, 0), as a killed builder whose launcher has not reaped it does.
    wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", "a zombie")
    check_corpus(build(path, log))
    assert f"took over the build lock of host {socket.gethostname()} pid {child.pid}: its process has ended" in (
        capfd.readouterr().err
    )
    child.join()
    assert builds(log) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]


def test_unowned_temporary_folders_are_removed_only_once_old(tmp_path, monkeypatch):
    # Folders with no owner record (left by an earlier version, named .<cache>.tmp-<pid>-<hex>):
    # their age is all there is to go by.
    monkeypatch.setenv("LIGHTNING_MOE_CACHE_STALE_AFTER", "60")
    path, log = tmp_path / "shared" / "cache", tmp_path / "builds.log"
    old, recent = path.parent / f".cache.tmp-{dead_pid()}-0badf00d", path.parent / f".cache.tmp-{dead_pid()}-5eedf00d"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "tokens-00000.bin").write_bytes(b"partial")
    os.utime(old, (time.time() - 120, time.time() - 120))
    build(path, log)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["cache", recent.name])


def test_waiting_gives_up_after_the_timeout_naming_the_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MOE_CACHE_LOCK_TIMEOUT", "0.3")
    path, log, gate = tmp_path / "shared" / "cache", tmp_path / "builds.log", tmp_path / "gate"
    remote = start_builder(path, log, host="node-b", pid=dead_pid(), gate=gate)
    wait_for(lambda: started(path, log), "the other host's build to start")
    with pytest.raises(TimeoutError, match=r"node-b.*LIGHTNING_MOE_CACHE_LOCK_TIMEOUT") as caught:
        build(path, log)
    assert "\n" not in str(caught.value)
    gate.touch()
    remote.join()
    assert remote.exitcode == 0 and builds(log) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache"]  # the waiter left nothing behind


@pytest.mark.parametrize("variable", ["LIGHTNING_MOE_CACHE_LOCK_TIMEOUT", "LIGHTNING_MOE_CACHE_STALE_AFTER"])
@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan"])
def test_bad_lock_setting_is_one_line_naming_the_variable(tmp_path, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"^{variable}={value!r} must be a number of seconds > 0[^\n]*$"):
        build(tmp_path / "cache", tmp_path / "builds.log")
    assert builds(tmp_path / "builds.log") == 0


def test_a_build_finds_the_cache_another_finished_while_it_waited(tmp_path):
    path, log = tmp_path / "shared" / "cache", tmp_path / "builds.log"
    first = build(path, log)
    inode = os.stat(path).st_ino
    again = build(path, log)  # as a builder that saw no cache before the first one finished
    assert builds(log) == 1 and os.stat(path).st_ino == inode
    assert np.array_equal(np.asarray(again.train), np.asarray(first.train))
    assert first.built_here and not again.built_here  # so the data module does not report it as tokenised here
