#!/usr/bin/env bash
# zcmsg over verbs beside perftest and UCX, in ONE Soft-RoCE guest boot, on
# the same rxe0 (server and client on the device's loopback), each pair of
# figures measured back to back:
#
#   ib_send_lat  -s 64      vs  zcperf send_lat  -s 64     (latency, lower is better)
#   ib_write_lat -s 64      vs  zcperf write_lat -s 64
#   ib_write_bw  -s 65536   vs  zcperf write_bw  -s 65536  (bandwidth, higher is better)
#   ucx_perftest tag_lat 64 vs  zcperf ep_lat    -s 64     (endpoint level)
#                           and zcperf ep_lat --copy -s 64 (the copy path)
#                           and zcperf ep_lat --slot -s 64 (the slot path)
#   ucx_perftest ucp_am_lat 64 vs zcperf ep_lat --slot -s 64 (both hand over
#                           the receive buffer in place)
#   ucx_perftest tag_bw 64K vs  zcperf ep_bw     -s 65536
#
#   deploy/lab/bench.sh [--rounds N] [--out DIR]
#
#   --rounds N  repeat the whole set N times in the same boot (default 1);
#               the ratio table is printed per round
#   --out DIR   raw outputs and results.txt (default target/lab/bench)
#
# Environment: BENCH_LAT_ITERS (default 5000), BENCH_BW_ITERS (default 2000),
# ZCMSG_LAB_APPEND (guest kernel parameters; default below).
#
# The guest boots with `tsc=reliable clocksource=tsc`. perftest and UCX time
# with the TSC directly (rdtsc); zcperf times with `Instant`, i.e. the
# kernel's clock source, which under full emulation is otherwise the HPET
# (the kernel marks the emulated TSCs unsynchronized at boot): ~5.7 us per
# `Instant` pair there against ~0.55 us on the TSC, and each HPET read is
# an emulated MMIO access. The TSC puts all three tools on one clock.
# Guest times are full-emulation times: only the ratios mean something.
# Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

rounds=1 out=target/lab/bench
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) rounds=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
lat_n=${BENCH_LAT_ITERS:-5000}
bw_n=${BENCH_BW_ITERS:-2000}

