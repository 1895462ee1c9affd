"""HTTP(S) client for a bundle served from a URL: small files whole, streams as readers.

Standard library only (urllib, http.client, ssl), Python 3.4 and later. HTTPS verifies
the server's certificate against the system's CA store, or only against `ca_file` when
one is given; plain HTTP is refused unless explicitly allowed. Proxies come from the
usual environment variables (http_proxy, https_proxy, no_proxy) through urllib's
ProxyHandler. A redirect to plain HTTP is refused like a plain HTTP URL.

RemoteFile is a file-like reader (read(n)) of one file of known size: it reads the
response in the caller's chunks, never more than asked, and when the connection drops,
stalls or the server fails with a 5xx, it reconnects after a growing delay and asks for
the rest with a Range request (If-Range: the file must not have changed), up to
`retries` consecutive failures without progress.
"""

import logging
import os
import re
import time

from . import __version__
from .errors import MigrateError

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Callable, Optional, Tuple  # noqa: F401  # novermin

log = logging.getLogger("resin-migrate")

RETRIES = 8                   # consecutive failed attempts (without progress) before giving up
RETRY_DELAY = 1.0             # seconds before the first retry; doubled each time
MAX_DELAY = 60.0              # longest wait between two attempts
TIMEOUT = 60.0                # seconds a connection or a read may stall
SMALL_LIMIT = 4 << 20         # manifest.json and SHA256SUMS are a few KiB
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class FetchError(MigrateError):
    """A file of the bundle could not be downloaded from its URL."""

    exit_code = 7
    status = 0     # the HTTP status that refused it, if one did


class _Retry(Exception):
    """An attempt failed in a way another attempt may not."""


def _modules():
    # type: () -> Tuple[Any, Any, Any, Any]
    """ssl, urllib.request, urllib.error and http.client, or a FetchError naming the package."""
    try:
        import http.client
        import ssl
        import urllib.error
        import urllib.request
    except ImportError as exc:
        raise FetchError("this Python cannot download over HTTPS ({}); install the full "
                         "standard library ('apt-get install python3', which brings "
                         "libpython3-stdlib with ssl and urllib), or copy the bundle onto "
                         "the device and use --bundle DIR".format(exc)) from exc
    return ssl, urllib.request, urllib.error, http.client


def join(base, name):
    # type: (str, str) -> str
    """The URL of a bundle file: base is the bundle's directory URL."""
    return base.rstrip("/") + "/" + name


