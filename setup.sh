#!/usr/bin/env bash
# Set up a development machine (Debian 12 / Ubuntu 22.04 or later): the system tools the
# builder and the tests drive, then .venv with the Python dependencies from pyproject.toml.
# Run as root, or as a user who may sudo. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

SYSTEM_PACKAGES=(
    # partition tables and filesystems, edited rootless
    parted fdisk util-linux e2fsprogs dosfstools mtools
    # compressors the builder, the runtime and stage 2 use
    gzip zstd xz-utils
    # input detection (python-magic) and the pyparted build
    file libmagic1 libparted-dev pkg-config gcc python3-dev python3-venv
    # the test rig: a legacy Debian root filesystem, QEMU for the VM tests, openssl for
    # the test CA of the --bundle-url tests, GRUB's i386-pc images (boot.img, grub-mkimage:
    # no bootloader is installed on this machine) for the synthetic images' boot code, and
    # systemctl (systemd) to read the flashers' units back
    debootstrap qemu-system-x86 qemu-utils openssl grub-pc-bin systemd
    # a /boot/grub on btrfs, which stage 1 must refuse (grub-probe says so)
    btrfs-progs
    # checks
    shellcheck
)

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null; then
    as_root=(sudo)
else
    echo "setup.sh: installing system packages needs root: run it as root or install sudo" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${SYSTEM_PACKAGES[@]}" >/dev/null

# The venv uses the distribution's Python, whose headers python3-dev provides.
PYTHON=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

# The runtime's tests also run on the oldest CPython pyenv holds (tasks.py OLD_PYTHON and
# OLD_VENV): a second venv with the last pytest for 3.6 (and the dataclasses backport the
# test helpers use); runtime/ itself needs nothing. pyenv cannot build one without the
# network, so a machine without it only gets a warning (and 'invoke test' skips those runs,
# except with CI=true).
OLD_PYTHON_VERSION=3.6.15
PYENV_ROOT=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
old_python="$PYENV_ROOT/versions/$OLD_PYTHON_VERSION/bin/python3"
if [ -x "$old_python" ]; then
    if [ ! -x .venv-py36/bin/python ]; then
        "$old_python" -m venv .venv-py36
    fi
    .venv-py36/bin/python -m pip install -q --upgrade 'pip<22'
    .venv-py36/bin/python -m pip install -q 'pytest>=7.0,<7.1' 'dataclasses==0.8'
else
    echo "setup.sh: warning: no Python $OLD_PYTHON_VERSION at $old_python: 'invoke test'" \
        "cannot run the runtime's tests on it (pyenv install $OLD_PYTHON_VERSION)" >&2
fi
echo "setup.sh: ready. Run the tests with: .venv/bin/invoke test"
