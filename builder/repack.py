"""The repack pipeline: a flasher image in, a migration bundle out.

expand the input -> read and check its table -> take out flash-boot and flash-rootA ->
recognise the release (version files) and its units -> complete the resinOS image for a
legacy BIOS where needed and compress it -> in flash-rootA: stage 2 and its unit, the
flasher's own flashing and registration units masked, the initramfs migrator's trigger
removed, shrink -> in flash-boot: the fleet's config.json (checked, without its installer
section) and network files -> compress each partition into the bundle -> manifest.json,
resin-migrate.pyz, SHA256SUMS -> rename into place.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime import __version__
from runtime.manifest import (
    COMPRESSIONS,
    FILE_PATTERN,
    MANIFEST_NAME,
    RUNTIME_NAME,
    SCHEMA_VERSION,
    Boot,
    DevicePartition,
    Flasher,
    InnerImage,
    Manifest,
    Source,
    dumps,
)

from . import fleetconfig, units
from .biosboot import complete_image
from .blockmap import ExtentReader, block_map
from .bootcfg import KernelEntry, first_kernel_entry
from .bundle import RUNTIME_DIR, Staging, build_pyz, check_output_dir, write_sums
from .compress import SUFFIX, Compressed, compress_chunks, compress_file
from .errors import FlasherLayoutError, OptionError, UnsupportedFlasherError, VerifyError
from .formats import expand, extract_range
from .fsedit import Entry, Ext4Image, FatImage, sha256_of
from .kernelprobe import PROBE_NAME, make_probe
from .layout import ReferenceLayout, check_labels, has_protective_mbr, read_layout
from .progress import Progress
from .release import FlasherRelease, recognise

STAGE2_SOURCE = RUNTIME_DIR / "resin-migrate-stage2"
STAGE2_UNIT_SOURCE = RUNTIME_DIR / units.STAGE2_UNIT
MIB = 1 << 20
# Free space left in flash-rootA after shrinking: the flasher runs from it.
ROOTFS_HEADROOM = 16 * MIB
PARTITION_ALIGN = 4 * MIB
NETWORK_FILE_LIMIT = 64 * 1024
# The partitions whose streams carry secrets: flash-boot holds config.json and the keyfiles.
SECRET_LABELS = ("flash-boot",)


@dataclass(frozen=True)
class BuildOptions:
    image: Path
    out: Path
    config: Path | None = None
    network: Path | None = None
    compression: str | None = None        # of the inner image; None: zstd if the flasher has it
    stream_compression: str = "gzip"      # of the partition streams the device decompresses
    force: bool = False
    workdir: Path | None = None


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    files: dict[str, int] = field(default_factory=dict)


def build(options: BuildOptions, progress: Progress) -> BuildResult:
    """Build the bundle into options.out; on any error nothing is left at options.out."""
    flasher_ref = ReferenceLayout.load("intel-nuc-flasher")
    resinos_ref = ReferenceLayout.load("resinos-image")
    roles = flasher_ref.roles
    _check_compression_option("--compression", options.compression, allow_none=True)
    _check_compression_option("--stream-compression", options.stream_compression)
    fleet_config = _read_config(options.config)
    network = _read_network(options.network)
    check_output_dir(options.out, options.force)
    workdir = options.workdir or options.out.resolve().parent
    workdir.mkdir(parents=True, exist_ok=True)

    with Staging(options.out, options.force) as staging, \
            tempfile.TemporaryDirectory(prefix=".resin-migrate-work-", dir=workdir) as tmp:
        work = Path(tmp)
        raw = expand(options.image, work, progress)
        # a protective MBR is enough: a damaged primary GPT header makes libparted fail
        layout = None if has_protective_mbr(raw.path) else read_layout(raw.path)
        if layout is None or layout.table == "gpt":
            raise UnsupportedFlasherError(
                f"{options.image}: a GPT partition table, as balena-generic's generic-amd64 "
                "images have (EFI only, signed): resin-migrate repacks the msdos, legacy-BIOS "
                "intel-nuc and genericx86-64-ext flashers; download one of those")
        check_labels(layout, flasher_ref, str(options.image), "an intel-nuc flasher image")

        images = {}
        for role in roles["device_partitions"]:
            if role["carry"]:
                part = layout.by_label(role["label"])
                images[role["label"]] = work / f"{role['label']}.img"
                extract_range(raw.path, part.start * layout.sector_size,
                              part.size * layout.sector_size, images[role["label"]], progress,
                              f"reading {role['label']}")
        if raw.path != options.image:
            raw.path.unlink()

        rootfs = Ext4Image(images["flash-rootA"], epoch=0, name=f"{options.image}:flash-rootA")
        rootfs.epoch = _last_write_time(rootfs)
        rootfs.check()
        bootfs = FatImage(images["flash-boot"], rootfs.epoch, name=f"{options.image}:flash-boot")
        release = recognise(_os_release(rootfs), bootfs.read_if("/device-type.json"),
                            str(options.image))
        progress.note(f"flasher: {release.describe()}")
        # a fleet of another device type is refused before the long work, not after it
        fleet = None if fleet_config is None else fleetconfig.for_resinos(
            fleet_config, release.slug, f"--config {options.config}", fleet=True)
        flag_file = _flag_file(bootfs, roles, release)
        found_units = units.recognise(units.read_units(rootfs), rootfs.name)
        inner, inner_path = _find_inner_image(rootfs, roles)
        if not any(rootfs.entry(path) for path in ("/bin/bash", "/usr/bin/bash")):
            raise FlasherLayoutError(f"{rootfs.name}: no /bin/bash; stage 2's unit runs it")
        decompressors = _flasher_decompressors(rootfs)
        compression = options.compression or ("zstd" if "zstd" in decompressors else "gzip")
        if compression not in decompressors:
            raise OptionError(f"--compression {compression}: the flasher's root filesystem has "
                              f"no {compression} binary, so stage 2 could not decompress the "
                              f"image; use --compression {decompressors[0]}")
        edits: list[str] = []
        inner_image, packed = _compress_inner(rootfs, bootfs, inner, inner_path, compression,
                                              resinos_ref, work, progress, str(options.image),
                                              edits)
        rootfs_size = _finish_rootfs(rootfs, roles, inner_image, packed, found_units, work,
                                     edits)

        edits += _edit_boot(bootfs, roles, release, fleet, network)
        kernel = _kernel_entry(bootfs, rootfs, roles)
        kernel_bytes = _kernel_bytes(bootfs, rootfs, kernel)

        partitions, streams = [], []
        for role in roles["device_partitions"]:
            label = role["label"]
            if not role["carry"]:
                partitions.append(DevicePartition(
                    label=label, fs=role["fs"], size=role["min_size_mib"] * MIB, flags=[],
                    grows=role.get("grows", False), stream=None))
                continue
            stream_name = label + SUFFIX[options.stream_compression]
            compressed = compress_file(images[label], staging.dir / stream_name,
                                       options.stream_compression, progress,
                                       f"compressing {label}")
            streams.append(compressed.stream())
            found = layout.by_label(label)
            size = rootfs_size if label == "flash-rootA" else found.size * layout.sector_size
            partitions.append(DevicePartition(
                label=label, fs=found.fs, size=size, flags=list(found.flags),
                grows=role.get("grows", False), stream=stream_name))
        probe_raw = work / f"{PROBE_NAME}.img"
        probe_sha256 = make_probe(bootfs if kernel.kernel_label == "flash-boot" else rootfs,
                                  kernel.kernel, probe_raw, rootfs.epoch)
        probe_name = PROBE_NAME + SUFFIX[options.stream_compression]
        streams.append(compress_file(probe_raw, staging.dir / probe_name,
                                     options.stream_compression, progress,
                                     f"compressing the probe of {kernel.kernel_label}'s "
                                     "filesystem").stream())

        manifest = Manifest(
            schema=SCHEMA_VERSION,
            builder_version=__version__,
            source=Source(name=_safe_name(options.image.name), format=raw.format.value,
                          sha256=raw.source_sha256),
            partitions=partitions,
            streams=streams,
            inner_image=inner_image,
            boot=Boot(kernel_label=kernel.kernel_label, kernel=kernel.kernel,
                      kernel_size=len(kernel_bytes),
                      kernel_sha256=hashlib.sha256(kernel_bytes).hexdigest(),
                      probe=probe_name, probe_sha256=probe_sha256,
                      initrd=kernel.initrd, cmdline=kernel.cmdline,
                      dropped_args=kernel.dropped, added_args=kernel.added),
            flasher=_flasher_record(release, flag_file, edits),
            flasher_decompressors=decompressors,
            network_files=sorted(network),
        )
        (staging.dir / MANIFEST_NAME).write_bytes(dumps(manifest))
        build_pyz(staging.dir / RUNTIME_NAME)
        # flash-boot's stream carries the fleet's config.json (its API key) and the WiFi
        # keys of --network: readable by its owner only, from here to the device (the
        # staging directory is 0700 until the bundle is in place)
        secret = {label + SUFFIX[options.stream_compression] for label in SECRET_LABELS}
        for path in staging.dir.iterdir():
            path.chmod(0o755 if path.name == RUNTIME_NAME else
                       0o600 if path.name in secret else 0o644)
        write_sums(staging.dir).chmod(0o644)
        files = {path.name: path.stat().st_size for path in sorted(staging.dir.iterdir())}
        staging.commit()
    return BuildResult(out=options.out, manifest=manifest, files=files)


def _os_release(rootfs: Ext4Image) -> str | None:
    """/etc/os-release, or /usr/lib/os-release where /etc has only a link to it."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        data = rootfs.read(path)
        if data is not None:
            return data.decode("utf-8", "replace")
    return None


