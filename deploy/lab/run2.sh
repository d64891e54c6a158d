#!/usr/bin/env bash
# Soft-RoCE lab, two-host mode: boots two QEMU guests ("hosts" A and B, full
# emulation, 1 CPU / 1G each) joined by a virtual wire (a QEMU dgram netdev
# pair on 127.0.0.1 UDP ports; the packets never leave the two QEMU
# processes), each with its own rxe0 on its virtio NIC, and runs one command
# on each, concurrently, from the current directory.
#
#   deploy/lab/run2.sh [--timeout SECS] [--loss PCT] [--log-dir DIR]
#                      [--memory 1G] [--cpus 1]
#                      [--kill-b-after SECS [--kill-b-marker NAME]
#                       [--restart-b "COMMAND B2"]]
#                      --a "COMMAND A" --b "COMMAND B"
#
#   --timeout SECS      guest-side limit for each command (default 600); A's
#                       must cover B's kill and restart when those are used
#   --loss PCT          netem: drop PCT% of the packets each NIC sends (both)
#   --log-dir DIR       a.log, b.log (and b2.log) go there (default: a new
#                       /tmp/zcmsg-lab.XXXXXX directory, printed at the end)
#   --kill-b-after SECS SIGKILL host B's qemu SECS seconds after B's command
#                       started (a host crash; A keeps running)
#   --kill-b-marker NAME  count those SECS from the moment B's command creates
#                       $ZCMSG_LAB_SHARED/NAME instead (e.g. once it is
#                       connected and streaming); no kill if it never does
#   --restart-b CMD     after that kill, boot B again (same NIC, MAC, address
#                       and wire) and run CMD there
#
# Commands are bash command strings. In the guests they see:
#   ZCMSG_LAB=1 ZCMSG_LAB_DEVICE=rxe0 ZCMSG_LAB_ROLE=a|b
#   ZCMSG_LAB_ADDR=192.0.2.1 (A) / 192.0.2.2 (B)   ZCMSG_LAB_PEER=the other
#   ZCMSG_LAB_GID_INDEX (RoCEv2 IPv4 GID of rxe0)  ZCMSG_LAB_NETDEV (the NIC)
#   ZCMSG_LAB_SHARED  a host directory both guests (and B's restart) can
#                     write, for marker files; empty at start
#   ZCMSG_LAB_INCARNATION  1, or 2 for the restarted B
#
# Exit status: 0 when A and B (the restarted B when --restart-b is used; B
# is ignored when killed without restart) both exit 0; otherwise the first
# failing side's code (124 timeout, 125 lab failure), with the reason and
# the tail of that side's log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

timeout_s=600 loss='' logdir='' mem=1G cpus=1 cmd_a='' cmd_b='' kill_after='' cmd_b2=''
kill_marker=''
have_a=0 have_b=0 have_b2=0
while [ $# -gt 0 ]; do
    case $1 in
    --timeout) timeout_s=${2:?}; shift 2 ;;
    --loss) loss=${2:?}; shift 2 ;;
    --log-dir) logdir=${2:?}; shift 2 ;;
    --memory) mem=${2:?}; shift 2 ;;
    --cpus) cpus=${2:?}; shift 2 ;;
    --a) cmd_a=${2?}; have_a=1; shift 2 ;;
    --b) cmd_b=${2?}; have_b=1; shift 2 ;;
    --kill-b-after) kill_after=${2:?}; shift 2 ;;
    --kill-b-marker) kill_marker=${2:?}; shift 2 ;;
    --restart-b) cmd_b2=${2?}; have_b2=1; shift 2 ;;
    -h | --help) usage ;;
    *) echo "run2.sh: unknown argument '$1'" >&2; usage ;;
    esac
done
if [ "$have_a" != 1 ] || [ "$have_b" != 1 ]; then
    echo "run2.sh: --a and --b are required" >&2
    usage
fi
case $timeout_s in '' | *[!0-9]*) lab_die "--timeout wants whole seconds, got '$timeout_s'" ;; esac
case $kill_after in *[!0-9]*) lab_die "--kill-b-after wants whole seconds, got '$kill_after'" ;; esac
case $loss in *[!0-9.]*) lab_die "--loss wants a percentage (e.g. 5 or 0.5), got '$loss'" ;; esac
if [ "$have_b2" = 1 ] && [ -z "$kill_after" ]; then
    lab_die "--restart-b needs --kill-b-after"
fi
if [ -n "$kill_marker" ] && [ -z "$kill_after" ]; then
    lab_die "--kill-b-marker needs --kill-b-after"
