"""Write a compressed bundle stream onto a partition, and prove the write.

write_stream() decompresses a stream of the bundle (gzip through zlib, zstd through a
`zstd` binary) straight onto a block device, never storing a decompressed copy; it
hashes both sides on the way and never writes past the raw size the manifest gives.
verify_device() reads the partition back bypassing the page cache (O_DIRECT) and
compares its sha256 with the manifest's.

Memory stays bounded whatever the stream's size: one write buffer of `chunk` bytes, one
compressed read, and zlib's output limited per call (a few KiB of zeros can expand to
gigabytes).
"""

import errno
import hashlib
import logging
import mmap
import os
import stat
import subprocess
import tempfile
import threading
import time
import zlib

from .errors import CommandError, MigrateError, ToolMissingError
from .run import _BASE_ENV, quote_command, spawn, which

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, BinaryIO, Callable, Optional  # noqa: F401  # novermin

log = logging.getLogger("resin-migrate")

ALIGN = 4096                  # writes start and reads are sized on this boundary
CHUNK = 4 << 20               # bytes written (and read back) per system call
READ_SIZE = 256 << 10         # compressed bytes read per call
INFLATE_STEP = 1 << 20        # raw bytes zlib may produce per call
PROGRESS_INTERVAL = 1.0       # seconds between progress callbacks
GZIP_WBITS = 31               # zlib: a gzip header and trailer, not raw deflate
ZSTD = "zstd"                 # the decompressor's name, looked up on the minimal PATH
# zstd's frame format is frozen from 1.0 (lib/zstd.h: magic 0xFD2FB524-27 in 0.4-0.7, the
# final 0xFD2FB528 from 0.8, whose format was still allowed to change); `zstd -V`
# prints "*** zstd command line interface 64-bits v1.3.3, by Yann Collet ***" (1.5: "***
# Zstandard CLI (64-bit) v1.5.5, ..."), to stdout from 0.4, to stderr before
ZSTD_MINIMUM = (1, 0)
_F_SETPIPE_SZ = 1031          # fcntl.F_SETPIPE_SZ (Linux >= 2.6.35; named in Python 3.10)


def zstd_version(text):
    # type: (str) -> Optional[tuple]
    """(major, minor, release) from what `zstd -V` printed, or None when it names none."""
    import re
    match = re.search(r"\bv(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in match.groups()) if match else None


class StreamError(MigrateError):
    """A stream or the partition written from it does not match the manifest."""

    exit_code = 4
    # set once the compressed file has been compared with the manifest's sha256
    source_checked = False


class DecompressorError(StreamError, CommandError):
    """The `zstd` child process failed: a StreamError (exit code 4) that carries the
    command, its exit code and its stderr like every CommandError."""

    def __init__(self, argv, returncode, stderr, context):
        # type: (list, int, str, str) -> None
        CommandError.__init__(self, argv, returncode, stderr)
        self.args = ("{}: {}".format(context, self.args[0]),)


def write_stream(source, compression, target, raw_size, raw_sha256, sha256=None, size=None,
                 progress=None, chunk=CHUNK, reader=None, quiet=False):
    # type: (str, str, str, int, str, Optional[str], Optional[int], Optional[Callable[[int, int], None]], int, Optional[Any], bool) -> None  # noqa: E501
    """Decompress `source` onto `target` (a block device or a regular file) from offset 0.

    compression is 'gzip' (zlib, several concatenated members allowed) or 'zstd' (a
    `zstd -dc` child process). The compressed bytes are hashed as they are read and
    compared with sha256/size when given; the raw bytes are hashed as they are written
    and must be exactly raw_size bytes with sha256 raw_sha256. Output past raw_size is
    never written. Writes go in `chunk`-byte aligned blocks, with one fsync at the end.
    A regular-file target is neither truncated nor extended past what is written.
    progress(done_bytes, raw_size) is called at most about once a second, and at the end.
    reader, when given, is an open file-like object (read(n), a context manager) to read
    the compressed bytes from instead of opening the file `source` (then only a name in
    messages): a download (fetch.RemoteFile), hashed and checked the same way. quiet: what
    is written and its hash go to the log file only (a scratch copy, not a partition).

    Raises StreamError on any mismatch (after a decompression failure, the compressed
    file is hashed again so the message says whether the bundle file itself is damaged),
    ToolMissingError when zstd is needed but not installed. Returns nothing.
    """
    if chunk <= 0 or chunk % ALIGN:
        raise ValueError("chunk must be a positive multiple of {}".format(ALIGN))
    if compression not in ("gzip", "zstd"):
        raise StreamError("{}: unknown compression {!r}; this runtime reads gzip and zstd "
                          "streams".format(source, compression))
    zstd = ""
    if compression == "zstd":
        zstd = which(ZSTD)
        if not zstd:
            raise ToolMissingError(
                "{} is a zstd stream, and no '{}' program was found on {}; install the "
                "package 'zstd' (apt-get install zstd), or use a bundle built with gzip "
                "streams. Nothing was written to {}.".format(
                    source, ZSTD, _BASE_ENV["PATH"], target))
    with (reader if reader is not None else _open_source(source)) as src:
        if size is not None and reader is None:
            actual = os.fstat(src.fileno()).st_size
            if actual != size:
                raise StreamError(
                    "{}: {} bytes, the manifest says {}; the bundle file is incomplete or "
                    "damaged: copy it again. Nothing was written to {}.".format(
                        source, actual, size, target))
        fd = _open_target(target, raw_size)
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "writing %s (%s) onto %s: %d bytes", source, compression, target,
                raw_size)
        try:
            writer = _Writer(fd, target, raw_size, chunk, progress, level)
            try:
                if compression == "gzip":
                    digest, count = _inflate_gzip(src, source, writer)
                else:
                    digest, count = _run_zstd(zstd, src, source, writer)
            except StreamError as exc:
                if reader is None:
                    _blame_source(exc, source, sha256)
                raise
            failure = _check_source(source, digest, count, sha256, size)
            if failure is not None:
                raise failure
            writer.finish(raw_sha256)
        finally:
            os.close(fd)


