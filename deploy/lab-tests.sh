#!/usr/bin/env bash
# The device tests, run for real inside the Soft-RoCE lab (see deploy/lab/).
# Builds the verbs tests optimized on the host (the guest shares the host's
# root filesystem and runs them unchanged), boots ONE guest, and runs every
# test binary there with --include-ignored, where a missing device fails.
# Then the two-host tests (tests/two_host.rs, and zcperf's across hosts) in
# the two-guest lab, one boot per mode: endpoints/RPC, zcperf, and then 5%
# packet loss; host B killed mid-stream and restarted. Guest logs stay in
# target/lab/ and are printed on failure.
#
#   deploy/lab-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/lab/setup.sh

echo "== building the verbs tests, zcperf's and the examples' lab tests (release) for the guest"
mapfile -t bins < <(cargo test -p zcmsg-verbs --release --no-run 2>&1 \
    | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
zcperf_lab=$(cargo test -p zcmsg-bench --features verbs --release --test zcperf_lab --no-run 2>&1 \
    | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
examples_lab=$(cargo test -p zcmsg-examples --features verbs --release --test lab --no-run 2>&1 \
    | sed -n 's/^ *Executable .*(\(.*\))$/\1/p')
[ ${#bins[@]} -gt 0 ] || { echo "no test binaries were built"; exit 1; }
[ -n "$zcperf_lab" ] || { echo "zcperf's lab tests were not built"; exit 1; }
[ -n "$examples_lab" ] || { echo "the examples' lab tests were not built"; exit 1; }
printf '   %s\n' "${bins[@]}" "$zcperf_lab" "$examples_lab"
# The two-host tests need a role and a peer: they run in the two-guest lab.
single=() pair=''
for b in "${bins[@]}"; do
    case $(basename "$b") in
    two_host-*) pair=$(pwd)/$b ;;
    *) single+=("$b") ;;
    esac
done
[ -n "$pair" ] || { echo "the two_host test binary was not built"; exit 1; }
zcperf_lab=$(pwd)/$zcperf_lab

# One guest for the whole run: a script runs every binary and stops at the
# first failure. Iteration counts are scaled down (the guest is 10-50x slower
# than the host); every wait keeps its bound.
mkdir -p target/lab
script=target/lab/single.sh
{
    echo 'set -u'
    echo 'export ZCMSG_CONFORMANCE_SCALE=0.1 ZCMSG_CONFORMANCE_TIMEOUT_SECS=60 RUST_BACKTRACE=1'
    echo 'status=0'
    for b in "${single[@]}"; do
        echo "echo '== guest: $(basename "$b")'"
        echo "$(pwd)/$b --include-ignored --test-threads=1 || status=1"
    done
    # zcperf's server and client as two processes (its across-hosts test
    # runs in the two-host lab below).
    echo "echo '== guest: $(basename "$zcperf_lab")'"
    echo "$zcperf_lab --include-ignored --exact zcperf_two_processes --test-threads=1 || status=1"
    # The object store and the RPC echo on rxe0.
    echo "echo '== guest: $(basename "$examples_lab")'"
    echo "$(pwd)/$examples_lab --include-ignored --test-threads=1 || status=1"
    echo 'exit $status'
} > "$script"

echo "== Soft-RoCE lab, single guest (rxe0 loopback)"
deploy/lab/run.sh --timeout 1500 --log target/lab/single.log -- sh "$(pwd)/$script"

# Two hosts. On failure: both sides' logs (run2.sh prints only the tail).
show_logs() {
    local f
    for f in "$1"/*.log; do
        [ -e "$f" ] || continue
        printf '\n----- %s -----\n' "$f"
        grep -v '^\[lab-host' "$f" | tail -n 200
    done
}
two_host() { # NAME RUN2_ARGS...
    local name=$1 dir=target/lab/$1 t0=$SECONDS
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "== Soft-RoCE lab, two hosts: $name"
    if ! deploy/lab/run2.sh --log-dir "$dir" "$@"; then
        show_logs "$dir"
        echo "== two hosts, $name: FAILED after $((SECONDS - t0))s (logs in $dir)"
        return 1
    fi
    echo "== two hosts, $name: passed in $((SECONDS - t0))s (logs in $dir)"
}
th="bash $(pwd)/deploy/lab/two-host.sh $pair"
two_host pair --timeout 1200 --a "$th normal $zcperf_lab" --b "$th normal $zcperf_lab"
two_host kill --timeout 900 --kill-b-after 8 --kill-b-marker b1-connected \
    --a "$th kill" --b "$th kill" --restart-b "$th kill"
