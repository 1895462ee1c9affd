"""runtime/stream.py: a compressed stream written onto a partition, and the write proved.

The compressed inputs are made with the gzip and zstd command-line tools, independent
of the code under test. Unit tests write regular files; tests marked `loop` write a
real loop device.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import stream
from runtime.errors import CommandError, MigrateError, ToolMissingError
from runtime.stream import DecompressorError, StreamError, verify_device, write_stream

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def raw_bytes(size: int, seed: int = 1) -> bytes:
    """Partition-like content: random runs between runs of zeros."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(rng.randrange(1, 300_000))
        out += bytes(rng.randrange(1, 700_000))
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compress(tool: str, raw: bytes, dest: Path, *options: str) -> Path:
    dest.write_bytes(subprocess.run([tool, "-c", "-q", *options], input=raw,
                                    capture_output=True, check=True).stdout)
    return dest


class Case:
    """A raw payload, its compressed file, and the manifest's figures for both."""

    def __init__(self, tmp_path: Path, compression: str, raw: bytes, *options: str) -> None:
        self.raw = raw
        self.compression = compression
        suffix = {"gzip": "gz", "zstd": "zst"}[compression]
        self.source = compress(compression, raw, tmp_path / f"stream.{suffix}", *options)
        self.target = tmp_path / "partition.img"

    def write(self, **overrides: object) -> None:
        data = self.source.read_bytes()
        kwargs: dict = dict(source=str(self.source), compression=self.compression,
                            target=str(self.target), raw_size=len(self.raw),
                            raw_sha256=sha(self.raw), sha256=sha(data), size=len(data))
        kwargs.update(overrides)
        write_stream(**kwargs)


@pytest.fixture(params=["gzip", "zstd"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    return Case(tmp_path, request.param, raw_bytes(9 * MiB + 1234))


def children_reaped(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen]:
    """Record every child stream.py starts, to check none is left running."""
    started: list[subprocess.Popen] = []
    real = subprocess.Popen

    def spy(*args: object, **kwargs: object) -> subprocess.Popen:
        proc = real(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    monkeypatch.setattr(stream.subprocess, "Popen", spy)
    return started


# -- round trips -------------------------------------------------------------------------

def test_round_trip_writes_the_raw_bytes_and_verifies(case: Case) -> None:
    calls: list[tuple[int, int]] = []
    case.write(progress=lambda done, total: calls.append((done, total)))
    assert case.target.read_bytes() == case.raw
    assert calls[-1] == (len(case.raw), len(case.raw))
    read: list[tuple[int, int]] = []
    assert verify_device(str(case.target), len(case.raw), sha(case.raw),
                         progress=lambda done, total: read.append((done, total))) is True
    assert read[-1] == (len(case.raw), len(case.raw))


def test_progress_rises_to_the_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "PROGRESS_INTERVAL", 0.0)
    c = Case(tmp_path, "gzip", raw_bytes(5 * MiB))
    calls: list[tuple[int, int]] = []
    c.write(progress=lambda done, total: calls.append((done, total)), chunk=MiB)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(done) >= 5 and done[-1] == 5 * MiB
    assert {t for _, t in calls} == {5 * MiB}


def test_a_regular_file_target_keeps_what_lies_past_raw_size(tmp_path: Path) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(MiB + 77))
    c.target.write_bytes(b"\xff" * (3 * MiB))
    c.write()
    assert c.target.read_bytes() == c.raw + b"\xff" * (2 * MiB - 77)


@pytest.mark.parametrize("read_size", [1, 7, 4096, 65536])
def test_gzip_members_concatenated_across_any_read_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int) -> None:
    monkeypatch.setattr(stream, "READ_SIZE", read_size)
    monkeypatch.setattr(stream, "INFLATE_STEP", 5000)
    parts = [raw_bytes(200_000, seed=2), bytes(300_000), b"", raw_bytes(100_001, seed=3)]
    members = [compress("gzip", part, tmp_path / f"m{i}.gz") for i, part in enumerate(parts)]
    source = tmp_path / "multi.gz"
    source.write_bytes(b"".join(m.read_bytes() for m in members))
    raw = b"".join(parts)
    target = tmp_path / "out.img"
    write_stream(str(source), "gzip", str(target), len(raw), sha(raw),
                 sha256=sha(source.read_bytes()), size=source.stat().st_size, chunk=8192)
    assert target.read_bytes() == raw


