//! The zcmsg benchmark harness. Criterion benchmarks live in `benches/`;
//! the `zcperf` binary (perftest-style options and output) in `src/bin/`.
//! Every figure is printed beside references measured in the same run.

pub mod ep;
pub mod onethread;
pub mod raw;
pub mod refs;
pub mod report;
pub mod wire;
pub mod wlat;
