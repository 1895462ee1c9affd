"""build-flasher's command line: `python -m builder` (and `invoke build-flasher`, which
calls main()). Parsing, the call, the summary and the exit code; the work is repack.build."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runtime import log
from runtime.errors import MigrateError
from runtime.manifest import RUNTIME_NAME

from .errors import EXIT_CODES
from .progress import Progress
from .repack import BuildOptions, BuildResult, build

PROG = "build-flasher"
USAGE_ERROR = 5     # an invalid option (EXIT_CODES)
IO_ERROR = 8
INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """A usage error: one line, and the builder's code for an invalid option (not
        argparse's 2)."""
        sys.stderr.write(f"{PROG}: {message}; see '{PROG} --help'\n")
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        description="Repack an intel-nuc (or genericx86-64-ext) resinOS flasher image into a "
                    "migration bundle: manifest.json, one compressed stream per partition the "
                    "device needs (flash-boot, flash-rootA), resin-migrate.pyz and SHA256SUMS. "
                    "No root needed.")
    parser.add_argument("--image", required=True, type=Path,
                        help="the flasher image: raw, .zip (balena's download), .gz, .zst or "
                             ".xz; the format is read from the content, not the name")
    parser.add_argument("--out", required=True, type=Path,
                        help="the bundle directory to create (refused if it exists and is not "
                             "empty)")
    parser.add_argument("--config", type=Path,
                        help="the fleet's config.json; replaces the flasher's own on flash-boot")
    parser.add_argument("--network", type=Path,
                        help="a directory of NetworkManager keyfiles for "
                             "flash-boot/system-connections")
    parser.add_argument("--compression",
                        help="zstd or gzip for the resinOS image inside the flasher (default: "
                             "zstd when the flasher's root filesystem has a zstd binary, else "
                             "gzip)")
    parser.add_argument("--stream-compression", default="gzip",
                        help="gzip (default; the runtime decompresses it with Python's zlib) "
                             "or zstd (needs a zstd binary on the device)")
    parser.add_argument("--force", action="store_true",
                        help="replace the contents of a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--workdir", type=Path,
                        help="where to keep the temporary copies (default: beside --out); "
                             "needs about twice the flasher's raw size free")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every command run (with its exit code and stderr when it "
                             "fails)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        log.setup(verbose=True)
    options = BuildOptions(image=args.image, out=args.out, config=args.config,
                           network=args.network, compression=args.compression,
                           stream_compression=args.stream_compression, force=args.force,
                           workdir=args.workdir)
    started = time.monotonic()
    try:
        result = build(options, Progress(quiet=args.quiet))
    except MigrateError as exc:
        return _fail(str(exc), exc.exit_code)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}; nothing was written to --out", IO_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written to --out", INTERRUPTED)
    print_summary(result, time.monotonic() - started)
    return 0


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return code


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


def print_summary(result: BuildResult, elapsed: float) -> None:
    manifest = result.manifest
    inner = manifest.inner_image
    print(f"bundle written to {result.out} in {elapsed:.1f} s")
    for name, size in result.files.items():
        print(f"  {name:<24} {human(size):>12}")
    print(f"  total                    {human(sum(result.files.values())):>12}")
    print(f"inner image {inner.original_path}: {human(inner.raw_size)}, of which "
          f"{human(inner.stream_size)} in {len(inner.extents)} extents hold data -> "
          f"{inner.compression} {human(inner.size)} ({inner.size / inner.raw_size:.1%})")
    for part in manifest.partitions:
        what = f"stream {part.stream}" if part.stream else "created on the device"
        grows = ", grows into the rest of the swap area" if part.grows else ""
        print(f"  device partition {part.label:<12} {part.fs:<5} {human(part.size):>10}  "
              f"{what}{grows}")
    print(f"next: copy {result.out} to the device and run 'python3 {RUNTIME_NAME} verify' "
          "in it")