def test_a_small_gzip_of_zeros_expands_in_bounded_steps(tmp_path: Path) -> None:
    raw = bytes(64 * MiB)
    source = compress("gzip", raw, tmp_path / "zeros.gz", "-9")
    assert source.stat().st_size < 100_000
    target = tmp_path / "out.img"
    write_stream(str(source), "gzip", str(target), len(raw), sha(raw))
    assert target.stat().st_size == len(raw)
    assert verify_device(str(target), len(raw), sha(raw))


def test_zstd_frames_concatenated(tmp_path: Path) -> None:
    parts = [raw_bytes(300_000, seed=4), raw_bytes(500_000, seed=5)]
    source = tmp_path / "multi.zst"
    source.write_bytes(b"".join(
        compress("zstd", part, tmp_path / f"f{i}.zst").read_bytes()
        for i, part in enumerate(parts)))
    raw = b"".join(parts)
    write_stream(str(source), "zstd", str(tmp_path / "out.img"), len(raw), sha(raw))
    assert (tmp_path / "out.img").read_bytes() == raw


# -- refusals ----------------------------------------------------------------------------

def test_output_past_raw_size_is_refused_and_never_written(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    started = children_reaped(monkeypatch)
    raw_size = len(case.raw) - 3 * MiB - 5
    with pytest.raises(StreamError, match="more than the manifest's raw_size"):
        case.write(raw_size=raw_size, raw_sha256=sha(case.raw[:raw_size]), chunk=MiB)
    written = case.target.read_bytes()
    assert len(written) <= raw_size
    assert written == case.raw[:len(written)]
    assert all(proc.returncode is not None for proc in started)


def test_a_stream_that_ends_short_is_refused(case: Case) -> None:
    with pytest.raises(StreamError, match="ends after {} bytes".format(len(case.raw))):
        case.write(raw_size=len(case.raw) + 1)


def test_a_wrong_raw_sha256_is_refused(case: Case) -> None:
    with pytest.raises(StreamError, match="raw_sha256 is " + "0" * 64):
        case.write(raw_sha256="0" * 64)


def test_a_compressed_size_mismatch_is_refused_before_writing(case: Case) -> None:
    with pytest.raises(StreamError, match="incomplete or damaged"):
        case.write(size=case.source.stat().st_size + 1)
    assert not case.target.exists()


def test_a_flipped_byte_in_the_compressed_data_is_refused_as_a_damaged_file(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    started = children_reaped(monkeypatch)
    good = case.source.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x40
    case.source.write_bytes(bytes(damaged))
    with pytest.raises(StreamError, match="sha256 [0-9a-f]{64} differs from the manifest's "
                       + sha(good) + "; the bundle file is damaged") as info:
        case.write(sha256=sha(good), size=len(good))
    assert info.value.exit_code == 4
    assert all(proc.returncode is not None for proc in started)


def test_a_flipped_byte_zlib_cannot_see_is_refused_by_the_compressed_sha256(
        tmp_path: Path) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(MiB))
    good = c.source.read_bytes()
    damaged = bytearray(good)
    damaged[4] ^= 0x01              # the header's mtime: zlib ignores it
    c.source.write_bytes(bytes(damaged))
    with pytest.raises(StreamError, match="differs from the manifest's " + sha(good)):
        c.write(sha256=sha(good), size=len(good))


def test_a_corrupt_gzip_without_a_manifest_sha256_names_the_gzip_error(
        tmp_path: Path) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(2 * MiB))
    damaged = bytearray(c.source.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    c.source.write_bytes(bytes(damaged))
    with pytest.raises(StreamError, match="not a valid gzip stream|raw_sha256|more than"):
        c.write(sha256=None, size=None)


@pytest.mark.parametrize("cut", [4, 1000])   # inside the trailer, inside the data
def test_a_truncated_gzip_is_refused(tmp_path: Path, cut: int) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(2 * MiB))
    data = c.source.read_bytes()
    c.source.write_bytes(data[:-cut])
    with pytest.raises(StreamError, match="truncated"):
        c.write(sha256=None, size=None)
    with pytest.raises(StreamError, match="the bundle file is damaged"):
        c.write(sha256=sha(data), size=None)