class Fetcher(object):
    """One configured client: TLS, proxies, redirects, retries."""

    def __init__(self, ca_file=None, allow_http=False, retries=RETRIES, delay=RETRY_DELAY,
                 timeout=TIMEOUT, auth_file=None):
        # type: (Optional[str], bool, int, float, float, Optional[str]) -> None
        self.ca_file = ca_file
        self.allow_http = allow_http
        # the file holding the Authorization header's value (its path is recorded, never
        # the value: not on a command line, in the log or in the state file)
        self.auth_file = auth_file
        self._authorization = read_authorization(auth_file) if auth_file else None
        self.retries = retries
        self.delay = delay
        self.timeout = timeout
        self._opener = None  # type: Any

    def check_url(self, url):
        # type: (str) -> None
        """Refuse what this client must not fetch: other schemes, plain HTTP unless allowed."""
        if url.startswith("https://"):
            return
        if url.startswith("http://"):
            if self.allow_http:
                return
            raise FetchError(
                "{} is plain HTTP: nothing would authenticate the server or protect the "
                "bundle in transit. Serve the bundle over HTTPS, or pass --allow-http to "
                "accept that the manifest's sha256 values are the only protection (they "
                "catch corruption, not a tampering network)".format(url))
        raise FetchError("{} is not an http:// or https:// URL".format(url))

    @property
    def opener(self):
        # type: () -> Any
        if self._opener is None:
            ssl, _, _, _ = _modules()
            import urllib.request as request  # present: _modules() checked
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (IOError, OSError, ssl.SSLError) as exc:
                raise FetchError("--ca-file {}: cannot load it as PEM certificates ({}); give "
                                 "the CA certificate that signed the server's "
                                 "certificate".format(self.ca_file, exc)) from exc
            fetcher = self

            class Redirects(request.HTTPRedirectHandler):
                def redirect_request(self, req, fp, code, msg, headers, newurl):
                    fetcher.check_url(newurl)
                    new = request.HTTPRedirectHandler.redirect_request(
                        self, req, fp, code, msg, headers, newurl)
                    if new is not None and _origin(newurl) != _origin(req.full_url):
                        # the credentials are the bundle server's: never sent elsewhere
                        new.remove_header("Authorization")
                    return new

            self._opener = request.build_opener(request.ProxyHandler(),
                                                request.HTTPSHandler(context=context),
                                                Redirects())
        return self._opener

    def request(self, url, method="GET", offset=0, validator=None):
        # type: (str, str, int, Optional[str]) -> Any
        """The response to one request; FetchError when retrying cannot help, _Retry when
        it may."""
        self.check_url(url)
        ssl, request, error, http_client = _modules()
        headers = {"User-Agent": "resin-migrate/" + __version__,
                   "Accept-Encoding": "identity"}
        if offset < 0:     # the first byte only: the size, from Content-Range
            headers["Range"] = "bytes=0-0"
        elif offset:
            headers["Range"] = "bytes={}-".format(offset)
            if validator:
                headers["If-Range"] = validator
        authorization = self.authorization(url)
        if authorization:
            headers["Authorization"] = authorization
        req = request.Request(url, headers=headers, method=method)
        try:
            return self.opener.open(req, timeout=self.timeout)
        except error.HTTPError as exc:
            try:
                exc.close()
            except (OSError, AttributeError):
                pass
            if exc.code in RETRYABLE_STATUS:
                raise _Retry("the server answered {} {}".format(exc.code, exc.reason)) from exc
            failure = FetchError("{}: the server answered {} {}{}".format(
                url, exc.code, exc.reason,
                "; check the URL: it must be the bundle's directory, holding manifest.json"
                if exc.code in (403, 404, 410) else ""))
            failure.status = exc.code
            raise failure from exc
        except error.URLError as exc:
            reason = exc.reason
            if _certificate_failure(ssl, reason):
                raise _certificate_error(url, reason, self.ca_file) from exc
            raise _Retry("cannot connect: {}".format(reason)) from exc
        except (ssl.CertificateError, ssl.SSLError) as exc:
            if _certificate_failure(ssl, exc):
                raise _certificate_error(url, exc, self.ca_file) from exc
            raise _Retry("TLS error: {}".format(exc)) from exc
        except (OSError, http_client.HTTPException) as exc:   # socket.timeout is an OSError
            raise _Retry("{}: {}".format(type(exc).__name__, exc)) from exc

    def wait(self, url, failures, reason, where=""):
        # type: (str, int, str, str) -> None
        """After the failures-th consecutive failure: sleep before the next attempt, or
        raise FetchError when the retries are spent."""
        if failures > self.retries:
            raise FetchError("{}: {}{}; gave up after {} attempts. Check the network and the "
                             "server, then run the command again".format(
                                 url, reason, where, failures))
        delay = min(MAX_DELAY, self.delay * (2 ** (failures - 1)))
        log.warning("%s: %s%s; retry %d of %d in %.0f s", url, reason, where, failures,
                    self.retries, delay)
        time.sleep(delay)

    def get(self, url, limit=SMALL_LIMIT):
        # type: (str, int) -> bytes
        """A small file, whole (at most limit bytes)."""
        failures = 0
        while True:
            try:
                response = self.request(url)
                try:
                    _, _, _, http_client = _modules()
                    try:
                        data = response.read(limit + 1)
                    except (OSError, http_client.HTTPException) as exc:
                        raise _Retry("{}: {}".format(type(exc).__name__, exc)) from exc
                finally:
                    response.close()
                if len(data) > limit:
                    raise FetchError("{}: larger than {} bytes; this is not a bundle "
                                     "file".format(url, limit))
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != len(data):
                    raise _Retry("the connection ended after {} of {} bytes".format(
                        len(data), length))
                return data
            except _Retry as exc:
                failures += 1
                self.wait(url, failures, str(exc))

    def size(self, url):
        # type: (str) -> Tuple[int, bool]
        """(size in bytes, whether the server announces range requests), from a HEAD, or
        where HEAD is refused, from a GET of the first byte."""
        failures = 0
        head = True
        while True:
            try:
                try:
                    response = self.request(url, method="HEAD" if head else "GET",
                                            offset=0 if head else -1)
                except FetchError as exc:
                    if not (head and exc.status in (403, 405, 501)):
                        raise
                    head = False
                    continue
                response.close()
                match = CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
                if not head and response.getcode() == 206 and match and match.group(3) != "*":
                    return int(match.group(3)), True
                length = response.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    raise FetchError("{}: the server does not say the file's size "
                                     "(no Content-Length)".format(url))
                ranges = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
                return int(length), ranges
            except _Retry as exc:
                failures += 1
                self.wait(url, failures, str(exc))

    def open(self, url, size):
        # type: (str, int) -> RemoteFile
        return RemoteFile(self, url, size)


    def authorization(self, url):
        # type: (str) -> Optional[str]
        """The Authorization header for url: --auth-file's, else from ~/.netrc (or $NETRC)
        for the URL's host, as curl and wget read it; None without either."""
        if self._authorization is not None:
            return self._authorization
        return netrc_authorization(url)