def verify_device(target, raw_size, raw_sha256, progress=None, chunk=CHUNK):
    # type: (str, int, str, Optional[Callable[[int, int], None]], int) -> bool
    """Read target[0:raw_size] back bypassing the page cache and compare its sha256.

    Reads with O_DIRECT into a page-aligned buffer, in multiples of 4096 bytes. Where
    O_DIRECT is refused (EINVAL, e.g. tmpfs), flushes the target, drops its cached pages
    (POSIX_FADV_DONTNEED) and reads normally, saying so in the log. Returns True when
    O_DIRECT was used. Raises StreamError when the target is short or differs.
    """
    if chunk <= 0 or chunk % ALIGN:
        raise ValueError("chunk must be a positive multiple of {}".format(ALIGN))
    started = time.monotonic()
    digest = None
    direct = True
    for direct in (True, False):
        fd = _open_for_verify(target, direct)
        if fd is None:
            continue
        try:
            digest = _read_back(fd, target, raw_size, chunk, progress, direct)
        finally:
            os.close(fd)
        if digest is not None:
            break
    if digest is None:  # pragma: no cover - the buffered pass never returns None
        raise StreamError("{}: could not be read back".format(target))
    actual = digest.hexdigest()
    if actual != raw_sha256:
        raise StreamError(
            "{}: the first {} bytes read back from the device have sha256 {}, the manifest "
            "says {}: the write did not persist as written (a failing disk, or something "
            "else writing to it). Run stage1 again; if it fails again, check the disk "
            "(dmesg, smartctl).".format(target, raw_size, actual, raw_sha256))
    elapsed = max(time.monotonic() - started, 1e-6)
    log.info("verified %s: %d bytes read back%s match sha256 %s (%.0f MB/s)", target,
             raw_size, " with O_DIRECT" if direct else "", raw_sha256,
             raw_size / elapsed / 1e6)
    return direct


# -- writing -----------------------------------------------------------------------------

def _retry(call, *args):
    # type: (Callable[..., int], *Any) -> int
    """call(*args), again when a signal interrupted it (Python 3.4 predates PEP 475)."""
    while True:
        try:
            return call(*args)
        except InterruptedError:
            continue


def _open_source(source):
    # type: (str) -> BinaryIO
    try:
        return open(source, "rb")
    except OSError as exc:
        raise StreamError("cannot open the stream {}: {}; copy the whole bundle "
                          "again".format(source, exc.strerror or exc)) from exc


