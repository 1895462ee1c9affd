"""Stage 1: from a running legacy system to a one-shot boot into the flasher.

Each step is recorded in the state file as started and as done; running stage1 again
after an interruption skips what is done and repeats the step that was under way (every
step can be repeated). `rollback` undoes whatever the state file says was started.
"""

import hashlib
import os
import shutil
import signal
import threading
import time

from . import backup as backup_module
from . import blockdev, bootcore, grub, log, system
from . import disk as disk_module
from . import plan as plan_module
from .bundle import sha256_file
from .device import Mounted, same_disk, unmount_stale
from .errors import MigrateError
from .files import read_text, write_atomic
from .manifest import MANIFEST_NAME
from .plan import Placement, PlanError, describe, place
from .preflight import Preflight, RefusedError, backup_room
from .run import run
from .source import LocalBundle, recorded_source
from .stage2env import render, stage2_values
from .stage2names import ARMED_MBR_NAME, ENV_NAME, GUARD_TIMEOUT, STAGE1_LOG_NAME
from .state import ARMED_MBR_COPY, FSTAB_MARK, SECTOR0_COPY, TABLE_COPY, State, SwapRecord, recorded
from .stream import verify_device, write_stream

MYPY = False
if MYPY:  # typing is not imported at run time (Python 3.4 devices)
    from typing import Any, Callable, List, Optional  # noqa: F401  # novermin

    from .layout import Partition  # noqa: F401
    from .manifest import Manifest  # noqa: F401

# The backup is taken last (step backup), so that what the device writes during the
# downloads and writes reaches resinOS; the script runs once first too (step plan), so that
# a backup the Supervisor could not restore, or too large, is refused before anything
# changes.
STEPS = ("plan", "save", "swapoff", "fstab", "partition", "write:flash-boot",
         "write:flash-rootA", "boot-core", "flash-data", "network", "backup", "grub",
         "complete")
# what running stage1 again after it completed (without a reboot) does once more
RETAKE_STEPS = ("backup", "grub", "complete")


class Stage1Error(MigrateError):
    """A step failed after the device was changed: `rollback` restores it."""

    exit_code = 11


class Options(object):
    def __init__(self, sysroot="/", bundle=".", disk=None, backup_script=None, yes=False,
                 reboot=False, confirm=None, source=None, network_ok=False,
                 guard_timeout=GUARD_TIMEOUT, backup_volumes=backup_module.DEFAULT_VOLUMES,
                 backup_timeout=backup_module.DEFAULT_TIMEOUT, before_backup=None):
        # type: (str, str, Optional[str], Optional[str], bool, bool, Optional[Callable], Optional[Any], bool, int, Any, int, Optional[str]) -> None  # noqa: E501
        self.sysroot = sysroot
        self.bundle = bundle
        # where the streams come from: the directory `bundle`, or a URL (RemoteBundle)
        self.source = source if source is not None else LocalBundle(bundle)
        self.disk = disk
        self.backup_script = backup_script
        self.backup_volumes = tuple(backup_volumes)
        self.backup_timeout = backup_timeout
        self.before_backup = before_backup  # a shell command run right before the capture
        self.yes = yes
        self.reboot = reboot
        self.confirm = confirm
        self.network_ok = network_ok    # go on when the network cannot be carried
        self.guard_timeout = guard_timeout


