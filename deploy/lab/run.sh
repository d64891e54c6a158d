#!/usr/bin/env bash
# Soft-RoCE lab, single-guest mode: boots one QEMU guest (Debian's kernel,
# full emulation) over the host's root filesystem, creates rxe0 on a veth
# (192.0.2.1) and runs COMMAND there, from the current directory.
#
#   deploy/lab/run.sh [--timeout SECS] [--log FILE] [--memory 2G] [--cpus 2] -- COMMAND...
#
#   --timeout SECS   guest-side limit for COMMAND (default 600); the whole qemu
#                    run is bounded on the host too (boot + device + SECS + 60)
#   --log FILE       keep the guest's output there (default: a new file
#                    /tmp/zcmsg-lab.XXXXXX/console.log, path printed at the end)
#   --memory, --cpus guest size (default 2G, 2)
#
# In the guest COMMAND sees ZCMSG_LAB=1 ZCMSG_LAB_DEVICE=rxe0
# ZCMSG_LAB_ADDR=192.0.2.1 ZCMSG_LAB_GID_INDEX ZCMSG_LAB_NETDEV=veth0
# ZCMSG_LAB_SHARED (a host-writable directory). The root filesystem is the
# host's, read-only (/tmp, /var, /etc are throw-away overlays).
#
# Exit status: COMMAND's own, or 124 if it (or the whole run) timed out, or
# 125 if the lab failed (guest did not boot, rxe0 did not come up); the reason
# is printed, followed by the tail of the log. Works with no TTY and no stdin.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

timeout_s=600 log='' mem=2G cpus=2
while [ $# -gt 0 ]; do
    case $1 in
    --timeout) timeout_s=${2:?}; shift 2 ;;
    --timeout=*) timeout_s=${1#*=}; shift ;;
    --log) log=${2:?}; shift 2 ;;
    --log=*) log=${1#*=}; shift ;;
    --memory) mem=${2:?}; shift 2 ;;
    --memory=*) mem=${1#*=}; shift ;;
    --cpus) cpus=${2:?}; shift 2 ;;
    --cpus=*) cpus=${1#*=}; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "run.sh: unknown option '$1' (COMMAND goes after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || { echo "run.sh: no COMMAND given" >&2; usage; }
case $timeout_s in '' | *[!0-9]*) lab_die "--timeout wants whole seconds, got '$timeout_s'" ;; esac

lab_init
LAB_RUN=$(lab_mkrun)
trap lab_cleanup EXIT
trap 'lab_cleanup; exit 130' INT TERM
state=$LAB_RUN/guest
shared=$LAB_RUN/shared
mkdir -p "$state" "$shared"
if [ -z "$log" ]; then
    log=$LAB_RUN/console.log
else
    mkdir -p "$(dirname "$log")"
    : >"$log"
fi

lab_write_env "$state" \
    ZCMSG_LAB_MODE=single ZCMSG_LAB_ADDR=192.0.2.1 ZCMSG_LAB_SHARED="$shared" \
    LAB_TIMEOUT="$timeout_s" LAB_CWD="$PWD" LAB_DEVICE_WAIT="$lab_device_wait"
printf 'exec' >"$state/cmd"
printf ' %q' "$@" >>"$state/cmd"
printf '\n' >>"$state/cmd"

rc=0
lab_guest lab "$state" "$log" "$mem" "$cpus" "$timeout_s" "" || rc=$?
if [ "$rc" != 0 ]; then
    lab_tail "$log"
    lab_msg "FAILED: exit $rc${LAB_VERDICT:+: $LAB_VERDICT}; log $log"
else
    lab_msg "ok; log $log"
fi
exit "$rc"