def _flasher_record(release: FlasherRelease, flag_file: str, edits: list[str]) -> Flasher:
    return Flasher(release=release.release, meta_balena=release.meta_balena,
                   machine=release.machine, slug=release.slug, shape=release.shape.name,
                   flag_file=flag_file, edits=edits)


def _flag_file(bootfs: FatImage, roles: dict, release: FlasherRelease) -> str:
    """The flasher flag file flash-boot holds (its name changed in meta-balena v2.72.0)."""
    found = [path for path in roles["flag_files"] if bootfs.exists(path)]
    if not found:
        raise FlasherLayoutError(
            f"{bootfs.name}: neither {' nor '.join(roles['flag_files'])} flag file; this is a "
            f"balenaOS {release.release} image, not its flasher. Download the flasher image")
    return found[0]


def _signed(rootfs: Ext4Image, bootfs: FatImage, inner_path: str) -> str | None:
    """What shows the flasher is a signed (secure boot) build, if anything does: the image's
    signature beside it, the keys on flash-boot (meta-balena balena-image-flasher.bb adds
    both only with SIGN_API). Not grub.cfg_internal_luks: balena-intel puts it on every
    flasher from v2.87.26+rev1 (54726df)."""
    if rootfs.entry(inner_path + ".sig") is not None:
        return f"{inner_path}.sig beside the image"
    if bootfs.exists("/balena-keys"):
        return "/balena-keys on flash-boot"
    return None