def run_stage1(options):
    # type: (Options) -> int
    state = State(options.sysroot)
    if state.exists and state.done("complete"):
        with grub.Chroot(options.sysroot) as chroot:
            armed = grub.next_entry(chroot) == grub.ENTRY_ID
        if not armed:
            raise RefusedError("stage 1 is complete but the one-shot GRUB entry was used "
                               "already (the flasher ran and this system came back?): run "
                               "'status' to read why, then 'rollback'")
        if not state.record.backup_script:
            log.log.info("stage 1 is already complete and the flasher boots next; run "
                         "'rollback' to undo it")
            if options.reboot and options.sysroot == "/":
                run(["reboot"])
            return 0
        # the backup is as old as that run: take it again (and arm the entry again), so
        # that what changed since reaches resinOS
        log.log.info("stage 1 is already complete and the flasher boots next; taking the "
                     "backup again (the last one is %s old)", _age(state.record.backup_taken))
        state.undo(RETAKE_STEPS)
    if state.exists and not state.done("save"):
        # Only the backup ran: nothing on the disk changed, so start again from the checks.
        state.retire("restarted")
        state = State(options.sysroot)
    resuming = state.exists
    if resuming:
        state.check_version()
        _resume_source(options, state)
    preflight = Preflight(options.sysroot, options.source, options.disk,
                          network_ok=options.network_ok)
    if resuming:
        state.lock()
        log.log.info("resuming stage 1 (done: %s)", ", ".join(state.record.done) or "nothing")
        manifest = _check_resumable(preflight, state)
        if not options.yes and not (options.confirm and options.confirm(None)):
            raise RefusedError("not confirmed (use --yes to resume without the question)")
    else:
        preflight.run()
        _log_checks(preflight)
        if not preflight.passed:
            raise RefusedError("the checks failed (see above); nothing was changed",
                               preflight.failures())
        manifest = _required(preflight.target.manifest, "manifest")
        if options.reboot and options.sysroot != "/":
            raise RefusedError("--reboot works only on the running system, not with --sysroot")
        if not options.yes and not (options.confirm and options.confirm(preflight)):
            raise RefusedError("not confirmed; nothing was changed (use --yes to skip the "
                               "question)")
        state.lock()
    log.open_file(system.in_root(options.sysroot, log.LOG_PATH))
    runner = Runner(options, state, manifest, preflight)
    runner.run_all()
    if options.reboot:
        log.log.info("rebooting into the flasher")
        run(["sync"])
        run(["reboot"])
    else:
        log.log.info("stage 1 complete: reboot to start the flasher (it boots once; if it "
                     "fails, the next boot is this system again)")
        if state.record.backup_script:
            log.log.info("the backup was taken at %s: what changes on this device after it "
                         "does not reach resinOS. Run stage1 again right before rebooting to "
                         "take it again (or use --reboot)", time.strftime(
                             "%Y-%m-%d %H:%M:%S", time.localtime(state.record.backup_taken)))
    return 0


def _resume_source(options, state):
    # type: (Options, State) -> None
    """Resume from the URL stage 1 started with when no other bundle is given: no
    --bundle-url, and no manifest.json in the bundle directory."""
    recorded = recorded_source(state.record)
    if recorded is None or options.source.remote or os.path.exists(
            os.path.join(options.bundle, MANIFEST_NAME)):
        return
    log.log.info("bundle: %s, the URL stage 1 started with", recorded.location)
    options.source = recorded


def _check_resumable(preflight, state):
    # type: (Preflight, State) -> Manifest
    preflight.check_root()
    preflight.check_bundle()
    try:
        same_disk(state, preflight.target.sysroot)
    except MigrateError as exc:
        preflight.add("same disk", False, str(exc))
    _log_checks(preflight)
    if not preflight.passed:
        raise RefusedError("cannot resume stage 1: the checks above failed")
    manifest = _required(preflight.target.manifest, "manifest")
    if manifest.inner_image.raw_sha256 != state.record.image_sha256:
        raise RefusedError("the bundle is not the one stage 1 started with; run 'rollback' "
                           "first, or use the bundle recorded in {}".format(state.path))
    return manifest


def _required(value, what):
    """A fact the checks found; its absence here is a bug, not a device problem."""
    if value is None:
        raise MigrateError("internal error: the checks did not find the {}".format(what))
    return value


def _log_checks(preflight):
    # type: (Preflight) -> None
    for check in preflight.checks:
        mark = {True: "ok", False: "FAIL", None: "info"}[check.ok]
        log.log.info("check %-18s %-4s %s%s", check.name, mark, check.found,
                     "; needed: " + check.needed if check.ok is False and check.needed else "")
        if check.ok is False and check.hint:
            log.log.info("      %s", check.hint)


