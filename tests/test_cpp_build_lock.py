"""A build of the C++ backend interrupted midway leaves torch's lock file behind, and torch waits
on it without end and without a word: an old one is removed with a warning; a recent one (another
process building) is waited for, the wait said, until it goes or grows old and is removed."""
import os
import threading
import time

import pytest

from normrnn import cpp_backend, dispatch


@pytest.fixture
def build_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    return tmp_path


def test_an_interrupted_build_lock_is_removed_with_a_warning(build_folder):
    lock = build_folder / "lock"
    lock.touch()
    old = time.time() - cpp_backend.STALE_BUILD_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="left by a build of the C\\+\\+ CPU backend that was interrupted"):
        cpp_backend._clear_stale_build_lock(str(build_folder))
    assert not lock.exists()


def test_a_build_under_way_is_waited_for_and_said(build_folder, capsys, recwarn):
    """The other build ends (its lock goes) while this process waits: it goes on, without a warning."""
    lock = build_folder / "lock"
    lock.touch()
    other = threading.Timer(0.3, lock.unlink)
    other.start()
    started = time.monotonic()
    cpp_backend._clear_stale_build_lock(str(build_folder), poll_seconds=0.05)
    other.join()
    assert time.monotonic() - started >= 0.25
    assert "waiting for another process's build" in capsys.readouterr().err
    assert not [warning for warning in recwarn if "normrnn" in str(warning.message)]


def test_a_lock_that_grows_old_while_waited_for_is_removed(build_folder, capsys, monkeypatch):
    """A build interrupted moments before this process began: its lock is young, then never goes."""
    monkeypatch.setattr(cpp_backend, "STALE_BUILD_LOCK_SECONDS", 0.3)
    lock = build_folder / "lock"
    lock.touch()
    with pytest.warns(RuntimeWarning, match="left by a build of the C\\+\\+ CPU backend that was interrupted"):
        cpp_backend._clear_stale_build_lock(str(build_folder), poll_seconds=0.05)
    assert not lock.exists()
    assert "waiting for another process's build" in capsys.readouterr().err


def test_the_build_folder_is_torchs(monkeypatch, tmp_path):
    """The folder torch builds in is where the lock is looked for."""
    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    assert cpp_backend._build_directory("normrnn_cpu_test") == str(tmp_path / "normrnn_cpu_test")
    assert not cpp_backend._is_built(str(tmp_path), "normrnn_cpu_test")
    (tmp_path / "normrnn_cpu_test.so").touch()
    assert cpp_backend._is_built(str(tmp_path), "normrnn_cpu_test")


def test_without_a_lock_nothing_happens(build_folder, capsys):
    cpp_backend._clear_stale_build_lock(str(build_folder))
    assert capsys.readouterr().err == ""
    assert list(build_folder.iterdir()) == []
