"""--bundle-url: the runtime fetches the bundle from a real HTTP(S) server on 127.0.0.1.

The server (tests/httpserver.py) serves the synthetic bundle; HTTPS uses a CA made here
with openssl. The runtime runs as on a device: only resin-migrate.pyz is on the disk.
Tests marked `loop` run stage 1 onto loop devices holding a Debian root (tests/rig).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.fetch import Fetcher, FetchError, RemoteFile
from runtime.manifest import load
from runtime.stream import write_stream
from tests.httpserver import BundleServer, Faults, make_ca, make_server_cert
from tests.rig.legacy import LegacySpec, attached, copy_legacy_image, mounted_root
from tests.test_stage1 import (
    MOUNT_OPTIONS,
    PYTHON,
    disk_digest,
    next_entry,
    read_device,
    sfdisk_dump,
    stream_bytes,
)
from tests.tools import blkid

ROOT = Path(__file__).resolve().parent.parent
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed; run ./setup.sh")
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory / "ca", "resin-migrate-test-ca")
    other = make_ca(directory / "other", "some-other-ca")
    return Pki(ca=ca[0], other_ca=other[0], server=make_server_cert(directory / "ca", ca))


@pytest.fixture
def pyz(tmp_path: Path, synthetic_bundle: Path) -> Path:
    """The runtime alone in a directory, as a user fetches it before --bundle-url."""
    directory = tmp_path / "tool"
    directory.mkdir()
    return Path(shutil.copy(synthetic_bundle / "resin-migrate.pyz", directory))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    return {**env, **(extra or {})}


def runtime(pyz: Path, url: str, *args: str, ca: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [PYTHON, str(pyz), "--bundle-url", url]
    if ca is not None:
        argv += ["--ca-file", str(ca)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=_env(env),
                          timeout=900)


# --- without root: the client alone (verify downloads and hashes every stream) -----------

def test_verify_over_https_with_the_ca(pki: Pki, pyz: Path, synthetic_bundle: Path) -> None:
    with BundleServer(synthetic_bundle, tls=pki.server) as server:
        result = runtime(pyz, server.url, "verify", ca=pki.ca)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok  flash-rootA.gz" in result.stdout


@pytest.mark.parametrize("ca", ["other", "system"])
def test_wrong_ca_is_refused_before_any_download(pki: Pki, pyz: Path, synthetic_bundle: Path,
                                                  ca: str) -> None:
    with BundleServer(synthetic_bundle, tls=pki.server) as server:
        result = runtime(pyz, server.url, "verify", ca=pki.other_ca if ca == "other" else None)
    output = result.stdout + result.stderr
    assert result.returncode == 7, output
    assert "certificate was not accepted" in output and "Traceback" not in output
    assert ("--ca-file " + str(pki.other_ca) if ca == "other" else "pass its certificate with "
            "--ca-file") in output
    assert not server.gets("flash-rootA.gz")


def test_plain_http_needs_the_flag(pyz: Path, synthetic_bundle: Path) -> None:
    with BundleServer(synthetic_bundle) as server:
        refused = runtime(pyz, server.url, "verify")
        assert refused.returncode == 7 and "--allow-http" in refused.stderr, refused.stderr
        assert not server.requests
        allowed = runtime(pyz, server.url, "--allow-http", "verify")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


def test_a_redirect_to_plain_http_is_refused(pki: Pki, pyz: Path,
                                             synthetic_bundle: Path) -> None:
    with BundleServer(synthetic_bundle) as plain:
        faults = Faults(redirect={"manifest.json": plain.url + "manifest.json"})
        with BundleServer(synthetic_bundle, tls=pki.server, faults=faults) as server:
            result = runtime(pyz, server.url, "verify", ca=pki.ca)
        assert not plain.requests
    assert result.returncode == 7, result.stdout + result.stderr
    assert f"{plain.url}manifest.json is plain HTTP" in result.stderr


TOKEN = "rmtest-bundle-token-0b7e4f19c2"


def _auth_file(tmp_path: Path, value: str, mode: int = 0o600) -> Path:
    path = tmp_path / "bundle.auth"
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def test_credentials_from_a_private_file_reach_the_server_only(pki: Pki, pyz: Path,
                                                               synthetic_bundle: Path,
                                                               tmp_path: Path) -> None:
    """--auth-file's header on every request to the bundle's server; none on a redirect to
    another server; the token in no output; without it the 401 is named."""
    auth = _auth_file(tmp_path, f"Bearer {TOKEN}")
    with BundleServer(synthetic_bundle, tls=pki.server) as other:
        faults = Faults(redirect={"SHA256SUMS": other.url + "SHA256SUMS"})
        with BundleServer(synthetic_bundle, tls=pki.server, faults=faults,
                          auth=f"Bearer {TOKEN}") as server:
            refused = runtime(pyz, server.url, "verify", ca=pki.ca)
            verified = runtime(pyz, server.url, "--auth-file", str(auth), "verify", ca=pki.ca)
            sent = [r.authorization for r in server.requests]
        received = [r.authorization for r in other.requests]
    assert refused.returncode == 7 and "401" in refused.stderr, refused.stderr
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"Bearer {TOKEN}" in sent and received and set(received) == {None}
    for result in (refused, verified):
        assert TOKEN not in result.stdout + result.stderr


def test_an_auth_file_others_can_read_is_refused(pki: Pki, pyz: Path, synthetic_bundle: Path,
                                                 tmp_path: Path) -> None:
    auth = _auth_file(tmp_path, f"Bearer {TOKEN}", mode=0o644)
    with BundleServer(synthetic_bundle, tls=pki.server) as server:
        result = runtime(pyz, server.url, "--auth-file", str(auth), "verify", ca=pki.ca)
        assert not server.requests
    assert result.returncode == 7, result.stdout + result.stderr
    assert "is readable by others (mode 644)" in result.stderr and "chmod 600" in result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_credentials_from_netrc(pki: Pki, pyz: Path, synthetic_bundle: Path,
                                tmp_path: Path) -> None:
    import base64
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login fleet password s3cret-pass\n")
    netrc.chmod(0o600)
    basic = "Basic " + base64.b64encode(b"fleet:s3cret-pass").decode()
    with BundleServer(synthetic_bundle, tls=pki.server, auth=basic) as server:
        result = runtime(pyz, server.url, "verify", ca=pki.ca, env={"NETRC": str(netrc)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cret-pass" not in result.stdout + result.stderr


def test_sizes_without_head(pki: Pki, pyz: Path, synthetic_bundle: Path) -> None:
    """A server refusing HEAD: the streams' sizes come from a GET of their first byte."""
    from runtime.source import RemoteBundle
    with BundleServer(synthetic_bundle, tls=pki.server, faults=Faults(head=False)) as server:
        bundle = RemoteBundle(server.url, Fetcher(ca_file=str(pki.ca)))
        described = bundle.check(bundle.manifest())
        assert [g.range for g in server.gets("flash-rootA.gz")] == ["bytes=0-0"]
    assert "3 streams on the server at their sizes" in described