class Runner(object):
    def __init__(self, options, state, manifest, preflight):
        # type: (Options, State, Manifest, Preflight) -> None
        self.options = options
        self.state = state
        self.manifest = manifest
        self.preflight = preflight
        self.sysroot = options.sysroot

    def run_all(self):
        # type: () -> None
        for step in STEPS:
            if self.state.done(step):
                continue
            name = "step_" + step.replace(":", "_").replace("-", "_")
            log.log.info("step %s", step)
            self.state.mark_started(step)
            try:
                if step.startswith("write:"):
                    self.step_write(step.split(":", 1)[1])
                else:
                    getattr(self, name)()
            except RefusedError:
                raise
            except backup_module.BackupError as exc:
                if step == "plan":      # the trial: nothing has changed yet
                    raise backup_module.BackupError("{} Nothing was changed.".format(
                        exc)) from exc
                raise Stage1Error("stage 1 failed at step {}: {}\nThe device still boots its "
                                  "own system. Fix that and run stage1 again (it takes the "
                                  "backup again), or run 'resin-migrate.pyz rollback'.".format(
                                      step, exc)) from exc
            except (MigrateError, EnvironmentError) as exc:
                raise Stage1Error("stage 1 failed at step {}: {}\nThe device still boots its "
                                  "own system. Run 'resin-migrate.pyz rollback' to undo stage "
                                  "1, or run stage1 again to retry.".format(step, exc)) from exc
            self.state.mark_done(step)
            log.log.debug("step %s done (peak memory so far: %s)", step, _peak_memory())
            if os.environ.get("RESIN_MIGRATE_KILL_AFTER") == step:
                # fault injection for the tests: die as a power cut or `kill -9` would
                os.kill(os.getpid(), signal.SIGKILL)

    # --- steps, each safe to repeat ---------------------------------------------------

    def step_plan(self):
        """Place the flash partitions; try the backup script once. What it leaves must be
        what the Supervisor restores and must fit in the image's resin-data: both are known
        here, before anything changes. The backup itself is taken again at the end."""
        target = self.preflight.target
        table = _required(target.table, "partition table")
        swap = _required(target.swap, "swap partition")
        reserve = 0
        if self.options.backup_script:
            try:
                archive = self._capture()
            except backup_module.BackupError:
                self.state.retire("refused")    # nothing else ran: the next stage1 starts anew
                raise
            reserve = os.path.getsize(archive)
            os.unlink(archive)
            log.log.info("backup: a trial run packs %d bytes; the backup is taken at the end "
                         "of stage 1", reserve)
            problem = self._too_large(reserve)
            if problem:
                self.state.retire("refused")
                raise RefusedError(problem + " The partitions were not changed.")
        try:
            placement = place(target.disk or "", table, swap, self.manifest, reserve)
        except PlanError as exc:
            self.state.retire("refused")
            raise RefusedError("{} The partitions were not changed.".format(exc)) from exc
        self.state.set(**self.backup_settings())
        self.state.set(backup_size=0, backup_sha256=None,
                       placement=placement.to_dict(), core_start=placement.core_start)

    def _capture(self):
        # type: () -> str
        """backup.tgz in the state directory, from the script stage 1 started with."""
        settings = self.backup_settings()
        return backup_module.capture(settings["backup_script"] or "", self.state.dir,
                                     settings["backup_volumes"], settings["backup_timeout"])

    def backup_settings(self):
        # type: () -> dict
        """The backup options of this run, else those stage 1 started with (a resumed or
        repeated stage1 need not give them again)."""
        given = {"backup_script": self.options.backup_script,
                 "backup_volumes": list(self.options.backup_volumes),
                 "backup_timeout": self.options.backup_timeout,
                 "before_backup": self.options.before_backup}
        if self.options.backup_script or not self.state.record.backup_script:
            return given
        return dict((name, getattr(self.state.record, name)) for name in given)

    def _too_large(self, size):
        # type: (int) -> str
        room = backup_room(self.manifest)
        if size <= room:
            return ""
        return ("the backup is {} MiB; resin-data in this resinOS image has room for {} MiB "
                "(stage 2 puts backup.tgz there before resinOS first boots; current images "
                "leave about 100 MiB). Back up less.".format(size >> 20, room >> 20))

    def step_save(self):
        target = self.preflight.target
        swap = _required(target.swap, "swap partition")
        table = _required(target.table, "partition table")
        disk = _required(target.disk, "disk")
        fstab_copy = self.state.file("fstab.orig")
        if not os.path.exists(fstab_copy):
            # on the disk before the fstab step edits the original: a copy left in the page
            # cache is empty after a power cut, and rollback would restore that
            fstab = system.in_root(self.sysroot, "etc/fstab")
            with open(fstab, "rb") as handle:
                write_atomic(fstab_copy, handle.read(), mode_from=fstab)
        sector0 = self.state.file(SECTOR0_COPY)   # rollback puts its boot code back
        if not os.path.exists(sector0):
            write_atomic(sector0, blockdev.read_sectors(disk, 0, 1))
        self.state.set(
            disk=disk, disk_sectors=table.disk_size, identity=disk_module.identity(disk),
            swap=SwapRecord(system.partition_path(disk, swap.number), swap.number,
                            uuid=target.swap_probe.get("UUID"),
                            label=target.swap_probe.get("LABEL"),
                            active=bool(target.swap_active),
                            fstab_line=target.fstab_swap.line if target.fstab_swap else None,
                            fstab_text=target.fstab_swap.text if target.fstab_swap else None),
            fstab_copy=fstab_copy, image_sha256=self.manifest.inner_image.raw_sha256,
            **self.options.source.to_state())

    def step_swapoff(self):
        swap = recorded(self.state.record.swap, "swap partition")
        if system.swap_in_use(swap.node) is not None:
            run(["swapoff", swap.node])
        log.log.info("swap %s is off", swap.node)

    def step_fstab(self):
        swap = recorded(self.state.record.swap, "swap partition")
        line = swap.fstab_line
        if line is None:
            log.log.info("/etc/fstab does not name the swap partition; left as it is")
            return
        text = recorded(swap.fstab_text, "swap's fstab line")
        path = system.in_root(self.sysroot, "etc/fstab")
        lines = read_text(path).splitlines(True)
        if line >= len(lines) or lines[line].rstrip("\n") not in (text, FSTAB_MARK + text):
            raise Stage1Error("/etc/fstab changed since stage 1 read it: line {} is no longer "
                              "{!r}; check it, then run rollback".format(line + 1, text))
        if not lines[line].startswith(FSTAB_MARK):
            lines[line] = FSTAB_MARK + lines[line]
            write_atomic(path, "".join(lines))
        log.log.info("/etc/fstab: swap line %d commented out (copy in %s)", line + 1,
                     self.state.record.fstab_copy)

    def step_partition(self):
        disk = same_disk(self.state, self.sysroot)
        swap = recorded(self.state.record.swap, "swap partition")
        if system.swap_in_use(swap.node) is not None or system.holders(swap.node):
            raise Stage1Error("{} is in use as swap again (a reboot re-enabled it?); run "
                              "stage1 again to switch it off, or rollback".format(swap.node))
        placement = self.placement()
        current = disk_module.read_table(disk)
        if current.entries() == placement.new.entries():
            log.log.info("the partition table already holds the flash partitions")
        elif current.entries() == placement.original.entries():
            copy = self.state.file(TABLE_COPY)
            if not os.path.exists(copy):    # kept from the first try: the disk's own bytes
                disk_module.save_records(copy, disk_module.records(
                    disk, placement.original, placement.new))
            disk_module.write_table(disk, placement.new)
        else:
            raise Stage1Error("the partition table of {} is neither the one stage 1 recorded "
                              "nor the one it writes; refusing to touch it".format(disk))
        disk_module.tell_kernel(disk, placement.new)
        for flash in placement.flash:
            log.log.info("partition %s: %s, sectors %d-%d (%d MiB)", flash.label,
                         system.partition_path(disk, flash.number), flash.start,
                         flash.end - 1, flash.size * 512 >> 20)

    def step_write(self, label):
        flash = self.flash(label)
        stream = self.manifest.stream(describe(flash, self.manifest)["stream"])
        device = system.partition_path(self.disk, flash.number)
        bundle = self.options.source
        source = bundle.stream_location(stream.file)
        # from a URL: downloaded as it is written, nothing stored on the device's disk
        reader = bundle.open_stream(stream)
        progress = _Progress("writing " + label, state=self.state, reader=reader)
        progress.record(0, stream.raw_size)
        progress.total = stream.raw_size
        if reader is not None:   # a slow link: progress at its cadence between writes too
            reader.on_read = progress.tick
        try:
            write_stream(source, stream.compression, device, stream.raw_size,
                         stream.raw_sha256, sha256=stream.sha256, size=stream.size,
                         progress=progress, reader=reader)
        except MigrateError as exc:
            if reader is not None:
                raise Stage1Error("{} (downloading from {}: {} of {} bytes read, {} "
                                  "resumes); nothing of it is accepted".format(
                                      exc, source, reader.offset, reader.size,
                                      reader.resumes)) from exc
            raise
        finally:
            if reader is not None:
                reader.close()
            self.state.set(progress=None)
        verify_device(device, stream.raw_size, stream.raw_sha256,
                      progress=_Progress("verifying " + label))
        log.log.info("%s written and read back: sha256 %s", label, stream.raw_sha256)

    def step_boot_core(self):
        """The flasher's own core.img into the MiB before the flash partitions, and the
        sector 0 that boots it (stage 2 writes that one), both made by the device's GRUB;
        the device's GRUB must read the flasher's kernel where the core.img looks for it."""
        boot = self.manifest.boot
        disk = self.disk
        number = self.flash(boot.kernel_label).number
        device = system.partition_path(disk, number)
        fs_uuid = disk_module.probe(device).get("UUID")
        if not fs_uuid:
            raise Stage1Error("{} ({}) has no filesystem UUID".format(device, boot.kernel_label))
        start = recorded(self.state.record.core_start, "core.img's sector")
        with grub.Chroot(self.sysroot) as chroot:
            grub.check_kernel_readable(chroot, self.sysroot, disk, number, boot)
            core = bootcore.place_core(bootcore.make_core(chroot, self.sysroot, boot, fs_uuid),
                                       start)
        if len(core) > plan_module.CORE_SECTORS * bootcore.SECTOR:
            raise Stage1Error("the flasher's core.img is {} KiB: more than the {} KiB kept "
                              "for it".format(len(core) >> 10, plan_module.CORE_SECTORS >> 1))
        with open(system.in_root(self.sysroot, bootcore.GRUB_DIR + "/boot.img"), "rb") as handle:
            boot_img = handle.read()
        armed = bootcore.armed_mbr(boot_img, blockdev.read_sectors(disk, 0, 1), start)
        blockdev.write_sectors(disk, start, core)
        write_atomic(self.state.file(ARMED_MBR_COPY), armed)
        self.state.set(core_sectors=len(core) // bootcore.SECTOR,
                       core_sha256=sha256_bytes(core), armed_mbr_sha256=sha256_bytes(armed))
        log.log.info("the flasher's core.img (%d KiB, finds %s by UUID %s) written at sector "
                     "%d; stage 2 makes sector 0 boot it before its first write",
                     len(core) >> 10, boot.kernel_label, fs_uuid, start)

    def step_flash_data(self):
        flash = self.flash("flash-data")
        device = system.partition_path(self.disk, flash.number)
        unmount_stale(self.disk)
        run(["mkfs.ext4", "-F", "-q", "-L", "flash-data", device])
        record = self.state.record
        values = stage2_values(self.manifest, self.placement(),
                               recorded(record.disk_sectors, "disk size"), record.backup_size,
                               record.backup_sha256, record.core_facts(),
                               self.options.guard_timeout)
        with Mounted(device) as mountpoint:
            # the bytes the checks validated (from a URL: as fetched then)
            with open(os.path.join(mountpoint, MANIFEST_NAME), "wb") as handle:
                handle.write(self.options.source.manifest_bytes())
            write_atomic(os.path.join(mountpoint, ENV_NAME), render(values))
            shutil.copyfile(self.state.file(ARMED_MBR_COPY),
                            os.path.join(mountpoint, ARMED_MBR_NAME))
            self.copy_log(mountpoint)
        log.log.info("flash-data: stage 2 inputs written on %s", device)

    def step_network(self):
        """The detected network keyfiles into flash-data's system-connections/ (0600);
        stage 2 copies them to resin-boot, then the fleet's from flash-boot over them."""
        from .netconfig import carry, keyfile
        plan = self.preflight.target.network
        if plan is None:  # resumed: the checks did not run in this process
            plan = carry.device_plan(self.sysroot, carry.fleet_keyfiles(self.manifest))
        device = system.partition_path(self.disk, self.flash("flash-data").number)
        with Mounted(device) as mountpoint:
            directory = os.path.join(mountpoint, carry.KEYFILE_DIR)
            keyfile.write_all(plan.texts(), directory)
            for line in plan.lines():
                log.log.info("network: %s", line)
            self.copy_log(mountpoint)
        log.log.info("flash-data: %d network keyfile(s) in %s/", len(plan.keyfiles),
                     carry.KEYFILE_DIR)

    def step_backup(self):
        """The backup, taken last: the command that makes the data consistent (stopping
        the app, say), the script, the archive onto flash-data (0600, read back), the size
        and sha256 into stage2.env. Repeated when stage1 runs again."""
        settings = self.backup_settings()
        if not settings["backup_script"]:
            log.log.info("backup: no --backup-script; resinOS starts without a backup")
            return
        self.state.record.update(**settings)    # a repeated stage1 may name another script
        if settings["before_backup"]:
            _before_backup(settings["before_backup"], settings["backup_timeout"])
        archive = self._capture()
        size, sha256 = os.path.getsize(archive), sha256_file(archive)[1]
        problem = self._too_large(size)
        if problem:
            os.unlink(archive)
            raise Stage1Error(problem + " Make the backup smaller and run stage1 again (it "
                              "takes the backup again), or rollback.")
        device = system.partition_path(self.disk, self.flash("flash-data").number)
        with Mounted(device) as mountpoint:
            copy = os.path.join(mountpoint, backup_module.BACKUP_NAME)
            free = _free_bytes(mountpoint) + (os.path.getsize(copy)
                                              if os.path.exists(copy) else 0)
            if size > free:
                os.unlink(archive)
                raise Stage1Error("the backup is {} MiB; flash-data has {} MiB free. Make the "
                                  "backup smaller and run stage1 again, or rollback".format(
                                      size >> 20, free >> 20))
            shutil.copyfile(archive, copy)
            os.chmod(copy, backup_module.ARCHIVE_MODE)
            if sha256_file(copy)[1] != sha256:
                raise Stage1Error("{} on flash-data reads back different".format(copy))
            values = stage2_values(self.manifest, self.placement(),
                                   recorded(self.state.record.disk_sectors, "disk size"),
                                   size, sha256, self.state.record.core_facts(),
                                   self.options.guard_timeout)
            write_atomic(os.path.join(mountpoint, ENV_NAME), render(values))
            self.copy_log(mountpoint)
        os.unlink(archive)      # stage 2 reads the copy on flash-data
        self.state.set(backup_size=size, backup_sha256=sha256, backup_taken=int(time.time()))
        log.log.info("backup: backup.tgz (%d bytes, sha256 %s) on flash-data", size, sha256)

    def step_grub(self):
        boot = self.manifest.boot
        device = system.partition_path(self.disk, self.flash(boot.kernel_label).number)
        fs_uuid = disk_module.probe(device).get("UUID")
        if not fs_uuid:
            raise Stage1Error("{} ({}) has no filesystem UUID".format(device, boot.kernel_label))
        grub.arm(self.sysroot, boot, fs_uuid)
        log.log.info("GRUB: entry %s armed for the next boot only (kernel %s on %s, "
                     "search --fs-uuid %s)", grub.ENTRY_ID, boot.kernel, boot.kernel_label,
                     fs_uuid)

    def step_complete(self):
        flash = self.flash("flash-data")
        device = system.partition_path(self.disk, flash.number)
        with Mounted(device) as mountpoint:
            log.log.info("stage 1 finished (peak memory of this process: %s); log copied to "
                         "flash-data", _peak_memory())
            self.copy_log(mountpoint)

    # --- helpers ----------------------------------------------------------------------

    @property
    def disk(self):
        # type: () -> str
        """The disk step save recorded."""
        return recorded(self.state.record.disk, "disk")

    def placement(self):
        # type: () -> Placement
        return Placement.from_dict(recorded(self.state.record.placement, "placement"))

    def flash(self, label):
        # type: (str) -> Partition
        try:
            return self.placement().partition(label)
        except PlanError as exc:
            raise Stage1Error(str(exc)) from exc

    def copy_log(self, mountpoint):
        # type: (str) -> None
        path = log.file_path()
        if path:
            shutil.copyfile(path, os.path.join(mountpoint, STAGE1_LOG_NAME))


