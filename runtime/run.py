"""The one way the runtime (and the builder) runs external commands.

Every command line is logged, runs with a minimal environment, and a failure raises
CommandError carrying the command, its exit code and its stderr.
"""

import logging
import os
import signal
import subprocess

from .errors import CommandError, ToolMissingError
from .files import decode, encode

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Optional  # noqa: F401  # novermin

log = logging.getLogger("resin-migrate")

# Tools run with a predictable locale and PATH, whatever the caller's shell had.
# RESIN_MIGRATE_PATH replaces that PATH (tests use it to take a tool away).
_BASE_ENV = {
    "PATH": os.environ.get("RESIN_MIGRATE_PATH",
                           "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    "LC_ALL": "C",
    "LANG": "C",
    # tools that print or store local time (dumpe2fs, mtools) do so in UTC on every host
    "TZ": "UTC0",
}


def quote_command(argv):
    # type: (list) -> str
    """The command line as a shell would need it (shlex.join, which 3.4 lacks)."""
    try:
        from shlex import quote
    except ImportError:  # pragma: no cover - shlex is in python3-minimal
        from pipes import quote
    return " ".join(quote(str(arg)) for arg in argv)


class Result(object):
    """What a finished command printed."""

    def __init__(self, argv, returncode, stdout, stderr, timed_out=False):
        # type: (list, int, str, str, bool) -> None
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out    # stopped after run()'s timeout


def run(argv, env=None, input_text=None, check=True, ok_codes=(0,), cwd=None, timeout=None):
    # type: (list, Optional[dict], Optional[str], bool, tuple, Optional[str], Optional[float]) -> Result  # noqa: E501
    """Run argv and return its output as text.

    Raises CommandError unless its exit code is in ok_codes (or check is false).
    timeout: seconds, after which the command and every process it started (its own
    session) are stopped, TERM then KILL, and the result says timed_out.
    """
    argv = [str(arg) for arg in argv]
    full_env = dict(_BASE_ENV)
    if env:
        full_env.update(env)
    log.debug("run: %s", quote_command(argv))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
            start_new_session=timeout is not None)
    except OSError as exc:
        if exc.errno == 2:
            raise ToolMissingError("{} is not installed (needed to run: {})".format(
                argv[0], quote_command(argv))) from exc
        raise
    timed_out = False
    try:
        out, err = proc.communicate(encode(input_text) if input_text is not None else None,
                                    timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        out, err = _stop(proc)
    # stdout is parsed (names, labels, paths): read as files are (files.py), its bytes kept;
    # stderr is only shown, in messages and the log
    result = Result(argv, proc.returncode, decode(out), err.decode("utf-8", "replace"),
                    timed_out)
    if check and (timed_out or proc.returncode not in ok_codes):
        raise CommandError(argv, proc.returncode, result.stderr or result.stdout)
    return result


def spawn(argv, stdin, stdout, stderr, note=""):
    # type: (list, Any, Any, Any, str) -> subprocess.Popen
    """Start argv with the same environment as run() for a caller that streams through
    its pipes (zstd -dc), logged as run() logs (note: e.g. '< flash-rootA.zst'). The caller
    waits for it and kills it on its error paths."""
    argv = [str(arg) for arg in argv]
    log.debug("run: %s%s", quote_command(argv), " " + note if note else "")
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                env=dict(_BASE_ENV), close_fds=True)
    except OSError as exc:
        if exc.errno == 2:
            raise ToolMissingError("{} is not installed (needed to run: {})".format(
                argv[0], quote_command(argv))) from exc
        raise


def _stop(proc, grace=5.0):
    # type: (subprocess.Popen, float) -> tuple
    """End a command that ran out of time, with what it started: SIGTERM to its session,
    SIGKILL after grace seconds; what it printed until then."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass        # gone already
        try:
            return proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.communicate()


def which(name, extra_dirs=()):
    # type: (str, tuple) -> str
    """Path of an executable on the minimal PATH (or extra_dirs), or '' when absent."""
    for directory in list(extra_dirs) + _BASE_ENV["PATH"].split(":"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return ""
