"""The one atomic writer and the one stale-temporary sweeper (resnetlab.fileio) that every writer uses."""

from __future__ import annotations

import os
import socket
import time

import pytest

from resnetlab.fileio import TMP_MARK, atomic_write, is_stale_temporary, remove_stale_temporaries, temporary_sibling


def test_atomic_write_text_bytes_and_a_saver(tmp_path):
    path = tmp_path / "m.json"
    atomic_write(path, "one")
    assert path.read_text() == "one"
    atomic_write(path, b"two", durable=True)
    assert path.read_bytes() == b"two"
    seen = []

    def saver(tmp):
        seen.append(tmp)
        tmp.write_text("three")

    atomic_write(tmp_path / "model.pt2", saver, keep_suffix=True)
    assert (tmp_path / "model.pt2").read_text() == "three"
    assert seen[0].suffix == ".pt2" and seen[0].name.startswith(".model.pt2" + TMP_MARK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "model.pt2"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_fail)
    with pytest.raises(RuntimeError):
        atomic_write(path, "new", before_replace=lambda: (_ for _ in ()).throw(RuntimeError("stop")))
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_stale_temporaries_of_dead_or_old_writers_are_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".last.safetensors{TMP_MARK}999999999-deadbeef@{host}"  # beyond any pid: its writer is gone
    live = temporary_sibling(tmp_path / "last.safetensors")  # this process: still writing
    elsewhere = tmp_path / f".last.safetensors{TMP_MARK}999999999-deadbeef@not-{host}"  # cannot check: kept...
    old = tmp_path / f".last.safetensors{TMP_MARK}999999998-deadbeef@not-{host}"  # ...unless a week old
    folder = tmp_path / f".0123456789abcdef{TMP_MARK}999999999-cafef00d@{host}"  # a cache build's folder
    other = tmp_path / f".best.safetensors{TMP_MARK}999999999-deadbeef@{host}"  # another file's temporary
    for p in (dead, live, elsewhere, old, other):
        p.write_bytes(b"half")
    folder.mkdir()
    (folder / "x.npy").write_bytes(b"half")
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old, (week_ago, week_ago))
    assert is_stale_temporary(dead) and not is_stale_temporary(live) and not is_stale_temporary(tmp_path)

    remove_stale_temporaries(tmp_path, "last.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name, folder.name, other.name])
    remove_stale_temporaries(tmp_path)  # every name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


def test_writers_sweep_the_temporaries_of_killed_writes(tmp_path):
    """The atomic writer removes what a killed write of the same file left (used by checkpoints, metrics...)."""
    path = tmp_path / "config.yaml"
    dead = tmp_path / f".config.yaml{TMP_MARK}999999999-deadbeef@{socket.gethostname()}"
    dead.write_text("half")
    atomic_write(path, "a: 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