def sha256_bytes(data):
    # type: (bytes) -> str
    return hashlib.sha256(data).hexdigest()


def _before_backup(command, timeout):
    # type: (str, int) -> None
    """--before-backup: run by the shell, bounded like the script, its output in the log."""
    result = run(["sh", "-c", command], check=False, timeout=timeout)
    for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        for line in text.splitlines():
            log.log.info("before-backup %s: %s", stream, line)
    if result.timed_out or result.returncode != 0:
        raise Stage1Error("--before-backup {!r} {}; run stage1 again once it works, or "
                          "rollback".format(command, "did not end within {} s".format(timeout)
                                            if result.timed_out else "failed (exit code {})"
                                            .format(result.returncode)))


def _free_bytes(path):
    # type: (str) -> int
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def _age(taken):
    # type: (Optional[int]) -> str
    if not taken:
        return "unknown"
    seconds = max(0, int(time.time()) - int(taken))
    return "{} min".format(seconds // 60) if seconds >= 120 else "{} s".format(seconds)


def _peak_memory():
    # type: () -> str
    """This program's peak resident memory (the device may have little RAM and no swap).

    VmHWM, not getrusage's ru_maxrss: the latter also counts what the parent process held
    before it started this program.
    """
    for line in system.read_text("/proc/self/status", "").splitlines():
        if line.startswith("VmHWM:"):
            return "{} KiB".format(line.split()[1])
    return "unknown"


class _Progress(object):
    """Logs a long step's progress at a steady cadence (every 5 s) with rate and ETA; with
    a state, also records it there (`status --json` shows it); with a download's reader,
    also the compressed bytes downloaded and the resumes."""

    def __init__(self, what, every=5.0, state=None, reader=None):
        # type: (str, float, Optional[State], Optional[Any]) -> None
        self.what = what
        self.every = every
        self.started = time.time()
        self.last = 0.0
        self.state = state
        self.reader = reader
        self.done = 0
        self.total = 0

    def tick(self):
        # type: () -> None
        """Between two calls from the writer: log again if the cadence says so (not from
        the thread feeding zstd: the state file has one writer)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if self.total and time.time() - self.last >= self.every:
            self(self.done, self.total)

    def __call__(self, done, total):
        # type: (int, int) -> None
        self.done, self.total = done, total
        now = time.time()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0
        reader = self.reader
        fetched = "" if reader is None else "; downloaded {} of {} MiB{}".format(
            reader.offset >> 20, reader.size >> 20,
            ", {} resumes".format(reader.resumes) if reader.resumes else "")
        log.log.info("%s: %d%% (%d of %d MiB, %.1f MiB/s, %d s left%s)", self.what,
                     100 * done // max(total, 1), done >> 20, total >> 20, rate / (1 << 20),
                     eta, fetched, extra=log.PROGRESS)
        self.record(done, total, rate, eta, now)

    def record(self, done, total, rate=0.0, eta=0.0, now=None):
        # type: (int, int, float, float, Optional[float]) -> None
        """Into the state file, for `status --json` (from the start of the step on)."""
        if self.state is None:
            return
        record = {"what": self.what, "percent": 100 * done // max(total, 1), "done": done,
                  "total": total, "bytes_per_second": int(rate), "eta_seconds": int(eta),
                  "updated": int(now or time.time())}
        reader = self.reader
        if reader is not None:
            record.update(url=reader.url, downloaded=reader.offset,
                          download_size=reader.size, resumes=reader.resumes)
        self.state.set(progress=record)
