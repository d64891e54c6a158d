//! perftest-style output: the same column names, so figures line up with
//! `ib_send_lat` / `ib_write_bw` runs on the same machine.

use hdrhistogram::Histogram;

/// Print perftest's latency header.
pub fn lat_header() {
    println!(
        " {:<10} {:<12} {:>12} {:>12} {:>16} {:>12} {:>14} {:>22} {:>24}",
        "#bytes",
        "#iterations",
        "t_min[usec]",
        "t_max[usec]",
        "t_typical[usec]",
        "t_avg[usec]",
        "t_stdev[usec]",
        "99% percentile[usec]",
        "99.9% percentile[usec]"
    );
}

/// Summary of latency samples in nanoseconds.
pub struct LatSummary {
    /// Minimum (µs).
    pub min: f64,
    /// Maximum (µs).
    pub max: f64,
    /// Median, perftest's "typical" (µs).
    pub typical: f64,
    /// Mean (µs).
    pub avg: f64,
    /// Standard deviation (µs).
    pub stdev: f64,
    /// 99th percentile (µs).
    pub p99: f64,
    /// 99.9th percentile (µs).
    pub p999: f64,
}

/// Summarize samples (ns), dropping the first 1% as warm-up like perftest's cycle skipping.
pub fn summarize(samples: &[u64]) -> LatSummary {
    let skip = samples.len() / 100;
    let s = &samples[skip..];
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    for &v in s {
        h.record(v.max(1)).ok();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    LatSummary {
        min: us(h.min()),
        max: us(h.max()),
        typical: us(h.value_at_quantile(0.5)),
        avg: h.mean() / 1000.0,
        stdev: h.stdev() / 1000.0,
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
    }
}

/// Print one latency row.
pub fn lat_row(size: usize, iters: u64, s: &LatSummary) {
    println!(
        " {:<10} {:<12} {:>12.2} {:>12.2} {:>16.2} {:>12.2} {:>14.2} {:>22.2} {:>24.2}",
        size, iters, s.min, s.max, s.typical, s.avg, s.stdev, s.p99, s.p999
    );
}

/// Print perftest's bandwidth header.
pub fn bw_header() {
    println!(
        " {:<10} {:<14} {:>18} {:>20} {:>16}",
        "#bytes", "#iterations", "BW peak[MB/sec]", "BW average[MB/sec]", "MsgRate[Mpps]"
    );
}

/// Print one bandwidth row (perftest's MB is 2^20 bytes).
pub fn bw_row(size: usize, iters: u64, bytes_per_sec: f64, msgs_per_sec: f64) {
    let mb = bytes_per_sec / 1_048_576.0;
    println!(
        " {:<10} {:<14} {:>18.2} {:>20.2} {:>16.6}",
        size,
        iters,
        mb,
        mb,
        msgs_per_sec / 1e6
    );
}

/// Latency samples taken as perftest takes them: one clock read per
/// iteration, at its end (which is the next one's start), so a sample is
/// the whole iteration, RTT/2, less the timer's own cost
/// ([`clock_overhead_ns`]). Under full emulation a clock read is a vDSO
/// call and a `rdtsc` helper: one per round trip, not one at each end.
pub struct RttClock {
    last: std::time::Instant,
    clock: u64,
    samples: Vec<u64>,
}

impl RttClock {
    /// Measure the timer's cost, then start the first iteration.
    pub fn start(iters: u64) -> RttClock {
        let clock = clock_overhead_ns();
        RttClock {
            samples: Vec::with_capacity(iters as usize),
            clock,
            last: std::time::Instant::now(),
        }
    }

    /// The current iteration is over: record it; the next starts now.
    #[inline]
    pub fn lap(&mut self) {
        let now = std::time::Instant::now();
        let rtt = now.duration_since(self.last).as_nanos() as u64;
        self.samples.push(rtt.saturating_sub(self.clock) / 2);
        self.last = now;
    }

    /// The samples, one per [`RttClock::lap`], in nanoseconds.
    pub fn into_samples(self) -> Vec<u64> {
        self.samples
    }
}

/// What timing one interval costs by itself: the median of back-to-back
/// `Instant::now()` / `elapsed()` pairs, in nanoseconds. Latency samples
/// subtract it, as a benchmark harness subtracts its timer's cost (on these
/// VMs a clock read costs ~40 ns, a tenth of a one-way SEND).
pub fn clock_overhead_ns() -> u64 {
    let mut v: Vec<u64> = (0..10_001)
        .map(|_| {
            let t = std::time::Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}