def _check_compression_option(option: str, value: str | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in COMPRESSIONS:
        raise OptionError(f"{option} {value}: expected one of {', '.join(COMPRESSIONS)}")


def _read_config(path: Path | None) -> bytes | None:
    """The bytes of --config, parsed once here so that a bad file is refused before any work."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    fleetconfig.parse(data, f"--config {path}")
    return data


def _read_network(directory: Path | None) -> dict[str, bytes]:
    """NetworkManager keyfiles from --network DIR, by name."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise OptionError(f"--network {directory}: not a directory; give a directory of "
                          "NetworkManager keyfiles")
    files = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not FILE_PATTERN.match(path.name):
            raise OptionError(f"--network {directory}: {path.name!r} is not a plain file with a "
                              f"simple name ({FILE_PATTERN.pattern}); rename or remove it")
        if path.stat().st_size > NETWORK_FILE_LIMIT:
            raise OptionError(f"--network {directory}: {path.name} is larger than "
                              f"{NETWORK_FILE_LIMIT} bytes; a keyfile is a few hundred bytes")
        files[path.name] = path.read_bytes()
    if not files:
        raise OptionError(f"--network {directory}: the directory is empty")
    return files


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "image"
    return cleaned[:128]


def _last_write_time(rootfs: Ext4Image) -> int:
    """The input filesystem's last write time: the fixed clock of every edit."""
    stamp = rootfs.superblock().get("Last write time", "")
    try:
        return calendar.timegm(time.strptime(stamp, "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return 0


def _find_inner_image(rootfs: Ext4Image, roles: dict) -> tuple[Entry, str]:
    directory = roles["inner_image_dir"]
    listing = rootfs.list_dir(directory) if rootfs.entry(directory) else []
    images = [entry for entry in listing if entry.is_file
              and any(entry.name.endswith(suffix) for suffix in roles["inner_image_suffixes"])]
    if len(images) != 1:
        seen = ", ".join(entry.name for entry in listing) or "nothing"
        wanted = " or ".join(f"{directory}/*{suffix}" for suffix in roles["inner_image_suffixes"])
        raise FlasherLayoutError(
            f"{rootfs.name}: expected one resinOS image ({wanted}), found "
            f"{len(images)}; {directory} holds: {seen}. Use an unmodified flasher image.")
    return images[0], f"{directory}/{images[0].name}"


def _flasher_decompressors(rootfs: Ext4Image) -> list[str]:
    """The decompressors stage 2 will find in the booted flasher, gzip first."""
    found = []
    for tool in ("gzip", "zstd"):
        if any(rootfs.entry(f"{prefix}/{tool}") for prefix in ("/usr/bin", "/bin")):
            found.append(tool)
    if not found:
        raise FlasherLayoutError(f"{rootfs.name}: neither gzip nor zstd in /bin or /usr/bin; "
                                 "stage 2 could not decompress the resinOS image")
    return found


def _compress_inner(rootfs: Ext4Image, bootfs: FatImage, inner: Entry, inner_path: str,
                    compression: str, resinos_ref: ReferenceLayout, work: Path,
                    progress: Progress, image_name: str, edits: list[str]
                    ) -> tuple[InnerImage, Compressed]:
    """Replace the raw resinOS image in flash-rootA by its block map's bytes, compressed,
    after completing it for a legacy BIOS where it needs that (edits say what was done)."""
    signed = _signed(rootfs, bootfs, inner_path)
    if signed:
        raise UnsupportedFlasherError(
            f"{image_name}: a signed (secure boot) flasher ({signed}): the builder rewrites "
            "the image and its boot partition, which would break their signatures. Use the "
            "unsigned flasher of the same release")
    raw_copy = work / "inner.img"
    rootfs.dump(inner_path, raw_copy)
    inner_layout = read_layout(raw_copy)
    where = f"{image_name}:{inner_path}"
    check_labels(inner_layout, resinos_ref, where, "a resinOS image")
    edits += complete_image(raw_copy, inner_layout, bootfs, work, progress, where)
    data_label = resinos_ref.roles["data_label"]
    mapped = block_map(raw_copy, inner_layout, where)
    if data_label not in mapped.free_by_partition:
        raise FlasherLayoutError(f"{where}: {data_label} holds no filesystem the builder reads")
    progress.note(f"resinOS image: {mapped.mapped_bytes >> 20} MiB of {mapped.image_size >> 20} "
                  f"MiB in {len(mapped.extents)} extents hold data; the rest is free space")
    raw_sha256 = sha256_of(raw_copy)
    extents = ExtentReader(raw_copy, mapped.extents)
    packed = compress_chunks(iter(extents), mapped.mapped_bytes,
                             work / (inner.name + SUFFIX[compression]), compression, progress,
                             "compressing the resinOS image")
    raw_copy.unlink()
    packed_path = inner_path + SUFFIX[compression]
    mtime = rootfs.mtime(inner_path)
    rootfs.remove(inner_path)
    rootfs.put_file(packed.path, packed_path, inner.mode & 0o7777, inner.uid, inner.gid, mtime)
    image = InnerImage(path=packed_path, original_path=inner_path, compression=compression,
                       size=packed.size, sha256=packed.sha256, raw_size=mapped.image_size,
                       raw_sha256=raw_sha256, stream_size=packed.raw_size,
                       stream_sha256=packed.raw_sha256,
                       extents=[[extent.start, extent.length, digest] for extent, digest
                                in zip(mapped.extents, extents.sha256s, strict=True)],
                       layout=inner_layout, data_free=mapped.free_by_partition[data_label])
    return image, packed


def _finish_rootfs(rootfs: Ext4Image, roles: dict, inner: InnerImage, packed: Compressed,
                   found_units: units.FlasherUnits, work: Path, edits: list[str]) -> int:
    """Put stage 2 and its unit in place, mask the flasher's own units, take away the
    migrator's trigger, shrink, and prove every edit reads back; return the size."""
    stage2_path = roles["stage2_path"]
    rootfs.put_file(STAGE2_SOURCE, stage2_path, 0o755, 0, 0, rootfs.epoch)
    edits.append(f"installed stage 2 as {stage2_path}")
    edits += units.install(rootfs, found_units, STAGE2_UNIT_SOURCE, rootfs.epoch)
    # The initramfs migrator (meta-balena v2.113.0 on) takes over a flasher booted from the
    # only disk when the rootfs copy of flash-boot holds the flag file: without it, it
    # declines and systemd starts stage 2. Both names: the copy follows the boot files.
    copy_dir = roles["rootfs_boot_copy"]
    triggers = [copy_dir + path for path in roles["flag_files"]
                if rootfs.entry(copy_dir + path) is not None]
    for trigger in triggers:
        rootfs.remove(trigger)
        edits.append(f"removed {trigger} from flash-rootA: the initramfs migrator (2.113 "
                     "and later) takes over when it finds it")
    for directory in sorted({inner.path.rsplit("/", 1)[0], stage2_path.rsplit("/", 1)[0],
                             *(t.rsplit("/", 1)[0] for t in triggers)}):
        rootfs.touch_dir(directory, rootfs.epoch)
    rootfs.check()
    size = rootfs.shrink(ROOTFS_HEADROOM, PARTITION_ALIGN)
    rootfs.check()
    expected = {inner.path: packed.sha256, stage2_path: sha256_of(STAGE2_SOURCE)}
    for path, digest in expected.items():
        found = rootfs.file_sha256(path, work)
        if found != digest:
            raise VerifyError(f"{rootfs.name}: {path} reads back with sha256 {found}, "
                              f"expected {digest}")
    units.verify(rootfs, found_units, STAGE2_UNIT_SOURCE)
    left = [t for t in (copy_dir + path for path in roles["flag_files"])
            if rootfs.entry(t) is not None]
    if left:
        raise VerifyError(f"{rootfs.name}: {', '.join(left)} still there after removing it")
    packed.path.unlink()
    return size


def _edit_boot(bootfs: FatImage, roles: dict, release: FlasherRelease,
               fleet: tuple[bytes, list[str]] | None, network: dict[str, bytes]) -> list[str]:
    """config.json (fleet: the fleet's, as fleetconfig.for_resinos made it; else the
    flasher's own, checked against the device type, without its installer section) and the
    fleet's keyfiles on flash-boot."""
    own = roles["config_path"]
    if fleet is not None:
        data, edits = fleet[0], ["config.json: the fleet's, from --config", *fleet[1]]
    else:
        present = bootfs.read_if(own)
        if present is None:
            raise FlasherLayoutError(f"{bootfs.name}: no {own}; give the fleet's with --config")
        data, edits = fleetconfig.for_resinos(present, release.slug, f"{bootfs.name}{own}",
                                              fleet=False)
    if fleet is not None or edits:
        bootfs.put(data, own)
    if network:
        bootfs.mkdir(roles["network_dir"])
        for name, body in network.items():
            bootfs.put(body, f"{roles['network_dir']}/{name}")
        edits.append(f"{len(network)} keyfiles of --network in {roles['network_dir']}")
    bootfs.check()
    return edits


def _kernel_bytes(bootfs: FatImage, rootfs: Ext4Image, entry: KernelEntry) -> bytes:
    """The flasher's kernel, from the partition GRUB loads it from."""
    data = bootfs.read(entry.kernel) if entry.kernel_label == "flash-boot" else \
        rootfs.read(entry.kernel)
    if data is None:
        raise FlasherLayoutError(f"{rootfs.name}: {entry.kernel} is not a regular file")
    return data


def _kernel_entry(bootfs: FatImage, rootfs: Ext4Image, roles: dict) -> KernelEntry:
    """The flasher's kernel per its grub.cfg, checked to exist where GRUB will look."""
    cfg_path = next((path for path in roles["grub_cfgs"] if bootfs.exists(path)), None)
    if cfg_path is None:
        raise FlasherLayoutError(f"{bootfs.name}: no {' nor '.join(roles['grub_cfgs'])}; cannot "
                                 "tell how the flasher boots")
    text = bootfs.read(cfg_path).decode("utf-8", "replace")
    entry = first_kernel_entry(text, "flash-boot", f"{bootfs.name}{cfg_path}")
    present = {"flash-boot": lambda: bootfs.exists(entry.kernel),
               "flash-rootA": lambda: rootfs.entry(entry.kernel) is not None}
    if entry.kernel_label not in present or not present[entry.kernel_label]():
        raise FlasherLayoutError(f"{bootfs.name}{cfg_path}: boots {entry.kernel} from "
                                 f"{entry.kernel_label}, which the bundle does not hold there")
    return entry
