"""Output files: atomic for regular files, straight through for FIFOs/devices (never replaced), umask
permissions, and file-system errors as one-line MultifiErrors."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest
from conftest import drain_fifo, fifo_and_target

from multifi.errors import MultifiError
from multifi.files import atomic_write, make_dir, write_text


@pytest.mark.parametrize("via_symlink", [False, True])
def test_fifo_is_written_through_not_replaced(tmp_path, via_symlink):
    fifo, target = fifo_and_target(tmp_path, via_symlink)
    got: list = []
    reader = drain_fifo(fifo, got)
    write_text(target, "hello\n")
    reader.join(5)
    assert got == [b"hello\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not via_symlink or target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pipe"] + (["link"] if via_symlink else []))


def test_regular_file_replaced_atomically_with_umask_permissions(tmp_path):
    path = tmp_path / "out.json"
    old = os.umask(0o002)
    try:
        write_text(path, "1")
        write_text(path, "2")
    finally:
        os.umask(old)
    assert path.read_text() == "2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    write_text(path, "old")

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(MultifiError, match=r"out\.json: cannot write \(No space left on device\)"):
        atomic_write(path, full_disk)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_read_only_folder_is_a_one_line_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(MultifiError, match="cannot write .*Read-only file system"):
        write_text(tmp_path / "x.txt", "1")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_is_a_one_line_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(MultifiError, match="Permission denied"):
        write_text(ro / "x.txt", "1")


def test_file_in_place_of_a_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(MultifiError, match="exists and is not a folder"):
        make_dir(tmp_path / "f")
    with pytest.raises(MultifiError, match="f: exists and is not a folder"):
        write_text(tmp_path / "f" / "x.txt", "1")
    with pytest.raises(MultifiError, match="is a folder"):
        write_text(tmp_path, "1")


def test_an_interrupt_inside_a_writer_that_then_fails_is_an_interrupt(tmp_path):
    """Ctrl-C in torch.save surfaces as torch's own RuntimeError raised while unwinding: atomic_write reports
    it as the interrupt it is (the CLI then exits 130 with its resume hint), and leaves no file behind."""

    def write(f):
        try:
            f.write(b"partial")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("unexpected pos 321472 vs 321360")

    target = tmp_path / "best.ckpt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []

    def broken(f):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, broken)


def test_a_symlink_stays_a_link_and_its_file_gets_the_content(tmp_path):
    (tmp_path / "target.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to(tmp_path / "target.txt")
    atomic_write(tmp_path / "link.txt", lambda f: f.write(b"new"))
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "target.txt").read_text() == "new"


def test_a_link_to_a_process_stream_is_appended_to_not_replaced(tmp_path):
    """--out /dev/stdout with stdout redirected to a file: /dev/stdout → /proc/self/fd/1 → that regular file;
    it was replaced by a new regular file (the link, as root /dev/stdout itself, was gone)."""
    with open(tmp_path / "log.txt", "wb") as stream:
        stream.write(b"before\n")
        stream.flush()
        link = tmp_path / "stdout"
        link.symlink_to(f"/proc/self/fd/{stream.fileno()}")
        atomic_write(link, lambda f: f.write(b"picks\n"))
        assert link.is_symlink()
    assert (tmp_path / "log.txt").read_text() == "before\npicks\n"


def test_a_file_written_into_a_missing_folder_says_it_made_the_folder(tmp_path, caplog):
    """An output path in a folder that does not exist (a mistyped folder name) is written, and the folder's creation
    is said, not silent; writing into an existing folder says nothing."""
    import logging

    with caplog.at_level(logging.INFO, logger="multifi"):
        atomic_write(tmp_path / "typo" / "deeper" / "x.txt", lambda f: f.write(b"1"))
        atomic_write(tmp_path / "typo" / "deeper" / "y.txt", lambda f: f.write(b"2"))
    made = [r.getMessage() for r in caplog.records if "created the folder" in r.getMessage()]
    assert made == [f"{tmp_path / 'typo' / 'deeper'}: created the folder for x.txt"]
    assert (tmp_path / "typo" / "deeper" / "x.txt").read_bytes() == b"1"
