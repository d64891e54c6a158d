//! The zcmsg benchmark harness. Criterion benchmarks live in `benches/`;
//! the `zcperf` binary (perftest-style options and output) in `src/bin/`.
