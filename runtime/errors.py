"""The runtime's exception base and exit codes. Only the CLI turns these into exit codes
(the builder's: builder/errors.py)."""

EXIT_CODES = """\
exit codes:
  0   success
  1   unexpected internal error (a bug: report it with /var/log/resin-migrate.log)
  2   usage error (bad command line)
  3   manifest.json missing, malformed or failing validation
  4   a bundle file is missing or does not match its sha256 in the manifest
  5   this Python cannot run the runtime: older than 3.4, or lacking standard modules it
      needs (the message names the package)
  6   an external tool is missing or failed (the message names it)
  7   a file of the bundle could not be downloaded from --bundle-url (network, HTTP error,
      certificate not accepted), after the retries
  10  refused: a check failed, or not confirmed; nothing on the disk was changed
  11  stage 1 failed after changing the device: run 'rollback' (or stage1 again)
  12  rollback failed, or there is nothing to roll back
"""


class MigrateError(Exception):
    """A failure the user can act on; the message says what was found and what to do."""

    exit_code = 1


class CommandError(MigrateError):
    """An external command failed."""

    exit_code = 6

    def __init__(self, argv, returncode, stderr):
        # type: (list, int, str) -> None
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        from .run import quote_command
        tail = stderr.strip().splitlines()[-5:]
        MigrateError.__init__(
            self,
            "command failed (exit code {}): {}{}".format(
                returncode, quote_command(argv),
                "".join("\n  " + line for line in tail)))


class ToolMissingError(MigrateError):
    """A required external program is not installed."""

    exit_code = 6


class ManifestError(MigrateError):
    """manifest.json is missing, malformed, or fails validation."""

    exit_code = 3


class BundleError(MigrateError):
    """A bundle file is missing or its checksum does not match the manifest."""

    exit_code = 4
