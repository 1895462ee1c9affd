"""`invoke bench`: what a migration costs, each figure beside its baseline in the same run.

1. stage 2's final write (with and without its read-back) of a resinOS-shaped image onto
   a loop device, against the original method `gunzip -c image.gz | dd bs=4M conv=fsync`
   and a plain `dd` of the raw image (the device's sequential write limit);
2. stage 1's stream-write of flash-boot and flash-rootA, against `gunzip -c | dd`;
3. the bundle's size against the same flasher under `gzip -9` and `xz -6`, and the
   builder's wall time;
4. the peak RSS of stage 1's stream writer and of stage 2's writer on a 2 GiB image.

Every timed run starts from the same state: the page cache dropped, then the run's
input read once (all methods read warm input; all write to a cold device). Methods take
turns within each repetition; the median is reported with min and max.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from builder.progress import Progress
from builder.repack import BuildOptions, build
from runtime.manifest import load
from tests.bench import images
from tests.imagewrite import ROOT, loop_device, packed_image, stage2_write

MiB = 1 << 20
GiB = 1 << 30
TIME = "/usr/bin/time"


@dataclass
class Figure:
    """One measured quantity: its samples and unit (s, B, MiB)."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def text(self) -> str:
        if self.unit == "s":
            low, high = min(self.samples), max(self.samples)
            return f"{self.median:8.2f} s  [{low:.2f}-{high:.2f}]"
        if self.unit == "B":
            return f"{self.median / MiB:8.1f} MiB"
        return f"{self.median:8.1f} {self.unit}"


@dataclass
class Comparison:
    """A figure against a baseline: ratio = baseline / ours for times, ours / baseline else."""

    what: str
    ours: Figure
    baseline: Figure
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float:
        if self.ours.unit == "s":
            return self.baseline.median / self.ours.median
        return self.ours.median / self.baseline.median


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _warm(*paths: Path) -> None:
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(8 * MiB):
                pass


def _command(argv: list[str], env: dict | None = None) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)


def _timed(action: Callable[[], object], inputs: tuple[Path, ...]) -> float:
    """Seconds action takes, the page cache dropped and its inputs read once before."""
    _drop_caches()
    _warm(*inputs)
    started = time.monotonic()
    action()
    return time.monotonic() - started


def _peak_rss_mib(run: Callable[[tuple[str, ...]], object]) -> float:
    """Max RSS of the largest process that run(prefix) starts with prefix before its
    command (GNU time reports its children's peak)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        run((TIME, "-f", "%M", "-o", report.name))
        return int(report.read().split()[-1]) / 1024


def _stage2(device: str, packed: Path, inner: Any, work: Path, **options: Any) -> None:
    """Stage 2's writer (tests/imagewrite.py); raises when it fails."""
    result = stage2_write(device, packed, inner, work, **options)
    if result.returncode != 0:
        raise RuntimeError(f"stage 2's writer failed: {result.stderr}")


def _target(name: str, size: int) -> Path:
    path = images.bench_dir() / name
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def _stage1_writer(streams: list[tuple[Path, str, Any]]) -> list[str]:
    """argv of a process running stage 1's own writer and read-back for (file, device, stream)."""
    jobs = [(str(path), device, stream.compression, stream.raw_size, stream.raw_sha256)
            for path, device, stream in streams]
    code = ("import sys, json; from runtime.stream import write_stream, verify_device\n"
            "for path, dev, comp, size, sha in json.loads(sys.argv[1]):\n"
            "    write_stream(path, comp, dev, size, sha)\n"
            "    verify_device(dev, size, sha)\n")
    return [sys.executable, "-c", code, json.dumps(jobs)]


