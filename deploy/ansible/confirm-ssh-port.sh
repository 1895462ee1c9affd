#!/usr/bin/env bash
# A small local check for the role's confirmation hook (resin_migrate_confirm_command):
# exit 0 when the device at $RESIN_MIGRATE_ADDRESS answers as balenaOS does, with an SSH
# banner on port 22222 (meta-balena's sshd.socket: ListenStream=22222); the old system has
# no listener there. The role runs it on the controller until it succeeds or the time is up.
# A fleet API is a better hook: resin_migrate_confirm_url, see docs/fleet.md.
set -u
address=${RESIN_MIGRATE_ADDRESS:?the role sets RESIN_MIGRATE_ADDRESS}
port=${RESIN_MIGRATE_CONFIRM_PORT:-22222}
# shellcheck disable=SC2016  # $0 and $1 are the inner shell's: the address and the port
banner=$(timeout 10 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -c 8 <&3' "$address" "$port" \
    2>/dev/null) || exit 1
case $banner in
    SSH-*) exit 0 ;;
    *) exit 1 ;;
esac
