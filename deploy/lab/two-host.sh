#!/usr/bin/env bash
# Runs INSIDE a guest of the two-host lab (as run2.sh's --a / --b / --restart-b
# command); never on the host. Runs the two-host tests of one lab boot, one
# test per process, the same sequence on both hosts (the tests pair up over
# rdma_cm: B listens, A connects and retries until B is there).
#
#   bash deploy/lab/two-host.sh TEST_BINARY MODE [ZCPERF_TEST_BINARY]
#
#   MODE normal  endpoints_and_rpc_across_hosts on the clean wire, then
#                zcperf_across_hosts (ZCPERF_TEST_BINARY: zcperf's server
#                on B, its clients on A, every test that crosses hosts),
#                then `tc netem loss 5%` on our NIC and loss_2000_pipelined
#   MODE kill    peer_killed_then_restarted (run2.sh --kill-b-after with
#                --kill-b-marker b1-connected and --restart-b)
#
# Each test has its own timeout; a test that does not run (wrong name, a
# filter matching nothing) is a failure, not a pass.
set -uo pipefail

bin=${1:?usage: two-host.sh TEST_BINARY normal|kill [ZCPERF_TEST_BINARY]}
mode=${2:?usage: two-host.sh TEST_BINARY normal|kill [ZCPERF_TEST_BINARY]}
zcperf_bin=${3:-}
role=${ZCMSG_LAB_ROLE:?ZCMSG_LAB_ROLE is not set: run through deploy/lab/run2.sh}
export RUST_BACKTRACE=1

run_one() { # NAME TIMEOUT_SECS [BINARY]
    local name=$1 t=$2 bin=${3:-$bin} out=/tmp/two-host-$1.out rc start
    echo "== [$role] $name (timeout ${t}s)"
    start=$(date +%s)
    timeout --kill-after=10 "$t" "$bin" --include-ignored --exact "$name" \
        --nocapture --test-threads=1 >"$out" 2>&1
    rc=$?
    cat "$out"
    if [ "$rc" = 0 ] && ! grep -q 'test result: ok\. 1 passed' "$out"; then
        echo "== [$role] $name: did not run exactly one test"
        rc=1
    fi
    [ "$rc" = 124 ] && echo "== [$role] $name: TIMED OUT"
    echo "== [$role] $name: exit $rc after $(( $(date +%s) - start ))s"
    return "$rc"
}

case $mode in
normal)
    run_one endpoints_and_rpc_across_hosts 420 || exit 1
    [ -n "$zcperf_bin" ] || { echo "== [$role] normal mode needs ZCPERF_TEST_BINARY"; exit 2; }
    run_one zcperf_across_hosts 600 "$zcperf_bin" || exit 1
    tc qdisc add dev "$ZCMSG_LAB_NETDEV" root netem loss 5% \
        || { echo "== [$role] tc netem loss 5% on $ZCMSG_LAB_NETDEV failed"; exit 1; }
    echo "== [$role] netem: dropping 5% of the packets leaving $ZCMSG_LAB_NETDEV"
    run_one loss_2000_pipelined 420 || exit 1
    ;;
kill)
    run_one peer_killed_then_restarted 720 || exit 1
    ;;
*)
    echo "two-host.sh: unknown mode '$mode'"
    exit 2
    ;;
esac