def read_authorization(path):
    # type: (str) -> str
    """The header value in path (e.g. 'Bearer TOKEN'), which no one else may read."""
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as handle:
            value = handle.read().decode("utf-8", "strict").strip()
    except (EnvironmentError, UnicodeDecodeError) as exc:
        raise FetchError("--auth-file {}: cannot read it ({})".format(path, exc)) from exc
    if mode & 0o077:
        raise FetchError("--auth-file {} is readable by others (mode {:o}): it holds a "
                         "credential; chmod 600 it".format(path, mode & 0o777))
    if not value or "\n" in value or "\r" in value:
        raise FetchError("--auth-file {}: expected one line, the Authorization header's "
                         "value (for example 'Bearer TOKEN')".format(path))
    return value


def netrc_authorization(url):
    # type: (str) -> Optional[str]
    """Basic credentials for url's host from the netrc file, if it has them."""
    import base64
    try:
        import netrc
        from urllib.parse import urlsplit
    except ImportError:  # pragma: no cover - both are in the standard library
        return None
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        found = netrc.netrc(path).authenticators(urlsplit(url).hostname or "")
    except (netrc.NetrcParseError, EnvironmentError) as exc:
        raise FetchError("{}: cannot read it ({})".format(path, exc)) from exc
    if not found or found[2] is None:
        return None
    pair = "{}:{}".format(found[0] or "", found[2]).encode("utf-8")
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _origin(url):
    # type: (str) -> tuple
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port)


def _certificate_failure(ssl, reason):
    # type: (Any, Any) -> bool
    if isinstance(reason, ssl.CertificateError):
        return True
    return isinstance(reason, ssl.SSLError) and getattr(reason, "reason", "") in (
        "CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA")


def _certificate_error(url, reason, ca_file):
    # type: (str, Any, Optional[str]) -> FetchError
    return FetchError(
        "{}: the server's certificate was not accepted ({}); nothing was downloaded. "
        "{}Check the URL, and the device's clock (a wrong date fails valid "
        "certificates)".format(
            url, getattr(reason, "verify_message", None) or reason,
            "It is not signed by the CA in --ca-file {}: give the CA that signed it. ".format(
                ca_file) if ca_file else
            "It is not signed by a CA in the system's store: for a private CA, pass its "
            "certificate with --ca-file. "))


