"""What stage 1 and stage 2 share by name: the files on flash-data and stage 2's phases.

Defined once here for the Python side; runtime/resin-migrate-stage2 is bash and keeps its
own copies, which tests/test_stage2_names.py pins to these.
"""

ENV_NAME = "stage2.env"                     # stage 2's inputs (runtime/stage2env.py)
JOURNAL_NAME = "stage2.journal"             # what stage 2 has done, across boots
LOG_NAME = "resin-migrate-stage2.log"       # stage 2's log on flash-data
BOOT_LOG_NAME = "resin-migrate.log"         # its copy on the new resin-boot
STAGE1_LOG_NAME = "resin-migrate-stage1.log"  # stage 1's log on flash-data
# The sector 0 that boots the flasher's own core.img (stage 1 writes it to flash-data,
# stage 2 puts it in place before its first write), and sector 0 as stage 2 found it.
ARMED_MBR_NAME = "stage2-mbr-armed.bin"
SAVED_MBR_NAME = "stage2-mbr-saved.bin"
FAULTS_NAME = "stage2.faults"               # fault injection points, for the tests only

# Stage 2's phases, in order; "write-body" is the point of no return.
PHASES = ("checks", "arm-boot", "write-body", "verify", "payload", "write-head", "finish")
# Boots of the flasher stage 2 makes at most after its point of no return before it stops
# and stays up with its log (each boot resumes from the journal).
MAX_BOOTS = 4
# Writes of one extent (or of the image's first 4 MiB) in one boot, when it reads back
# different, before stage 2 gives up that boot.
WRITE_TRIES = 3
# Seconds stage 2's guard allows by default (stage2.env RM_GUARD_TIMEOUT; stage1
# --stage2-timeout): for all of its checks (after them it brings the old system back), and
# for any later step without progress (after that it reboots the flasher, which resumes).
GUARD_TIMEOUT = 900
