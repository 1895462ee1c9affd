"""The builder's exception base and exit codes; builder/cli.py turns the exceptions into
those codes and one-paragraph messages (the runtime's: runtime/errors.py)."""

from runtime.errors import MigrateError

EXIT_CODES = """\
exit codes:
  0  the bundle was written
  1  unexpected internal error (a bug: report it with the command line and --verbose output)
  3  the input image is not in a format the builder reads, or is corrupt or truncated
  4  the image's partition table or contents are not those of an intel-nuc flasher, or it
     is a flasher this tool cannot repack (generic-amd64, signed, EFI-only, unknown units)
  5  the output directory exists and is not empty (use --force), or an option is invalid
  6  an external tool is missing or failed (the message names the command, its exit code
     and its stderr)
  7  an edit inside a filesystem could not be verified
  8  a file could not be read or written (disk full, permissions); nothing was written to
     --out
  130  interrupted; nothing was written to --out
"""


class BuilderError(MigrateError):
    """A build that cannot go on; the message says what was found and what to do."""

    exit_code = 1


class InputFormatError(BuilderError):
    exit_code = 3


class FlasherLayoutError(BuilderError):
    exit_code = 4


class UnsupportedFlasherError(FlasherLayoutError):
    """A real flasher, of a kind or release the builder refuses by name."""


class OptionError(BuilderError):
    exit_code = 5


class VerifyError(BuilderError):
    exit_code = 7