def _validator(headers):
    # type: (Any) -> Optional[str]
    """What If-Range may carry: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


class RemoteFile(object):
    """A file-like reader of url, `size` bytes, resuming with Range requests.

    offset: bytes handed to the caller; resumes: reconnections after the first."""

    def __init__(self, fetcher, url, size):
        # type: (Fetcher, str, int) -> None
        self.fetcher = fetcher
        self.url = url
        self.name = url
        self.size = size
        self.offset = 0
        self.resumes = 0
        self.failures = 0
        self.validator = None  # type: Optional[str]
        self.response = None   # type: Any
        self.last_error = ""
        self.on_read = None    # type: Optional[Callable[[], None]]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        # type: () -> None
        if self.response is not None:
            try:
                self.response.close()
            except (OSError, ValueError):
                pass
            self.response = None

    def read(self, count=-1):
        # type: (int) -> bytes
        if count is None or count < 0:
            count = self.size - self.offset
        _, _, _, http_client = _modules()
        while self.offset < self.size:
            try:
                if self.response is None:
                    self._connect()
                want = min(count, self.size - self.offset)
                try:
                    data = self.response.read(want)
                except (OSError, ValueError, http_client.HTTPException) as exc:
                    raise _Retry("{}: {}".format(type(exc).__name__, exc or "no data")) from exc
                if not data:
                    raise _Retry("the connection ended")
                self.offset += len(data)
                self.failures = 0
                if self.on_read is not None:
                    self.on_read()
                return data
            except _Retry as exc:
                self.close()
                self.failures += 1
                self.last_error = str(exc)
                self.fetcher.wait(self.url, self.failures, str(exc),
                                  " at byte {} of {}".format(self.offset, self.size))
        return b""

    def _connect(self):
        # type: () -> None
        if self.offset:
            self.resumes += 1
            log.info("%s: resuming at byte %d of %d", self.url, self.offset, self.size)
        response = self.fetcher.request(self.url, offset=self.offset, validator=self.validator)
        try:
            self._accept(response)
        except BaseException:
            response.close()
            raise
        self.response = response

    def _accept(self, response):
        # type: (Any) -> None
        status = response.getcode()
        headers = response.headers
        validator = _validator(headers)
        if self.offset and self.validator and validator and validator != self.validator:
            raise FetchError("{}: the file changed on the server while it was downloaded "
                             "(was {}, now {}); the bundle there is being replaced: run the "
                             "command again once it is complete".format(
                                 self.url, self.validator, validator))
        if status == 206:
            match = CONTENT_RANGE.match(headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != self.offset:
                raise FetchError("{}: asked for the bytes from {}, the server sent the range "
                                 "{!r}".format(self.url, self.offset,
                                               headers.get("Content-Range")))
            total = match.group(3)
            if total != "*" and int(total) != self.size:
                raise self._wrong_size(int(total))
        elif status == 200:
            length = headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != self.size:
                raise self._wrong_size(int(length))
            if self.offset:
                self._skip(response)
        else:
            raise FetchError("{}: unexpected answer {} from the server".format(self.url, status))
        if self.validator is None:
            self.validator = validator

    def _skip(self, response):
        # type: (Any) -> None
        """The server sent the whole file again (it ignores Range): read past what was
        already handed on, in bounded chunks."""
        log.info("%s: the server ignores range requests; reading past the first %d bytes "
                 "again", self.url, self.offset)
        _, _, _, http_client = _modules()
        left = self.offset
        while left:
            try:
                data = response.read(min(left, 1 << 20))
            except (OSError, ValueError, http_client.HTTPException) as exc:
                raise _Retry("{}: {}".format(type(exc).__name__, exc)) from exc
            if not data:
                raise _Retry("the connection ended")
            left -= len(data)

    def _wrong_size(self, actual):
        # type: (int) -> FetchError
        return FetchError("{}: the server has {} bytes, the manifest says {}; the server "
                          "holds another build of this file: publish the whole bundle "
                          "again".format(self.url, actual, self.size))
