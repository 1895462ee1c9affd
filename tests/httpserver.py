"""A bundle server for the tests: HTTP or HTTPS on 127.0.0.1, with faults on demand.

It serves the files of one directory under /<prefix>/ with what the runtime relies on
(Content-Length, a strong ETag, Range and If-Range, HEAD), records every request, acts
as a plain HTTP forward proxy when asked for an absolute URL, answers 401 without the
Authorization it is given (auth), and injects faults: a
connection cut after a byte offset, 503 answers, a flipped byte, a stall until
released. The certificates for HTTPS come from `make_ca`/`make_server_cert` (openssl).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

CHUNK = 64 << 10


@dataclass
class Faults:
    """What goes wrong, per file name of the bundle."""

    cut: dict[str, int] = field(default_factory=dict)      # close after this file offset
    cuts: int = 1                                           # responses cut, per file
    unavailable: int = 0                                    # then 503s answered, per file
    corrupt: dict[str, int] = field(default_factory=dict)  # flip the byte at this offset
    stall: dict[str, int] = field(default_factory=dict)    # wait for `release` here
    ranges: bool = True                                     # False: Range is ignored
    head: bool = True                                       # False: HEAD answers 405
    redirect: dict[str, str] = field(default_factory=dict)  # 302 to this URL
    replaced_after_cut: bool = False                        # a new ETag once a cut happened
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    done: dict[tuple[str, str], int] = field(default_factory=dict)

    def take(self, kind: str, name: str, limit: int) -> bool:
        """Whether this response gets fault `kind` (each file gets `limit` of them)."""
        key = (kind, name)
        if self.done.get(key, 0) >= limit:
            return False
        self.done[key] = self.done.get(key, 0) + 1
        return True


@dataclass
class Request:
    method: str
    path: str
    absolute: bool             # the request line carried a full URL: sent to a proxy
    range: str | None
    if_range: str | None
    authorization: str | None = None


class BundleServer:
    """`with BundleServer(directory) as server:` serves it at server.url."""

    def __init__(self, root: Path, prefix: str = "nuc", tls: tuple[Path, Path] | None = None,
                 faults: Faults | None = None, port: int = 0, auth: str | None = None) -> None:
        self.root = root
        self.auth = auth            # the Authorization header every request must carry
        self.wanted_port = port
        self.prefix = prefix
        self.tls = tls
        self.faults = faults or Faults()
        self.requests: list[Request] = []
        self._etags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{self.prefix}/"

    def __enter__(self) -> BundleServer:
        server = self

        class Handler(_Handler):
            owner = server

        httpd = ThreadingHTTPServer(("127.0.0.1", self.wanted_port), Handler)
        httpd.daemon_threads = True
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.faults.release.set()
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def etag(self, name: str) -> str:
        with self._lock:
            if name not in self._etags:
                digest = hashlib.sha256((self.root / name).read_bytes()).hexdigest()
                self._etags[name] = f'"{digest[:20]}"'
            return self._etags[name]

    def gets(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    owner: BundleServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner, faults = self.owner, self.owner.faults
        path = urlsplit(self.path).path
        owner.requests.append(Request(self.command, path, self.path.startswith("http"),
                                      self.headers.get("Range"), self.headers.get("If-Range"),
                                      self.headers.get("Authorization")))
        if owner.auth is not None and self.headers.get("Authorization") != owner.auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="bundles"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        prefix = f"/{owner.prefix}/"
        name = path[len(prefix):] if path.startswith(prefix) else ""
        target = owner.root / name
        if not name or "/" in name or not target.is_file():
            self.send_error(404)
            return
        if name in faults.redirect:
            self.send_response(302)
            self.send_header("Location", faults.redirect[name])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not body and not faults.head:
            self.send_error(405)
            return
        cut = faults.cut.get(name) if body and faults.take("cut", name, faults.cuts) else None
        if body and cut is None and name in faults.cut and faults.take(
                "unavailable", name, faults.unavailable):
            self.send_error(503)
            return
        size = target.stat().st_size
        etag = owner.etag(name)
        if faults.replaced_after_cut and cut is None and faults.done.get(("cut", name)):
            etag = '"replaced"'
        start = 0
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if faults.ranges and wanted and wanted.startswith("bytes=") and \
                wanted.endswith("-") and (if_range is None or if_range == etag):
            start = int(wanted[len("bytes="):-1])
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Content-Type", "application/octet-stream")
        if faults.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.end_headers()
        if not body:
            return
        stall = faults.stall.get(name)
        flip = faults.corrupt.get(name)
        with target.open("rb") as handle:
            handle.seek(start)
            offset = start
            while offset < size:
                if stall is not None and offset >= stall and not faults.release.is_set():
                    faults.stalled.set()
                    faults.release.wait()
                end = size if cut is None or offset >= cut else min(size, cut)
                if cut is not None and offset >= cut:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                limit = min(CHUNK, end - offset)
                if stall is not None and offset < stall:
                    limit = min(limit, stall - offset)
                data = bytearray(handle.read(limit))
                if flip is not None and offset <= flip < offset + len(data):
                    data[flip - offset] ^= 0x01
                self.wfile.write(data)
                offset += len(data)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "3", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash")
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path],
                     addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A certificate for the IP addresses (default 127.0.0.1; a VM on QEMU's user network
    reaches this host as 10.0.2.2) signed by ca: (certificate, key)."""
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    names = ",".join(f"IP:{address}" for address in addresses)
    ext.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", "/CN=127.0.0.1")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "3", "-extfile", ext)
    return cert, key