class Bench:
    def __init__(self, repeat: int, build_repeat: int, out: Callable[[str], None]) -> None:
        self.repeat = repeat
        self.build_repeat = build_repeat
        self.say = out
        self.comparisons: list[Comparison] = []
        self.facts: dict[str, object] = {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    # ------------------------------------------------------------------ inputs

    def inputs(self) -> None:
        self.say("inputs: the resinOS-shaped image, its flasher, the baselines (cached in "
                 f"{images.bench_dir()})")
        self.key = images.image_key()
        self.image = images.cached_image(self.key)
        self.flasher = images.cached_flasher(self.key, self.image)
        self.image_gz = images.cached_gzip(self.key, self.image, 6, "resinos")
        self.facts.update(image_bytes=self.image.stat().st_size,
                          flasher_bytes=self.flasher.stat().st_size,
                          image_gz_bytes=self.image_gz.stat().st_size)

    # ------------------------------------------------------------------ 3. bundle

    def bundle(self, build: bool = True) -> None:
        wall = Figure("builder wall time", "s")
        self.bundle_dir = images.bench_dir() / f"bundle-{self.key}"
        if not build and self.bundle_dir.exists():
            self.say(f"builder: not run; the bundle of an earlier run: {self.bundle_dir}")
        else:
            self.say("builder: building the bundle from the flasher")
            self.build_bundle(wall)
        self.builder_wall = wall
        size = Figure("bundle", "B", [sum(path.stat().st_size
                                            for path in self.bundle_dir.iterdir())])
        gzip9 = Figure("flasher | gzip -9", "B", [images.cached_size(
            self.key, "gzip-9", ["gzip", "-9", "-c"], self.flasher)])
        xz6 = Figure("flasher | xz -6", "B", [images.cached_size(
            self.key, "xz-6", ["xz", "-6", "-T1", "-c"], self.flasher)])
        ratio = size.median / gzip9.median
        self.comparisons += [
            Comparison("bundle size vs gzip -9", size, gzip9, "<= 0.8", ratio <= 0.8),
            Comparison("bundle size vs xz -6", size, xz6),
        ]
        self.facts["builder_wall_s"] = wall.samples
        self.manifest = load(str(self.bundle_dir))

    def build_bundle(self, wall: Figure) -> None:
        for _ in range(self.build_repeat):
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
            started = time.monotonic()
            build(BuildOptions(image=self.flasher, out=self.bundle_dir,
                               workdir=images.bench_dir()), Progress(quiet=True))
            wall.samples.append(time.monotonic() - started)

    # ------------------------------------------------------------------ 1. final write

    def final_write(self) -> None:
        inner = self.manifest.inner_image
        work = images.bench_dir() / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        packed = packed_image(self.bundle_dir, work)
        self.say(f"final write: {inner.stream_size / MiB:.0f} MiB in {len(inner.extents)} "
                 f"extents of a {inner.raw_size / MiB:.0f} MiB image; {self.repeat} rounds")
        target = _target("final-target.img", inner.raw_size)
        ours = Figure("stage 2: write + read-back", "s")
        ours_sha256sum = Figure("stage 2: write + read-back, sha256sum", "s")
        ours_write = Figure("stage 2: write only", "s")
        gunzip_dd = Figure("gunzip -c | dd bs=4M conv=fsync", "s")
        plain_dd = Figure("dd bs=4M conv=fsync of the raw image", "s")
        with loop_device(target) as device:
            for _ in range(self.repeat):
                for figure, mode, hasher in ((ours, "all", None),
                                             (ours_sha256sum, "all", "sha256sum"),
                                             (ours_write, "write", None)):
                    figure.samples.append(_timed(partial(
                        _stage2, device, packed, inner, work / "stage2", mode=mode,
                        hasher=hasher), (packed,)))
                gunzip_dd.samples.append(_timed(_command(
                    ["bash", "-c", f"set -o pipefail; gunzip -c {self.image_gz} | "
                     f"dd of={device} bs=4M conv=fsync 2>/dev/null"]), (self.image_gz,)))
                plain_dd.samples.append(_timed(_command(
                    ["dd", f"if={self.image}", f"of={device}", "bs=4M", "conv=fsync",
                     "status=none"]), (self.image,)))
        target.unlink()
        speed = inner.raw_size / plain_dd.median
        used = Figure("used bytes at plain dd speed", "s", [inner.stream_size / speed])
        self.comparisons += [
            Comparison("final write+verify vs gunzip|dd", ours, gunzip_dd, ">= 3",
                       gunzip_dd.median / ours.median >= 3),
            Comparison("  the same, hashing with sha256sum", ours_sha256sum, gunzip_dd, ">= 3",
                       gunzip_dd.median / ours_sha256sum.median >= 3),
            Comparison("final write only vs gunzip|dd", ours_write, gunzip_dd),
            Comparison("final write+verify vs used bytes at dd speed", ours, used,
                       ">= 0.77 (1.3x the time)", ours.median / used.median <= 1.3),
            Comparison("final write only vs used bytes at dd speed", ours_write, used,
                       ">= 0.77 (1.3x the time)", ours_write.median / used.median <= 1.3),
            Comparison("plain dd of the raw image (device limit)", plain_dd, plain_dd),
        ]
        self.facts.update(device_write_mib_s=speed / MiB, stream_bytes=inner.stream_size,
                          extents=len(inner.extents), raw_bytes=inner.raw_size)
        self.packed, self.work = packed, work

    # ------------------------------------------------------------------ 2. stage 1 streams

    def stage1_streams(self) -> None:
        labels = [part.label for part in self.manifest.partitions if part.stream]
        self.say(f"stage 1 stream-write: {', '.join(labels)}; {self.repeat} rounds")
        streams = [(self.bundle_dir / self.manifest.partition(label).stream,
                    self.manifest.stream(self.manifest.partition(label).stream))
                   for label in labels]
        targets = [_target(f"stage1-{label}.img", stream.raw_size)
                   for label, (_, stream) in zip(labels, streams)]
        ours = Figure("stage 1: write + read-back", "s")
        baseline = Figure("gunzip -c | dd bs=4M conv=fsync", "s")
        inputs = tuple(path for path, _ in streams)
        with loop_device(targets[0]) as first, loop_device(targets[1]) as second:
            devices = [first, second]
            argv = _stage1_writer([(path, device, stream)
                                   for (path, stream), device in zip(streams, devices)])
            pipeline = "; ".join(f"gunzip -c {path} | dd of={device} bs=4M conv=fsync "
                                 "2>/dev/null" for (path, _), device in zip(streams, devices))
            for _ in range(self.repeat):
                ours.samples.append(_timed(_command(argv, self.env), inputs))
                baseline.samples.append(_timed(_command(
                    ["bash", "-c", f"set -e -o pipefail; {pipeline}"]), inputs))
        for target in targets:
            target.unlink()
        self.comparisons.append(Comparison("stage 1 stream-write vs gunzip|dd", ours, baseline))

    # ------------------------------------------------------------------ 4. memory

    def memory(self) -> None:
        self.say("peak memory: stage 1's stream writer and stage 2's writer on a 2 GiB image")
        raw = images.bench_dir() / f"two-gib-{self.key}.raw"
        if not raw.exists():
            subprocess.run(["cp", "--sparse=always", str(self.image), str(raw)], check=True)
            with raw.open("r+b") as handle:
                handle.truncate(2 * GiB)
        gz = images.cached_gzip(self.key, raw, 1, "two-gib")
        zst = images.bench_dir() / f"two-gib-{self.key}.zst"
        if not zst.exists():
            subprocess.run(["zstd", "-q", "-3", "-T2", "-f", str(raw), "-o", str(zst)],
                           check=True)
        head, body, digest = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        with raw.open("rb") as handle:
            for offset, chunk in enumerate(iter(lambda: handle.read(4 * MiB), b"")):
                (head if offset == 0 else body).update(chunk)
                digest.update(chunk)
        target = _target("memory-target.img", 2 * GiB)
        with loop_device(target) as device:
            stream = SimpleNamespace(compression="gzip", raw_size=2 * GiB,
                                     raw_sha256=digest.hexdigest())
            argv = _stage1_writer([(gz, device, stream)])
            stage1 = _peak_rss_mib(lambda prefix: _command([*prefix, *argv], self.env)())
            whole = SimpleNamespace(  # the whole 2 GiB as extents, nothing skipped
                compression="zstd", raw_size=2 * GiB, stream_size=2 * GiB,
                extents=[[0, 4 * MiB, head.hexdigest()],
                         [4 * MiB, 2 * GiB - 4 * MiB, body.hexdigest()]])
            stage2_mib = _peak_rss_mib(lambda prefix: _stage2(
                device, zst, whole, self.work / "memory", mode="all", wrapper=prefix))
        target.unlink()
        limit = Figure("target", "MiB", [64])
        self.comparisons += [
            Comparison("peak RSS, stage 1 stream writer (2 GiB)", Figure("", "MiB", [stage1]),
                       limit, "< 64 MiB", stage1 < 64),
            Comparison("peak RSS, stage 2 writer (2 GiB)", Figure("", "MiB", [stage2_mib]),
                       limit, "< 64 MiB", stage2_mib < 64),
        ]

    # ------------------------------------------------------------------ report

    def table(self) -> str:
        lines = [f"{'figure':<46} {'ours':>30} {'baseline':>30} {'ratio':>7}  target",
                 "-" * 126]
        for item in self.comparisons:
            mark = {True: "met", False: "NOT met", None: ""}[item.met]
            lines.append(f"{item.what:<46} {item.ours.text():>30} {item.baseline.text():>30} "
                         f"{item.ratio:7.3f}  {item.target} {mark}".rstrip())
        if self.builder_wall.samples:
            lines.append(f"builder wall time: {self.builder_wall.text().strip()}")
        lines.append("ratio: baseline time / ours for times (higher is faster), ours / "
                     "baseline for sizes and memory")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "facts": self.facts,
            "comparisons": [
                {"what": item.what, "ours": item.ours.samples, "ours_median": item.ours.median,
                 "baseline": item.baseline.samples, "baseline_median": item.baseline.median,
                 "unit": item.ours.unit, "ratio": item.ratio, "target": item.target,
                 "met": item.met}
                for item in self.comparisons],
        }


PARTS = ("build", "final", "stage1", "memory")


def main(repeat: int = 3, build_repeat: int = 1, json_path: Path | None = None,
         only: tuple[str, ...] = PARTS, out: Callable[[str], None] = print) -> int:
    if os.geteuid() != 0:
        out("invoke bench needs root: it writes to loop devices and drops the page cache")
        return 2
    bench = Bench(repeat, build_repeat, out)
    unknown = set(only) - set(PARTS)
    if unknown:
        out(f"invoke bench: unknown part {', '.join(sorted(unknown))}; parts: {', '.join(PARTS)}")
        return 2
    bench.inputs()
    bench.bundle(build="build" in only)
    bench.final_write()
    if "stage1" in only:
        bench.stage1_streams()
    if "memory" in only:
        bench.memory()
    out("")
    out(bench.table())
    if json_path:
        json_path.write_text(json.dumps(bench.to_json(), indent=2, sort_keys=True) + "\n")
        out(f"figures written to {json_path}")
    return 0