deploy/lab/setup.sh >/dev/null
echo "== building zcperf (release, features verbs)"
timeout 1800 cargo build --release -p zcmsg-bench --features verbs --bin zcperf
zcperf=$root/target/release/zcperf
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/*.txt

guest=$out/guest.sh
cat >"$guest" <<EOF
set -u
zcperf=$zcperf rounds=$rounds lat_n=$lat_n bw_n=$bw_n
EOF
cat >>"$guest" <<'EOF'
D=$ZCMSG_LAB_DEVICE G=$ZCMSG_LAB_GID_INDEX A=$ZCMSG_LAB_ADDR
out=$ZCMSG_LAB_SHARED # the guest's root is read-only; the host copies these out
export UCX_TLS=rc UCX_NET_DEVICES=$D:1 UCX_UD_VERBS_ETH_DGID_CHECK=n
status=0
# perftest's latency tools convert cycles with the "cpu MHz" of
# /proc/cpuinfo, which the emulated CPUs report inconsistently (ib_send_lat
# then prints inf): they run with -C (cycles) and the host converts with the
# guest kernel's TSC calibration.
cat /sys/devices/system/clocksource/clocksource0/current_clocksource >"$out/clocksource.txt"
dmesg | sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p; s/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' \
    | tail -n 1 >"$out/tsc_mhz.txt"
# perftest NAME TOOL ARGS... : server in the background, client against it.
perftest() {
    local name=$1 tool=$2
    shift 2
    timeout 180 "$tool" -d "$D" -x "$G" -F "$@" >"$out/$name.server.txt" 2>&1 &
    local srv=$!
    sleep 2
    timeout 180 "$tool" -d "$D" -x "$G" -F "$@" "$A" >"$out/$name.txt" 2>&1 || status=1
    wait "$srv" || status=1
}
ucx() { # NAME TEST SIZE ITERS
    timeout 180 ucx_perftest -p 13337 >"$out/$1.server.txt" 2>&1 &
    local srv=$!
    sleep 2
    timeout 180 ucx_perftest "$A" -p 13337 -t "$2" -s "$3" -n "$4" -f >"$out/$1.txt" 2>&1 || status=1
    wait "$srv" || status=1
}
zc() { # NAME TEST ARGS...
    local name=$1
    shift
    timeout 300 "$zcperf" "$@" --transport verbs -d "$D" --addr "$A" -x "$G" >"$out/$name.txt" 2>&1 || status=1
}
for r in $(seq 1 "$rounds"); do
    echo "== round $r"
    perftest "r$r-ib_send_lat" ib_send_lat -C -s 64 -n "$lat_n"
    zc "r$r-zc_send_lat" send-lat -s 64 -n "$lat_n"
    perftest "r$r-ib_write_lat" ib_write_lat -C -s 64 -n "$lat_n"
    zc "r$r-zc_write_lat" write-lat -s 64 -n "$lat_n"
    perftest "r$r-ib_write_bw" ib_write_bw -s 65536 -n "$bw_n"
    zc "r$r-zc_write_bw" write-bw -s 65536 -n "$bw_n"
    ucx "r$r-ucx_tag_lat" tag_lat 64 "$lat_n"
    zc "r$r-zc_ep_lat" ep-lat -s 64 -n "$lat_n"
    zc "r$r-zc_ep_lat_copy" ep-lat --copy -s 64 -n "$lat_n"
    zc "r$r-zc_ep_lat_slot" ep-lat --slot -s 64 -n "$lat_n"
    ucx "r$r-ucx_am_lat" ucp_am_lat 64 "$lat_n"
    ucx "r$r-ucx_tag_bw" tag_bw 65536 "$bw_n"
    zc "r$r-zc_ep_bw" ep-bw -s 65536 -n "$bw_n"
done
exit $status
EOF

echo "== one guest: perftest, ucx_perftest and zcperf on rxe0"
export ZCMSG_LAB_APPEND=${ZCMSG_LAB_APPEND-tsc=reliable clocksource=tsc}
rc=0
rm -rf "$out/run"
mkdir -p "$out/run"
ZCMSG_LAB_RUNDIR=$out/run deploy/lab/run.sh --timeout 3000 --log "$out/console.log" \
    -- bash "$guest" || rc=$?
cp "$out"/run/zcmsg-lab.*/shared/*.txt "$out"/ 2>/dev/null || true

# Figures: perftest and zcperf latency rows: $1 = size, $5 = t_typical[usec];
# bandwidth rows: $4 = BW average[MB/sec]. ucx_perftest -f: the last all-
# numeric line, $2 = typical latency (usec), $6 = overall bandwidth (MB/s).
lat() { awk -v s="$2" '$1 == s && NF >= 9 { v = $5 } END { print v }' "$out/$1.txt" 2>/dev/null; }
mhz=$(cat "$out/tsc_mhz.txt" 2>/dev/null || true)
# perftest -C rows hold cycles: to microseconds with the guest's TSC MHz.
cyc() { local v; v=$(lat "$@"); awk -v c="$v" -v m="$mhz" 'BEGIN { if (c == "" || m == "" || m == 0) print ""; else printf "%.2f", c / m }'; }
bw() { awk -v s="$2" '$1 == s && NF >= 5 && $2 ~ /^[0-9]+$/ { v = $4 } END { print v }' "$out/$1.txt" 2>/dev/null; }
ucxf() {
    awk -v f="$2" '{ sub(/^ *Final: */, "") } NF >= 8 { ok = 1; for (i = 1; i <= NF; i++) if ($i !~ /^[0-9.]+$/) ok = 0; if (ok) v = $f } END { print v }' \
        "$out/$1.txt" 2>/dev/null
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
median() { tr ' ' '\n' | grep -E '^[0-9.]+$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
names=("send lat 64 B (us, typical)" "write lat 64 B (us, typical)" "write bw 64 KiB (MB/s)"
       "endpoint lat 64 B (us) vs UCX tag" "endpoint bw 64 KiB (MB/s) vs UCX"
       "ep lat 64 B, copy path, vs UCX tag" "ep lat 64 B, slot path, vs UCX tag"
       "ep lat 64 B, slot path, vs UCX am")
targets=("<= 1.10 (zcmsg/ib_send_lat)" "<= 1.10 (zcmsg/ib_write_lat)" ">= 0.90 (zcmsg/ib_write_bw)"
         "<= 1.00 (zcmsg ep/ucx tag_lat)" ">= 1.00 (zcmsg ep/ucx tag_bw)"
         "<= 1.00 (zcmsg ep --copy/ucx tag_lat)" "<= 1.00 (zcmsg ep --slot/ucx tag_lat)"
         "(zcmsg ep --slot/ucx ucp_am_lat)")
refs=("" "" "" "" "" "" "" "") zcs=("" "" "" "" "" "" "" "") rats=("" "" "" "" "" "" "" "")
row() { printf '  %-34s %12s %12s %8s %s\n' "$@"; }
{
    echo "# deploy/lab/bench.sh --rounds $rounds (BENCH_LAT_ITERS=$lat_n BENCH_BW_ITERS=$bw_n), $(date -u +%FT%TZ)"
    grep -h '^# .*GID index' "$out"/r1-zc_send_lat.txt 2>/dev/null || true
    echo "# guest TSC ${mhz:-unknown} MHz (perftest latency cycles are converted with it)"
    echo "# guest clock source $(cat "$out/clocksource.txt" 2>/dev/null || echo unknown) (zcperf's Instant)"
    for r in $(seq 1 "$rounds"); do
        echo "round $r"
        row figure reference zcmsg ratio target
        pairs=("$(cyc "r$r-ib_send_lat" 64) $(lat "r$r-zc_send_lat" 64)"
               "$(cyc "r$r-ib_write_lat" 64) $(lat "r$r-zc_write_lat" 64)"
               "$(bw "r$r-ib_write_bw" 65536) $(bw "r$r-zc_write_bw" 65536)"
               "$(ucxf "r$r-ucx_tag_lat" 2) $(lat "r$r-zc_ep_lat" 64)"
               "$(ucxf "r$r-ucx_tag_bw" 6) $(bw "r$r-zc_ep_bw" 65536)"
               "$(ucxf "r$r-ucx_tag_lat" 2) $(lat "r$r-zc_ep_lat_copy" 64)"
               "$(ucxf "r$r-ucx_tag_lat" 2) $(lat "r$r-zc_ep_lat_slot" 64)"
               "$(ucxf "r$r-ucx_am_lat" 2) $(lat "r$r-zc_ep_lat_slot" 64)")
        for i in 0 1 2 3 4 5 6 7; do
            read -r a b <<<"${pairs[$i]}"
            q=$(ratio "${b:-}" "${a:-}")
            row "${names[$i]}" "${a:-}" "${b:-}" "$q" "${targets[$i]}"
            refs[$i]+=" ${a:-}" zcs[$i]+=" ${b:-}" rats[$i]+=" $q"
        done
    done
    echo "median over $rounds rounds (ratio = median of the per-round ratios; range in brackets)"
    row figure reference zcmsg ratio target
    for i in 0 1 2 3 4 5 6 7; do
        lo=$(tr ' ' '\n' <<<"${rats[$i]}" | grep -E '^[0-9.]+$' | sort -g | head -n 1)
        hi=$(tr ' ' '\n' <<<"${rats[$i]}" | grep -E '^[0-9.]+$' | sort -g | tail -n 1)
        row "${names[$i]}" "$(median <<<"${refs[$i]}")" "$(median <<<"${zcs[$i]}")" \
            "$(median <<<"${rats[$i]}")" "${targets[$i]} [$lo-$hi]"
    done
} | tee "$out/results.txt"
if [ "$rc" != 0 ]; then
    echo "bench.sh: the guest run failed (exit $rc); raw outputs in $out" >&2
    for f in "$out"/*.txt; do
        printf '\n----- %s -----\n' "$f" >&2
        tail -n 15 "$f" >&2
    done
fi
exit "$rc"