fi
case $kill_marker in */*) lab_die "--kill-b-marker wants a file name, got '$kill_marker'" ;; esac

lab_init
LAB_RUN=$(lab_mkrun)
trap lab_cleanup EXIT
trap 'lab_cleanup; exit 130' INT TERM
shared=$LAB_RUN/shared
mkdir -p "$shared"
[ -n "$logdir" ] || logdir=$LAB_RUN
mkdir -p "$logdir"
logdir=$(cd "$logdir" && pwd)

# Two free UDP ports on 127.0.0.1 for the wire (A listens on pa, B on pb).
udp_busy() { ss -Hlun 2>/dev/null | awk '{print $4}' | grep -q "[:.]$1\$"; }
for _ in $(seq 1 50); do
    pa=$((20000 + RANDOM % 40000)); pb=$((pa + 1))
    udp_busy "$pa" || udp_busy "$pb" || break
done
mac_a=52:54:00:00:00:01 mac_b=52:54:00:00:00:02
wire() { # wire LOCAL_PORT REMOTE_PORT MAC
    printf -- '-netdev dgram,id=wire0,local.type=inet,local.host=127.0.0.1,local.port=%s,remote.type=inet,remote.host=127.0.0.1,remote.port=%s -device virtio-net-pci,netdev=wire0,mac=%s' "$1" "$2" "$3"
}

# guest ROLE STATE_NAME INCARNATION COMMAND : writes the state dir, then boots.
guest() {
    local role=$1 sname=$2 inc=$3 cmd=$4 addr peer mac qopts
    if [ "$role" = a ]; then
        addr=192.0.2.1 peer=192.0.2.2 mac=$mac_a qopts=$(wire "$pa" "$pb" "$mac_a")
    else
        addr=192.0.2.2 peer=192.0.2.1 mac=$mac_b qopts=$(wire "$pb" "$pa" "$mac_b")
    fi
    local state=$LAB_RUN/$sname
    lab_write_env "$state" \
        ZCMSG_LAB_MODE=pair ZCMSG_LAB_ROLE="$role" ZCMSG_LAB_ADDR="$addr" \
        ZCMSG_LAB_PEER="$peer" ZCMSG_LAB_MAC="$mac" ZCMSG_LAB_LOSS="$loss" \
        ZCMSG_LAB_SHARED="$shared" LAB_TIMEOUT="$timeout_s" LAB_CWD="$PWD" \
        LAB_DEVICE_WAIT="$lab_device_wait"
    printf 'export ZCMSG_LAB_INCARNATION=%s\n' "$inc" >>"$state/env"
    printf '%s\n' "$cmd" >"$state/cmd"
    lab_guest "lab-$sname" "$state" "$logdir/$sname.log" "$mem" "$cpus" "$timeout_s" \
        "[$sname] " "$qopts"
}

lab_msg "wire: A 127.0.0.1:$pa <-> B 127.0.0.1:$pb; shared dir $shared${loss:+; loss $loss%}"
guest a a 1 "$cmd_a" & pid_a=$!
guest b b 1 "$cmd_b" & pid_b=$!

rc_b=0 b_killed=0
if [ -n "$kill_after" ]; then
    # Wait for B's command to start (or for B to end), then crash B.
    deadline=$(( $(date +%s) + lab_boot_timeout + lab_device_wait + 30 ))
    while kill -0 "$pid_b" 2>/dev/null && [ ! -e "$LAB_RUN/b/ready" ] \
        && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 0.5
    done
    if [ -e "$LAB_RUN/b/ready" ] && [ -n "$kill_marker" ]; then
        mdeadline=$(( $(date +%s) + timeout_s ))
        while kill -0 "$pid_b" 2>/dev/null && [ ! -e "$shared/$kill_marker" ] \
            && [ ! -e "$LAB_RUN/b/rc" ] && [ "$(date +%s)" -lt "$mdeadline" ]; do
            sleep 0.2
        done
        [ -e "$shared/$kill_marker" ] && lab_msg "B created $kill_marker; killing it in ${kill_after}s"
    fi
    if [ -e "$LAB_RUN/b/ready" ] && { [ -z "$kill_marker" ] || [ -e "$shared/$kill_marker" ]; }; then
        end=$(( $(date +%s) + kill_after ))
        while kill -0 "$pid_b" 2>/dev/null && [ ! -e "$LAB_RUN/b/rc" ] \
            && [ "$(date +%s)" -lt "$end" ]; do
            sleep 0.2
        done
        if [ ! -e "$LAB_RUN/b/rc" ] && [ -s "$LAB_RUN/b/qemu.pid" ]; then
            touch "$LAB_RUN/b/killed"
            lab_msg "killing host B (qemu pid $(cat "$LAB_RUN/b/qemu.pid")) ${kill_after}s after ${kill_marker:-its command started}"
            kill -KILL "$(cat "$LAB_RUN/b/qemu.pid")" 2>/dev/null || true
            b_killed=1
        else
            lab_msg "warning: B's command ended before --kill-b-after ${kill_after}s; nothing killed"
        fi
    else
        lab_msg "warning: B never started its command${kill_marker:+ or never created $kill_marker}; nothing killed"
    fi
fi
wait "$pid_b" || rc_b=$?
if [ "$b_killed" = 1 ]; then
    rc_b=0
    if [ "$have_b2" = 1 ]; then
        lab_msg "restarting host B"
        guest b b2 2 "$cmd_b2" & pid_b2=$!
        wait "$pid_b2" || rc_b=$?
    fi
fi
rc_a=0
wait "$pid_a" || rc_a=$?

b_last=b
[ "$b_killed" = 1 ] && [ "$have_b2" = 1 ] && b_last=b2
rc=0
if [ "$rc_a" != 0 ]; then
    lab_tail "$logdir/a.log" 40
    rc=$rc_a
fi
if [ "$rc_b" != 0 ]; then
    lab_tail "$logdir/$b_last.log" 40
    [ "$rc" != 0 ] || rc=$rc_b
fi
if [ "$rc" = 0 ]; then
    lab_msg "ok: A exit 0, B ($b_last) exit 0; logs in $logdir"
else
    lab_msg "FAILED: A exit $rc_a, B ($b_last) exit $rc_b; logs in $logdir"
fi
exit "$rc"