def test_trailing_garbage_after_the_last_gzip_member_is_refused(tmp_path: Path) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(MiB))
    c.source.write_bytes(c.source.read_bytes() + bytes(512))
    with pytest.raises(StreamError, match="not a valid gzip stream"):
        c.write(sha256=None, size=None)


def test_a_zstd_failure_carries_its_stderr_and_the_child_is_reaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Case(tmp_path, "zstd", raw_bytes(2 * MiB))
    started = children_reaped(monkeypatch)
    c.source.write_bytes(c.source.read_bytes()[:-100])
    with pytest.raises(DecompressorError) as info:
        c.write(sha256=None, size=None)
    error = info.value
    assert isinstance(error, StreamError) and isinstance(error, CommandError)
    assert error.exit_code == 4 and error.returncode != 0 and error.stderr.strip()
    assert str(c.source) in str(error) and "zstd -dc" in str(error)
    assert len(started) == 1 and started[0].returncode is not None


def test_a_missing_zstd_names_the_package(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    c = Case(tmp_path, "zstd", raw_bytes(MiB))
    monkeypatch.setattr(stream, "ZSTD", "zstd-not-installed")
    with pytest.raises(ToolMissingError, match="install the package 'zstd'") as info:
        c.write()
    assert isinstance(info.value, MigrateError)
    assert not c.target.exists()


def test_an_unknown_compression_and_a_character_device_are_refused(case: Case) -> None:
    with pytest.raises(StreamError, match="unknown compression 'xz'"):
        case.write(compression="xz")
    with pytest.raises(StreamError, match="neither a block device nor a regular file"):
        case.write(target="/dev/null")


# -- reading back ------------------------------------------------------------------------

def test_verify_device_sees_a_byte_flipped_after_the_write(tmp_path: Path) -> None:
    c = Case(tmp_path, "gzip", raw_bytes(3 * MiB + 100))
    c.write()
    assert verify_device(str(c.target), len(c.raw), sha(c.raw))
    with c.target.open("r+b") as handle:
        handle.seek(len(c.raw) - 1)       # the last byte: in the partial last block
        handle.write(bytes([c.raw[-1] ^ 1]))
    with pytest.raises(StreamError, match="read back from the device have sha256"):
        verify_device(str(c.target), len(c.raw), sha(c.raw))


def test_verify_device_refuses_a_short_target(tmp_path: Path) -> None:
    target = tmp_path / "short.img"
    target.write_bytes(bytes(8192))
    with pytest.raises(StreamError, match="holds 8192 bytes, less than the 8193"):
        verify_device(str(target), 8193, sha(bytes(8193)))
    assert verify_device(str(target), 5000, sha(bytes(5000)))


def test_verify_device_falls_back_where_o_direct_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    raw = raw_bytes(MiB + 3)
    target = tmp_path / "t.img"
    target.write_bytes(raw)
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(stream.os, "open", no_direct)
    with caplog.at_level(logging.INFO, logger="resin-migrate"):
        assert verify_device(str(target), len(raw), sha(raw)) is False
    assert any("does not support O_DIRECT" in r.getMessage() and "POSIX_FADV_DONTNEED"
               in r.getMessage() for r in caplog.records)


# -- memory ------------------------------------------------------------------------------

# Runs write_stream in a grandchild and reports its peak RSS. Linux carries a process's
# peak RSS across fork and exec (the forked copy of its parent counts), so a child started
# straight from pytest would report pytest's own size: this small launcher is the parent.
LAUNCHER = """
import resource, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]] + sys.argv[2:])
if worker.wait() != 0:
    sys.exit(1)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
WORKER = """
import sys
from runtime.stream import write_stream
write_stream(sys.argv[1], "gzip", sys.argv[2], int(sys.argv[3]), sys.argv[4])
with open("/proc/self/status") as status:
    sys.stderr.write([line for line in status if line.startswith("VmHWM")][0])
"""


def test_peak_memory_stays_bounded_for_a_1_gib_stream(tmp_path: Path) -> None:
    """A child writes a 1 GiB gzip stream (mostly zeros: a few MiB of gzip -1) to a sparse
    file; its peak RSS, as the kernel counted it, stays under 64 MiB."""
    size, block = 1 << 30, 4 * MiB
    zero, noise = bytes(block), random.Random(7).randbytes(block)
    digest = hashlib.sha256()
    source = tmp_path / "big.gz"
    with source.open("wb") as out:
        gzip = subprocess.Popen(["gzip", "-1", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert gzip.stdin is not None
        for index in range(size // block):
            data = noise if index % 64 == 9 else zero
            digest.update(data)
            gzip.stdin.write(data)
        gzip.stdin.close()
        assert gzip.wait() == 0
    target = tmp_path / "big.img"
    with target.open("wb") as handle:
        handle.truncate(size)       # sparse, like a fresh partition image
    result = subprocess.run([sys.executable, "-c", LAUNCHER, WORKER, str(source), str(target),
                             str(size), digest.hexdigest()],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout) / 1024
    print("\nwrite_stream of a 1 GiB gzip stream ({} bytes compressed): peak RSS {:.1f} MiB "
          "(getrusage RUSAGE_CHILDREN; the worker's own {})".format(
              source.stat().st_size, peak_mib, result.stderr.strip()))
    assert target.stat().st_size == size
    assert peak_mib < 64


# -- loop devices ------------------------------------------------------------------------

@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A 256 MiB loop device over a sparse file: (device, backing file)."""
    backing = tmp_path / "disk.img"
    with backing.open("wb") as handle:
        handle.truncate(256 * MiB)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                            text=True, check=True).stdout.strip()
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def _flip_in_file(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x10]))
        handle.flush()
        os.fsync(handle.fileno())