def _open_target(target, raw_size):
    # type: (str, int) -> int
    """Open target for writing: a block device exclusively (refused when mounted or
    used as swap) and checked to hold raw_size bytes; a regular file, created if absent."""
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise StreamError("cannot examine {}: {}".format(target, exc.strerror)) from exc
        mode = stat.S_IFREG
    block = stat.S_ISBLK(mode)
    if not (block or stat.S_ISREG(mode)):
        raise StreamError("{} is neither a block device nor a regular file; refusing to "
                          "write a stream onto it".format(target))
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_EXCL if block else os.O_CREAT)
    try:
        fd = os.open(target, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise StreamError("{} is in use (mounted, active swap, or held by another "
                              "program); nothing was written to it. Unmount it or swapoff "
                              "it first.".format(target)) from exc
        raise StreamError("cannot open {} for writing: {}".format(target, exc.strerror)) from exc
    if block:
        try:
            capacity = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise StreamError("cannot find the size of {}: {}".format(
                target, exc.strerror)) from exc
        if capacity < raw_size:
            os.close(fd)
            raise StreamError(
                "{} holds {} bytes, and the stream expands to {}; the partition is too "
                "small, nothing was written to it".format(target, capacity, raw_size))
    return fd


class _Writer(object):
    """Collects raw output into one aligned buffer, writes it out full, hashes it, and
    refuses output past raw_size before it reaches the target."""

    def __init__(self, fd, target, raw_size, chunk, progress, level=logging.INFO):
        # type: (int, str, int, int, Optional[Callable[[int, int], None]], int) -> None
        self.level = level          # of the message saying what was written
        self.fd = fd
        self.target = target
        self.raw_size = raw_size
        self.buffer = bytearray(chunk)
        self.view = memoryview(self.buffer)
        self.fill = 0               # bytes waiting in the buffer
        self.written = 0            # bytes on the target
        self.digest = hashlib.sha256()
        self.progress = progress
        self.started = self.last_report = time.monotonic()

    def room(self):
        # type: () -> int
        """How many bytes the next decompression call may produce: up to the buffer's
        end, and at most one byte past raw_size, so an overlong stream shows at once."""
        produced = self.written + self.fill
        return max(1, min(len(self.buffer) - self.fill, self.raw_size - produced + 1))

    def accept(self, count):
        # type: (int) -> None
        """count bytes were placed at view[fill:fill+count]."""
        self.fill += count
        if self.written + self.fill > self.raw_size:
            raise StreamError(
                "the stream expands to more than the manifest's raw_size of {} bytes; "
                "stopped without writing past byte {} of {}".format(
                    self.raw_size, self.raw_size, self.target))
        if self.fill == len(self.buffer):
            self.flush()

    def add(self, data):
        # type: (bytes) -> None
        """Append data (at most room() bytes)."""
        self.view[self.fill:self.fill + len(data)] = data
        self.accept(len(data))

    def flush(self):
        # type: () -> None
        if not self.fill:
            return
        block = self.view[:self.fill]
        self.digest.update(block)
        offset = self.written
        while block:
            try:
                count = _retry(os.write, self.fd, block)
            except OSError as exc:
                raise StreamError("writing {} at byte {}: {}".format(
                    self.target, offset, exc.strerror)) from exc
            if count <= 0:
                raise StreamError("writing {} at byte {}: no space left".format(
                    self.target, offset))
            offset += count
            block = block[count:]
        self.written += self.fill
        self.fill = 0
        now = time.monotonic()
        if self.progress is not None and now - self.last_report >= PROGRESS_INTERVAL:
            self.last_report = now
            self.progress(self.written, self.raw_size)

    def finish(self, raw_sha256):
        # type: (str) -> None
        """Write what is left, fsync once, check the raw size and sha256."""
        self.flush()
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise StreamError("flushing {} to disk failed: {}".format(
                self.target, exc.strerror)) from exc
        if self.written != self.raw_size:
            raise StreamError(
                "the stream ends after {} bytes, the manifest's raw_size is {}; {} holds "
                "an incomplete copy".format(self.written, self.raw_size, self.target))
        actual = self.digest.hexdigest()
        if actual != raw_sha256:
            raise StreamError(
                "the {} bytes the stream expands to have sha256 {}, the manifest's "
                "raw_sha256 is {}; {} holds them, but they are not the partition the "
                "bundle was built with: rebuild or copy the bundle again".format(
                    self.written, actual, raw_sha256, self.target))
        elapsed = max(time.monotonic() - self.started, 1e-6)
        log.log(self.level, "wrote %d bytes to %s, sha256 %s (%.0f MB/s)", self.written,
                self.target, actual, self.written / elapsed / 1e6)
        if self.progress is not None:
            self.progress(self.written, self.raw_size)


def _read_source(src, source, size):
    # type: (BinaryIO, str, int) -> bytes
    try:
        return src.read(size)
    except OSError as exc:
        raise StreamError("reading {}: {}".format(source, exc.strerror or exc)) from exc


def _inflate_gzip(src, source, writer):
    # type: (BinaryIO, str, _Writer) -> tuple
    """Feed the gzip members of src through zlib into writer; (sha256, count) of src."""
    digest = hashlib.sha256()
    count = 0
    inflater = None
    while True:
        data = _read_source(src, source, READ_SIZE)
        if not data:
            break
        digest.update(data)
        count += len(data)
        while True:
            if inflater is None:       # a new member starts here
                inflater = zlib.decompressobj(GZIP_WBITS)
            limit = min(writer.room(), INFLATE_STEP)
            try:
                out = inflater.decompress(data, limit)
            except zlib.error as exc:
                raise StreamError("{}: not a valid gzip stream (in the compressed bytes "
                                  "before offset {}): {}".format(source, count, exc)) from exc
            if out:
                writer.add(out)
            if inflater.eof:           # member complete: what follows is the next one
                data = inflater.unused_data
                inflater = None
                if not data:
                    break
            elif inflater.unconsumed_tail or len(out) == limit:
                data = inflater.unconsumed_tail   # output was capped; more to come
            else:
                break                             # this read is used up
    if inflater is not None:
        raise StreamError("{}: the gzip stream is truncated (it ends inside a member, "
                          "after {} compressed bytes)".format(source, count))
    return digest.hexdigest(), count


def _run_zstd(zstd, src, source, writer):
    # type: (str, BinaryIO, str, _Writer) -> tuple
    """Feed src through a `zstd -dc` child into writer; (sha256, count) of src.

    A thread feeds the child's stdin (hashing what it sends) while this one reads its
    stdout; the child is killed and reaped on every error path.
    """
    argv = [zstd, "-dc", "-q"]
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = spawn(argv, subprocess.PIPE, subprocess.PIPE, stderr, "< " + source)
        except OSError as exc:
            raise StreamError("cannot start {}: {}".format(
                quote_command(argv), exc)) from exc
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None and stdout is not None
        feeder = _Feeder(src, source, stdin)
        try:
            out_fd = stdout.fileno()
            try:   # a larger pipe means fewer, larger reads; harmless where refused
                import fcntl
                fcntl.fcntl(out_fd, _F_SETPIPE_SZ, 1 << 20)
            except (ImportError, OSError):
                pass
            feeder.start()
            while True:
                limit = writer.room()
                count = _retry(os.readv, out_fd, [writer.view[writer.fill:writer.fill + limit]])
                if not count:
                    break
                writer.accept(count)
            feeder.join()
            returncode = proc.wait()
            stderr.seek(0)
            message = stderr.read().decode("utf-8", "replace")
            if feeder.error is not None:
                raise feeder.error
            if returncode != 0 or message.strip():
                raise DecompressorError(argv, returncode, message, "{}: zstd could not "
                                        "decompress the stream".format(source))
            return feeder.digest.hexdigest(), feeder.count
        finally:
            feeder.stop = True
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            feeder.join()
            stdout.close()


class _Feeder(threading.Thread):
    """Copies the compressed file into the child's stdin, hashing it on the way."""

    def __init__(self, src, source, pipe):
        # type: (BinaryIO, str, Any) -> None
        threading.Thread.__init__(self, name="zstd-feeder")
        self.daemon = True
        self.src = src
        self.source = source
        self.pipe = pipe
        self.digest = hashlib.sha256()
        self.count = 0
        self.stop = False
        self.error = None  # type: Optional[MigrateError]

    def join(self, timeout=None):
        # type: (Optional[float]) -> None
        if self.ident is not None:   # started
            threading.Thread.join(self, timeout)

    def run(self):
        # type: () -> None
        fd = self.pipe.fileno()
        try:
            while not self.stop:
                data = self.src.read(READ_SIZE)
                if not data:
                    break
                self.digest.update(data)
                self.count += len(data)
                view = memoryview(data)
                while view and not self.stop:
                    view = view[_retry(os.write, fd, view):]
        except MigrateError as exc:     # a download that failed after its retries
            self.error = exc
        except OSError as exc:
            if not self.stop and getattr(exc, "errno", None) != errno.EPIPE:
                self.error = StreamError("reading {} for zstd: {}".format(
                    self.source, getattr(exc, "strerror", None) or exc))
            # EPIPE: zstd stopped reading; its exit code and stderr say why
        finally:
            try:
                self.pipe.close()
            except OSError:
                pass


def _check_source(source, digest, count, sha256, size):
    # type: (str, str, int, Optional[str], Optional[int]) -> Optional[StreamError]
    """The refusal when the compressed bytes read differ from the manifest, else None."""
    failure = None
    if size is not None and count != size:
        failure = StreamError("{}: {} compressed bytes were read, the manifest says {}; the "
                              "bundle file changed while it was read: copy it again".format(
                                  source, count, size))
    elif sha256 is not None and digest != sha256:
        failure = StreamError("{}: sha256 {} differs from the manifest's {}; the bundle file "
                              "is damaged: copy it again".format(source, digest, sha256))
    if failure is not None:
        failure.source_checked = True
    return failure


def _blame_source(exc, source, sha256):
    # type: (StreamError, str, Optional[str]) -> None
    """After a decompression failure, hash the whole compressed file: when it is not the
    file the manifest names, say that (the cause the user can fix) instead."""
    if sha256 is None or exc.source_checked:
        return
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as handle:
            while True:
                data = handle.read(1 << 20)
                if not data:
                    break
                digest.update(data)
    except OSError:
        return
    if digest.hexdigest() != sha256:
        failure = StreamError("{}: sha256 {} differs from the manifest's {}; the bundle file "
                              "is damaged: copy it again ({})".format(
                                  source, digest.hexdigest(), sha256, exc))
        failure.source_checked = True
        raise failure from exc
    exc.source_checked = True


# -- reading back ------------------------------------------------------------------------

def _open_for_verify(target, direct):
    # type: (str, bool) -> Optional[int]
    """A read-only descriptor on target: with O_DIRECT, or None where that is refused;
    without, after flushing it and dropping its cached pages."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(target, flags | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            return None
        raise StreamError("cannot open {} to read it back: {}".format(
            target, exc.strerror)) from exc
    if not direct:
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            os.close(fd)
            raise StreamError("cannot drop the cached pages of {}: {}".format(
                target, exc.strerror)) from exc
        log.info("%s does not support O_DIRECT (EINVAL); flushed it and dropped its cached "
                 "pages (fsync + POSIX_FADV_DONTNEED), reading it back through the page "
                 "cache", target)
    return fd


def _read_back(fd, target, raw_size, chunk, progress, direct):
    # type: (int, str, int, int, Optional[Callable[[int, int], None]], bool) -> Optional[Any]
    """sha256 object of fd[0:raw_size]; None when O_DIRECT reads are refused (EINVAL)."""
    try:
        capacity = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        raise StreamError("cannot find the size of {}: {}".format(target, exc.strerror)) from exc
    if capacity < raw_size:
        raise StreamError("{} holds {} bytes, less than the {} written to it".format(
            target, capacity, raw_size))
    digest = hashlib.sha256()
    buffer = mmap.mmap(-1, chunk)   # anonymous mappings are page-aligned
    view = memoryview(buffer)
    try:
        done = 0
        last_report = time.monotonic()
        while done < raw_size:
            wanted = raw_size - done
            # whole aligned blocks, also for the last partial one (hash only what's wanted)
            length = min(chunk, (wanted + ALIGN - 1) // ALIGN * ALIGN)
            try:
                count = _retry(os.readv, fd, [view[:length]])
            except OSError as exc:
                if direct and done == 0 and exc.errno == errno.EINVAL:
                    log.info("%s refused an O_DIRECT read (EINVAL)", target)
                    return None
                raise StreamError("reading {} back at byte {}: {}".format(
                    target, done, exc.strerror)) from exc
            if count <= 0:
                raise StreamError("{} ended after {} bytes while reading back {}".format(
                    target, done, raw_size))
            digest.update(view[:min(count, wanted)])
            done += min(count, wanted)
            now = time.monotonic()
            if progress is not None and (now - last_report >= PROGRESS_INTERVAL
                                         or done == raw_size):
                last_report = now
                progress(done, raw_size)
        if progress is not None and raw_size == 0:
            progress(0, 0)
        return digest
    finally:
        view.release()
        buffer.close()
