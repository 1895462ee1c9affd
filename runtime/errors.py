"""The runtime's exception base. Only the CLI turns these into exit codes."""


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
