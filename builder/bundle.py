"""The bundle directory: staged next to --out, renamed into place only when complete.

Also builds resin-migrate.pyz (a zipapp of runtime/) and SHA256SUMS, both byte-for-byte
reproducible: sorted entries, fixed timestamps and modes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import TracebackType

from runtime.bundle import sha256_file
from runtime.errors import ToolMissingError
from runtime.manifest import SUMS_NAME
from runtime.run import run

from .errors import OptionError

RUNTIME_DIR = Path(__file__).resolve().parent.parent / "runtime"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# The first module the zipapp runs: it must parse on Python 2.7 and 3.3 too, so that an
# old interpreter is refused with a sentence (runtime/stdlib.py) instead of a SyntaxError
# from the runtime's own modules.
PYZ_MAIN = b"""\
import sys

from runtime.stdlib import require_python

require_python()

from runtime.__main__ import main

sys.exit(main())
"""


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a non-empty directory without --force."""
    if out.exists() and not out.is_dir():
        raise OptionError(f"--out {out}: this is a file; give a directory for the bundle")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OptionError(f"--out {out}: the directory is not empty; choose another, or add "
                          "--force to replace its contents")


class Staging:
    """A temporary directory beside the final one; commit() swaps it in, else it is removed."""

    def __init__(self, out: Path, force: bool) -> None:
        check_output_dir(out, force)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def commit(self) -> None:
        for path in self.dir.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        self.dir.chmod(0o755)
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "bundle")
        os.replace(self.dir, self.out)
        if old is not None:
            shutil.rmtree(old)


def build_pyz(dest: Path, runtime_dir: Path = RUNTIME_DIR) -> None:
    """Write the runtime as an executable zipapp, the same bytes for the same sources."""
    sources = _runtime_sources(runtime_dir)
    with dest.open("wb") as handle:
        handle.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            _add(archive, "__main__.py", PYZ_MAIN, 0o644)
            for path in sources:
                name = "runtime/" + path.relative_to(runtime_dir).as_posix()
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                _add(archive, name, path.read_bytes(), mode)
    dest.chmod(0o755)


def _runtime_sources(runtime_dir: Path) -> list[Path]:
    """The runtime's files: those git tracks in a checkout (a stray file in the working tree
    must not change the bundle), else every .py file and the stage 2 script."""
    try:
        listed = run(["git", "ls-files", "-z", "."], cwd=str(runtime_dir), check=False)
    except ToolMissingError:
        listed = None
    if listed is not None and listed.returncode == 0 and listed.stdout:
        names = [name for name in listed.stdout.split("\0") if name]
        return sorted(runtime_dir / name for name in names if (runtime_dir / name).is_file())
    return sorted(path for path in runtime_dir.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts
                  and path.suffix in (".py", ""))


def _add(archive: zipfile.ZipFile, name: str, data: bytes, mode: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data)


def write_sums(directory: Path) -> Path:
    """SHA256SUMS for every file in directory, in the format `sha256sum -c` reads."""
    lines = []
    for path in sorted(directory.iterdir()):
        if path.name == SUMS_NAME or not path.is_file():
            continue
        lines.append(f"{sha256_file(str(path))[1]}  {path.name}\n")
    sums = directory / SUMS_NAME
    sums.write_text("".join(lines))
    return sums