@pytest.mark.loop
def test_loop_write_and_verify_with_o_direct(
        tmp_path: Path, loop: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    device, backing = loop
    c = Case(tmp_path, "gzip", raw_bytes(40 * MiB + 512, seed=9))
    # Another opener (udev, blkid, ...) keeps the device's page cache alive between our
    # opens: without one, the last close drops it and even buffered reads look correct.
    holder = os.open(device, os.O_RDONLY)
    try:
        with caplog.at_level(logging.INFO, logger="resin-migrate"):
            c.write(target=device)
            assert verify_device(device, len(c.raw), sha(c.raw)) is True
        assert not any("O_DIRECT (EINVAL)" in r.getMessage() for r in caplog.records)
        assert any("with O_DIRECT" in r.getMessage() for r in caplog.records)
        with backing.open("rb") as handle:
            assert handle.read(len(c.raw)) == c.raw

        # Changed behind the device's page cache (through its backing file): a buffered
        # read still returns the old byte, only a read bypassing the cache sees it.
        offset = 12 * MiB + 3
        _flip_in_file(backing, offset)
        assert os.pread(holder, 1, offset) == c.raw[offset:offset + 1]
        with pytest.raises(StreamError, match="read back from the device"):
            verify_device(device, len(c.raw), sha(c.raw))
        _flip_in_file(backing, offset)
        assert verify_device(device, len(c.raw), sha(c.raw))
    finally:
        os.close(holder)

    # Changed through the device itself, with dd oflag=direct.
    offset = 20 * MiB
    block = bytearray(c.raw[offset:offset + 4096])
    block[100] ^= 0x01
    subprocess.run(["dd", "of=" + device, "bs=4096", "seek={}".format(offset // 4096),
                    "count=1", "oflag=direct", "conv=notrunc", "status=none"],
                   input=bytes(block), check=True)
    with pytest.raises(StreamError, match="read back from the device"):
        verify_device(device, len(c.raw), sha(c.raw))


@pytest.mark.loop
def test_loop_too_small_or_busy_is_refused_before_writing(
        tmp_path: Path, loop: tuple[str, Path]) -> None:
    device, backing = loop
    c = Case(tmp_path, "gzip", raw_bytes(MiB, seed=10))
    with pytest.raises(StreamError, match="the partition is too small, nothing was written"):
        c.write(target=device, raw_size=256 * MiB + 4096)
    holder = os.open(device, os.O_RDONLY | os.O_EXCL)   # as a mount or swapon would
    try:
        with pytest.raises(StreamError, match="is in use"):
            c.write(target=device)
    finally:
        os.close(holder)
    with backing.open("rb") as handle:
        assert handle.read(MiB) == bytes(MiB)
    c.write(target=device)
    assert verify_device(device, len(c.raw), sha(c.raw))