def test_proxy_from_the_environment(pyz: Path, synthetic_bundle: Path) -> None:
    """http_proxy is used: the proxy (the test server, answering absolute URLs) gets every
    request, for a host that does not resolve."""
    with BundleServer(synthetic_bundle) as proxy:
        result = runtime(pyz, "http://bundle.invalid/nuc/", "--allow-http", "verify",
                         env={"http_proxy": f"http://127.0.0.1:{proxy.port}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert proxy.requests and all(request.absolute for request in proxy.requests)


def test_verify_resumes_a_cut_download(pki: Pki, pyz: Path, synthetic_bundle: Path) -> None:
    size = (synthetic_bundle / "flash-rootA.gz").stat().st_size
    faults = Faults(cut={"flash-rootA.gz": size // 3}, cuts=2, unavailable=1)
    with BundleServer(synthetic_bundle, tls=pki.server, faults=faults) as server:
        result = runtime(pyz, server.url, "verify", ca=pki.ca)
    assert result.returncode == 0, result.stdout + result.stderr
    gets = server.gets("flash-rootA.gz")
    # first GET cut, the resumed one cut at once, a 503, then the rest
    assert [g.range for g in gets] == [None] + [f"bytes={size // 3}-"] * 3
    assert all(g.if_range == server.etag("flash-rootA.gz") for g in gets[1:])
    assert "resuming at byte {}".format(size // 3) in result.stderr


# --- without root: the reader inside the stream writer, onto a regular file -----------

def _served_stream(tmp_path: Path, compression: str) -> tuple[Path, bytes, bytes]:
    """A directory holding one compressed stream: (directory, raw bytes, compressed)."""
    directory = tmp_path / "served"
    directory.mkdir()
    block = random.Random(3).randbytes(1 << 16)
    raw = b"".join(bytes([n]) + block for n in range(128))   # 8 MiB, compressible
    tool = ["gzip", "-n", "-c"] if compression == "gzip" else ["zstd", "-q", "-c"]
    packed = subprocess.run(tool, input=raw, capture_output=True, check=True).stdout
    (directory / "part.z").write_bytes(packed)
    return directory, raw, packed


def _write_from(server: BundleServer, raw: bytes, packed: bytes, compression: str,
                out: Path) -> RemoteFile:
    fetcher = Fetcher(allow_http=True, delay=0)
    reader = fetcher.open(server.url + "part.z", len(packed))
    write_stream(reader.url, compression, str(out), len(raw), hashlib.sha256(raw).hexdigest(),
                 sha256=hashlib.sha256(packed).hexdigest(), size=len(packed), reader=reader)
    return reader


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_write_stream_resumes_a_cut_download(tmp_path: Path, compression: str) -> None:
    directory, raw, packed = _served_stream(tmp_path, compression)
    faults = Faults(cut={"part.z": len(packed) // 2})
    with BundleServer(directory, faults=faults) as server:
        reader = _write_from(server, raw, packed, compression, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == raw
    assert reader.resumes == 1 and reader.offset == len(packed)


_WRITE_AND_REPORT = """
import hashlib, sys
from runtime.fetch import Fetcher
from runtime.stream import write_stream
url, size, raw_size, raw_sha256, sha256, out, ca = sys.argv[1:]
reader = Fetcher(ca_file=ca).open(url, int(size))
write_stream(url, "gzip", out, int(raw_size), raw_sha256, sha256=sha256, size=int(size),
             reader=reader)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def test_memory_stays_bounded_while_downloading(tmp_path: Path, pki: Pki) -> None:
    """A 64 MiB stream that does not compress, over HTTPS: the writing process's peak RSS
    stays far below the stream's size (chunks, never the whole stream). A bound, not a
    timing."""
    directory = tmp_path / "served"
    directory.mkdir()
    raw = random.Random(5).randbytes(64 << 20)
    packed = subprocess.run(["gzip", "-1", "-n", "-c"], input=raw, capture_output=True,
                            check=True).stdout
    (directory / "big.gz").write_bytes(packed)
    out = tmp_path / "out.img"
    with BundleServer(directory, tls=pki.server) as server:
        result = subprocess.run(
            [PYTHON, "-c", _WRITE_AND_REPORT, server.url + "big.gz", str(len(packed)),
             str(len(raw)), hashlib.sha256(raw).hexdigest(), hashlib.sha256(packed).hexdigest(),
             str(out), str(pki.ca)],
            capture_output=True, text=True, env=_env({"PYTHONPATH": str(ROOT)}), timeout=600)
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stdout.split()[-1])
    print(f"\npeak RSS writing a 64 MiB stream downloaded over HTTPS: {peak_kib / 1024:.1f} MiB")
    assert peak_kib < 40 * 1024
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(raw).hexdigest()


def test_a_restarted_server_is_resumed_from(tmp_path: Path) -> None:
    """The server cuts the stream and goes away (connections refused), then a new one
    comes up on the same port: the download goes on from where it was."""
    directory, raw, packed = _served_stream(tmp_path, "gzip")
    first = BundleServer(directory, faults=Faults(cut={"part.z": len(packed) // 2}))
    servers = [first.__enter__()]
    reasons = []

    class Restarting(Fetcher):
        def wait(self, url: str, failures: int, reason: str, where: str = "") -> None:
            reasons.append(reason)
            if failures == 1:      # the cut: the server goes down
                servers[0].__exit__(None, None, None)
            elif failures == 2:    # refused: it comes back
                servers[0] = BundleServer(directory, port=first.port).__enter__()
            Fetcher.wait(self, url, failures, reason, where)

    try:
        reader = Restarting(allow_http=True, delay=0).open(first.url + "part.z", len(packed))
        write_stream(reader.url, "gzip", str(tmp_path / "out.img"), len(raw),
                     hashlib.sha256(raw).hexdigest(), sha256=hashlib.sha256(packed).hexdigest(),
                     size=len(packed), reader=reader)
        assert [g.range for g in servers[0].gets("part.z")] == [f"bytes={len(packed) // 2}-"]
    finally:
        servers[0].__exit__(None, None, None)
    assert (tmp_path / "out.img").read_bytes() == raw
    assert reasons[0] == "the connection ended" and "cannot connect" in reasons[1]
    assert reader.resumes == 2


def test_a_server_ignoring_ranges_is_read_past(tmp_path: Path) -> None:
    directory, raw, packed = _served_stream(tmp_path, "gzip")
    faults = Faults(cut={"part.z": len(packed) // 2}, ranges=False)
    with BundleServer(directory, faults=faults) as server:
        reader = _write_from(server, raw, packed, "gzip", tmp_path / "out.img")
        assert [g.range for g in server.gets("part.z")] == [None, f"bytes={len(packed) // 2}-"]
    assert (tmp_path / "out.img").read_bytes() == raw and reader.resumes == 1


def test_a_file_replaced_during_the_download_is_refused(tmp_path: Path) -> None:
    directory, raw, packed = _served_stream(tmp_path, "gzip")
    faults = Faults(cut={"part.z": len(packed) // 2}, replaced_after_cut=True)
    with BundleServer(directory, faults=faults) as server, \
            pytest.raises(FetchError, match="the file changed on the server"):
        _write_from(server, raw, packed, "gzip", tmp_path / "out.img")


# --- on loop devices: stage 1 from a URL ------------------------------------------------

@dataclass
class Device:
    disk: str
    sysroot: Path
    image: Path
    pyz: Path

    def run(self, url: str, *args: str, ca: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return runtime(self.pyz, url, "--disk", self.disk, "--sysroot", str(self.sysroot),
                       *args, ca=ca, env=env)

    def local(self, *args: str) -> subprocess.CompletedProcess:
        """The runtime without --bundle-url (rollback, status, a resumed stage1)."""
        return subprocess.run([PYTHON, str(self.pyz), "--disk", self.disk, "--sysroot",
                               str(self.sysroot), *args], capture_output=True, text=True,
                              env=_env(), timeout=900)

    def partition(self, number: int) -> str:
        return f"{self.disk}p{number}"

    @property
    def log(self) -> str:
        return (self.sysroot / "var/log/resin-migrate.log").read_text()

    @property
    def state(self) -> dict:
        return json.loads((self.sysroot / "var/lib/resin-migrate/state.json").read_text())


@pytest.fixture
def device(tmp_path: Path, pyz: Path) -> Iterator[Device]:
    spec = LegacySpec()
    image = copy_legacy_image(spec, tmp_path / "disk.img")
    with attached(image, spec) as dev, mounted_root(dev, options=MOUNT_OPTIONS) as sysroot:
        yield Device(disk=dev.device, sysroot=sysroot, image=image, pyz=pyz)


def _assert_streams_written(device: Device, bundle: Path) -> None:
    """Each flash partition (found by label) holds its stream's bytes (compared by sha256:
    a failure must not diff megabytes)."""
    manifest = load(str(bundle))
    labels = {}
    for number in range(2, 8):
        if Path(device.partition(number)).exists():
            labels[blkid(Path(device.partition(number))).get("LABEL")] = number
    for label in ("flash-boot", "flash-rootA"):
        stream = manifest.stream(manifest.partition(label).stream)
        written = read_device(device.partition(labels[label]), stream.raw_size)
        assert hashlib.sha256(written).hexdigest() == \
            hashlib.sha256(stream_bytes(bundle, stream.file)).hexdigest() == \
            stream.raw_sha256, label


def _peak_kib(log: str) -> int:
    found = re.findall(r"peak memory of this process: (\d+) KiB", log)
    return int(found[-1])


@pytest.mark.loop
def test_stage1_from_https(device: Device, pki: Pki, synthetic_bundle: Path) -> None:
    size = (synthetic_bundle / "flash-rootA.gz").stat().st_size
    faults = Faults(stall={"flash-rootA.gz": size // 2})
    with BundleServer(synthetic_bundle, tls=pki.server, faults=faults) as server:
        checked = device.run(server.url, "check", ca=pki.ca)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "hashed as stage 1 writes them" in checked.stdout
        planned = device.run(server.url, "plan", ca=pki.ca)
        assert planned.returncode == 0, planned.stdout + planned.stderr
        assert f"download from {server.url} and write each stream" in planned.stdout
        # check and plan fetched the manifest and SHA256SUMS, asked the streams' sizes and
        # downloaded only the small probe of the kernel's filesystem (GRUB reads it)
        assert {(r.method, r.path.rsplit("/", 1)[1]) for r in server.requests} == {
            ("GET", "manifest.json"), ("GET", "SHA256SUMS"), ("HEAD", "flash-boot.gz"),
            ("HEAD", "flash-rootA.gz"), ("HEAD", "kernel-fs-probe.gz"),
            ("GET", "kernel-fs-probe.gz")}

        stage1 = subprocess.Popen(
            [PYTHON, str(device.pyz), "--bundle-url", server.url, "--ca-file", str(pki.ca),
             "--disk", device.disk, "--sysroot", str(device.sysroot), "stage1", "--yes"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        try:
            # halfway through flash-rootA.gz, the server holds the stream: status shows it
            assert faults.stalled.wait(600), "stage 1 never reached the middle of flash-rootA"
            status = device.local("status", "--json")
            assert status.returncode == 0, status.stderr
            progress = json.loads(status.stdout)["progress"]
            assert progress["what"] == "writing flash-rootA"
            assert progress["url"] == server.url + "flash-rootA.gz"
            assert progress["download_size"] == size
            assert "writing flash-rootA" in device.local("status").stdout
        finally:
            faults.release.set()
            out, err = stage1.communicate(timeout=900)
        assert stage1.returncode == 0, out + err
    _assert_streams_written(device, synthetic_bundle)
    log = device.log
    assert re.search(r"writing flash-rootA: 100% \(.*MiB/s, \d+ s left; downloaded "
                     r"\d+ of \d+ MiB\)", log), log
    state = device.state
    assert state["bundle_url"] == server.url and state["ca_file"] == str(pki.ca)
    assert state["progress"] is None
    assert next_entry(device.sysroot) == "resin-migrate-flasher"
    rates = re.findall(r"wrote (\d+) bytes to \S+, sha256 \w+ \((\d+) MB/s\)", log)
    print(f"\nstage1 over HTTPS from 127.0.0.1: wrote {rates}, peak RSS "
          f"{_peak_kib(log) / 1024:.1f} MiB")
    assert _peak_kib(log) < 64 * 1024


@pytest.mark.loop
def test_cut_connection_resumes_and_a_resumed_stage1_uses_the_recorded_url(
        device: Device, pki: Pki, synthetic_bundle: Path, tmp_path: Path) -> None:
    """Also behind credentials (--auth-file): the resumed stage1 reads the file it recorded;
    the token is in no output, log or state file."""
    boot = (synthetic_bundle / "flash-boot.gz").stat().st_size
    root = (synthetic_bundle / "flash-rootA.gz").stat().st_size
    faults = Faults(cut={"flash-boot.gz": boot // 2, "flash-rootA.gz": root // 3}, cuts=2,
                    unavailable=1)
    auth = _auth_file(tmp_path, f"Bearer {TOKEN}")
    with BundleServer(synthetic_bundle, tls=pki.server, faults=faults,
                      auth=f"Bearer {TOKEN}") as server:
        killed = device.run(server.url, "--auth-file", str(auth), "stage1", "--yes", ca=pki.ca,
                            env={"RESIN_MIGRATE_KILL_AFTER": "write:flash-boot"})
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert device.state["auth_file"] == str(auth)
        # no --bundle-url: stage 1 resumes from the URL (and CA, credentials) it recorded
        resumed = device.local("stage1", "--yes")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"bundle: {server.url}, the URL stage 1 started with" in resumed.stderr
    assert f"flash-boot.gz: resuming at byte {boot // 2}" in killed.stderr
    assert f"flash-rootA.gz: resuming at byte {root // 3}" in resumed.stderr
    ranges = [g.range for g in server.gets("flash-rootA.gz")]
    assert ranges == [None] + [f"bytes={root // 3}-"] * 3, ranges
    _assert_streams_written(device, synthetic_bundle)
    assert next_entry(device.sysroot) == "resin-migrate-flasher"
    for where in (killed.stdout + killed.stderr, resumed.stdout + resumed.stderr, device.log,
                  json.dumps(device.state)):
        assert TOKEN not in where


def _refused_and_rolled_back(device: Device, result: subprocess.CompletedProcess,
                             before: str, message: str) -> None:
    output = result.stdout + result.stderr
    print("\n" + result.stderr[-1500:])
    assert result.returncode == 11, output
    assert message in output and "Traceback" not in output
    assert "write:flash-rootA" not in device.state["done"]
    assert "interrupted after" in device.local("status").stdout
    rolled = device.local("rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert sfdisk_dump(device.disk) == before
    assert blkid(Path(device.partition(2)))["TYPE"] == "swap"
    assert next_entry(device.sysroot) is None


@pytest.mark.loop
def test_corrupted_stream_is_refused(device: Device, pki: Pki, synthetic_bundle: Path) -> None:
    size = (synthetic_bundle / "flash-rootA.gz").stat().st_size
    before = sfdisk_dump(device.disk)
    faults = Faults(corrupt={"flash-rootA.gz": size * 2 // 3})
    with BundleServer(synthetic_bundle, tls=pki.server, faults=faults) as server:
        checked = device.run(server.url, "check", ca=pki.ca)   # the size is right
        assert checked.returncode == 0, checked.stdout + checked.stderr
        result = device.run(server.url, "stage1", "--yes", ca=pki.ca)
    _refused_and_rolled_back(device, result, before, "nothing of it is accepted")
    assert re.search(r"flash-rootA.gz: (sha256 \w+ differs from the manifest's|not a valid "
                     r"gzip stream)", result.stderr), result.stderr


@pytest.mark.loop
def test_download_gives_up_after_the_retries(device: Device, pki: Pki,
                                             synthetic_bundle: Path) -> None:
    size = (synthetic_bundle / "flash-rootA.gz").stat().st_size
    before = sfdisk_dump(device.disk)
    faults = Faults(cut={"flash-rootA.gz": size // 2}, cuts=1000)
    with BundleServer(synthetic_bundle, tls=pki.server, faults=faults) as server:
        result = device.run(server.url, "--retries", "2", "stage1", "--yes", ca=pki.ca)
    _refused_and_rolled_back(device, result, before, "gave up after 3 attempts")
    assert len(server.gets("flash-rootA.gz")) == 3


@pytest.mark.loop
def test_wrong_ca_refuses_and_changes_nothing(device: Device, pki: Pki,
                                              synthetic_bundle: Path) -> None:
    before = disk_digest(device)
    with BundleServer(synthetic_bundle, tls=pki.server) as server:
        for command in (["check"], ["stage1", "--yes"]):
            result = device.run(server.url, *command, ca=pki.other_ca)
            output = result.stdout + result.stderr
            assert result.returncode == 10, output
            assert "certificate was not accepted" in output and "Traceback" not in output
    assert [r.path for r in server.requests] == []   # refused in the TLS handshake
    assert disk_digest(device) == before
    assert not (device.sysroot / "var/log/resin-migrate.log").exists()
    assert not (device.sysroot / "var/lib/resin-migrate").exists()
