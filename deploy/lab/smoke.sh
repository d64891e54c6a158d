#!/usr/bin/env bash
# Proves the Soft-RoCE lab works, with one guest boot per mode:
#   1. single guest (run.sh): ibv_devices, ibv_devinfo -d rxe0, and an
#      ib_send_lat server/client pair over rxe0 on 192.0.2.1;
#   2. two hosts (run2.sh): ib_write_bw from B (192.0.2.2) to A (192.0.2.1)
#      across the virtual wire, after a ping over it.
# Exits 0 only if everything worked; prints per-mode results and times.
#
#   deploy/lab/smoke.sh [--log-dir DIR]
#
# (smoke.sh --guest-single|--guest-a|--guest-b are its in-guest halves.)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
perf_timeout=120   # each perftest process, in the guest

# Wait (bounded) until something listens on TCP port $1 (perftest's
# out-of-band exchange uses 18515).
wait_listen() {
    local _
    for _ in $(seq 1 120); do
        ss -Hltn 2>/dev/null | awk '{print $4}' | grep -q "[:.]$1\$" && return 0
        sleep 0.5
    done
    echo "smoke: nothing listens on port $1 after 60s" >&2
    return 1
}

guest_single() {
    echo "== ibv_devices"
    ibv_devices | tee /dev/stderr | grep -qw "$ZCMSG_LAB_DEVICE"
    echo "== ibv_devinfo -d $ZCMSG_LAB_DEVICE"
    ibv_devinfo -d "$ZCMSG_LAB_DEVICE" | tee /dev/stderr | grep -q PORT_ACTIVE
    echo "== ib_send_lat -d $ZCMSG_LAB_DEVICE -x $ZCMSG_LAB_GID_INDEX (server + client on $ZCMSG_LAB_ADDR)"
    timeout "$perf_timeout" ib_send_lat -d "$ZCMSG_LAB_DEVICE" -x "$ZCMSG_LAB_GID_INDEX" -n 500 \
        >"$ZCMSG_LAB_SHARED/send_lat_server.txt" 2>&1 &
    local srv=$! c=0 s=0
    wait_listen 18515 || { kill "$srv" 2>/dev/null; return 1; }
    sleep 1
    timeout "$perf_timeout" ib_send_lat -d "$ZCMSG_LAB_DEVICE" -x "$ZCMSG_LAB_GID_INDEX" -n 500 \
        "$ZCMSG_LAB_ADDR" || c=$?
    wait "$srv" || s=$?
    echo "-- server output:"
    cat "$ZCMSG_LAB_SHARED/send_lat_server.txt"
    echo "ib_send_lat: client exit $c, server exit $s"
    [ "$c" = 0 ] && [ "$s" = 0 ]
}

guest_a() {
    echo "== host A ($ZCMSG_LAB_ADDR): ib_write_bw server"
    timeout "$perf_timeout" ib_write_bw -d "$ZCMSG_LAB_DEVICE" -x "$ZCMSG_LAB_GID_INDEX" &
    local srv=$! s=0
    wait_listen 18515 || { kill "$srv" 2>/dev/null; return 1; }
    touch "$ZCMSG_LAB_SHARED/a-listening"
    # If B gives up, do not sit out the whole perftest timeout.
    local grace=30
    while kill -0 "$srv" 2>/dev/null; do
        if [ -e "$ZCMSG_LAB_SHARED/b-done" ]; then
            grace=$((grace - 1))
            [ "$grace" -gt 0 ] || { echo "smoke: B finished, server still waiting" >&2; kill "$srv"; break; }
        fi
        sleep 1
    done
    wait "$srv" || s=$?
    echo "ib_write_bw server: exit $s"
    return "$s"
}

guest_b() {
    trap 'touch "$ZCMSG_LAB_SHARED/b-done"' EXIT
    echo "== host B ($ZCMSG_LAB_ADDR): waiting for A's server"
    local _
    for _ in $(seq 1 600); do
        [ -e "$ZCMSG_LAB_SHARED/a-listening" ] && break
        sleep 0.5
    done
    [ -e "$ZCMSG_LAB_SHARED/a-listening" ] || { echo "smoke: A's server never came up" >&2; return 1; }
    ping -c 2 -W 10 "$ZCMSG_LAB_PEER"
    sleep 1
    echo "== ib_write_bw -d $ZCMSG_LAB_DEVICE -x $ZCMSG_LAB_GID_INDEX $ZCMSG_LAB_PEER"
    local c=0
    timeout "$perf_timeout" ib_write_bw -d "$ZCMSG_LAB_DEVICE" -x "$ZCMSG_LAB_GID_INDEX" "$ZCMSG_LAB_PEER" || c=$?
    echo "ib_write_bw client: exit $c"
    return "$c"
}

case ${1:-} in
--guest-single) guest_single; exit ;;
--guest-a) guest_a; exit ;;
--guest-b) guest_b; exit ;;
esac

logdir=''
while [ $# -gt 0 ]; do
    case $1 in
    --log-dir) logdir=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "smoke.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -n "$logdir" ] || logdir=$(mktemp -d "${TMPDIR:-/tmp}/zcmsg-lab-smoke.XXXXXX")
mkdir -p "$logdir"

t0=$(date +%s)
"$here/setup.sh"
t1=$(date +%s)

echo
echo "=== smoke 1/2: single guest (run.sh) ==="
rc1=0
"$here/run.sh" --timeout 300 --log "$logdir/single.log" -- bash "$here/smoke.sh" --guest-single || rc1=$?
t2=$(date +%s)

echo
echo "=== smoke 2/2: two hosts (run2.sh) ==="
rc2=0
"$here/run2.sh" --timeout 300 --log-dir "$logdir" \
    --a "bash $(printf %q "$here/smoke.sh") --guest-a" \
    --b "bash $(printf %q "$here/smoke.sh") --guest-b" || rc2=$?
t3=$(date +%s)

echo
echo "=== smoke summary ==="
printf 'setup.sh            %4ss\n' "$((t1 - t0))"
printf 'single guest  exit %-3s %4ss  (ibv_devices, ibv_devinfo, ib_send_lat)\n' "$rc1" "$((t2 - t1))"
printf 'two hosts     exit %-3s %4ss  (ib_write_bw A<-B)\n' "$rc2" "$((t3 - t2))"
printf 'total               %4ss; logs in %s\n' "$((t3 - t0))" "$logdir"
if [ "$rc1" = 0 ] && [ "$rc2" = 0 ]; then
    echo "smoke: PASS"
    exit 0
fi
echo "smoke: FAIL"
exit 1
