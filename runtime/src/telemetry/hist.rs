//! The probes' log-linear histogram buckets, and the userspace recorder that turns kernel buckets
//! or exact values into [`Distribution`]s: exact percentiles for up to a thousand values,
//! `hdrhistogram` ones beyond, bucket midpoints for kernel histograms.
//!
//! Bucket scheme (mirrors `bucket_of` in `ebpf/joblet.bpf.c`): values 0..3 get a bucket each; each
//! power of two `[2^k, 2^(k+1))`, k >= 2, is split into four equal sub-buckets, index
//! `4 * (k - 1) + s`. A bucket is at most 25% as wide as its lower bound, so a percentile read
//! from the midpoint is within 12.5% of the true value, where plain log2 buckets are within 50%.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::sys::bpf::{HIST_BUCKETS, HIST_FIRST, Hist};

/// The bucket index of `v` (same function as the probes').
pub(crate) fn bucket_of(v: u64) -> usize {
    if v < 4 {
        return v as usize;
    }
    let k = 63 - v.leading_zeros() as usize;
    4 * (k - 1) + ((v >> (k - 2)) & 3) as usize
}

/// The half-open range `[from, to)` of bucket `idx` (`to` saturates at `u64::MAX`).
pub(crate) fn bucket_bounds(idx: usize) -> (u64, u64) {
    if idx < 4 {
        return (idx as u64, idx as u64 + 1);
    }
    let k = idx / 4 + 1;
    let s = (idx % 4) as u64;
    let width = 1u64 << (k - 2);
    let from = (4 + s) << (k - 2);
    (from, from.saturating_add(width))
}

/// The index in a probe histogram of value `v`: its [`bucket_of`], with values below 32 ns in
/// the first kept bucket and values from 7 * 2^44 ns (~34 h) in the last (`JOBLET_HIST_FIRST` in
/// `ebpf/joblet.h`).
#[cfg(test)]
pub(crate) fn kernel_index(v: u64) -> usize {
    bucket_of(v).clamp(HIST_FIRST, HIST_FIRST + HIST_BUCKETS - 1) - HIST_FIRST
}

/// The half-open range `[from, to)` of probe histogram bucket `i`: [`bucket_bounds`] of bucket
/// `i + HIST_FIRST`, the first reaching down to 0 and the last up to `u64::MAX`.
pub(crate) fn kernel_bounds(i: usize) -> (u64, u64) {
    let (from, to) = bucket_bounds(i + HIST_FIRST);
    (
        if i == 0 { 0 } else { from },
        if i == HIST_BUCKETS - 1 { u64::MAX } else { to },
    )
}

/// A latency distribution, in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Distribution {
    /// Sum of all values (exact).
    pub total: u64,
    /// Number of values.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value (exact, but see the probes' note on concurrent updates).
    pub max: u64,
    /// The non-empty log-linear buckets, in increasing order.
    pub buckets: Vec<Bucket>,
}

/// One histogram bucket: `count` values in `[from, to)` nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Inclusive lower bound, ns.
    pub from: u64,
    /// Exclusive upper bound, ns.
    pub to: u64,
    /// Values in the bucket.
    pub count: u64,
}

/// hdrhistogram's largest auto-resized value is below `u64::MAX`; no latency comes near this.
const HDR_CAP: u64 = 1 << 62;

/// Exact values kept before switching to an hdrhistogram. Below it, percentiles are exact and
/// cost a sort of a few values; hdrhistogram's `value_at_quantile` scans its whole counts array
/// (thousands of slots at 3 significant digits) and cost ~5% of the spawn rate when every job's
/// report built four of them.
const EXACT_CAP: usize = 1024;

/// Accumulates exact values (lifecycle events): kept as they are up to [`EXACT_CAP`] of them,
/// in an hdrhistogram and log-linear bucket counts beyond.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recorder {
    /// The values themselves, while there are at most [`EXACT_CAP`] of them.
    exact: Vec<u64>,
    /// Every value, once there were more than [`EXACT_CAP`] (created then).
    overflow: Option<Box<Overflow>>,
    total: u64,
    max: u64,
}

/// A [`Recorder`] past [`EXACT_CAP`] values.
#[derive(Clone, Debug)]
struct Overflow {
    hdr: Histogram<u64>,
    /// Values per [`bucket_of`] index.
    buckets: BTreeMap<usize, u64>,
}

impl Overflow {
    fn record(&mut self, v: u64) {
        // `record`, not `saturating_record`: the latter clamps to the current (resizable) top.
        let _ = self.hdr.record(v.min(HDR_CAP));
        *self.buckets.entry(bucket_of(v)).or_default() += 1;
    }
}

/// p50, p90 and p99 of `count` values: `value(q, rank)` is the value of quantile `q`, whose
/// nearest rank (1-based) is `rank`, clamped to the exact maximum `max` (a bucket's midpoint can
/// exceed it); all 0 for an empty distribution.
fn percentiles(count: u64, max: u64, value: impl Fn(f64, u64) -> u64) -> [u64; 3] {
    [0.50, 0.90, 0.99].map(|q| {
        if count == 0 {
            return 0;
        }
        value(q, ((q * count as f64).ceil() as u64).clamp(1, count)).min(max)
    })
}

impl Recorder {
    /// Records one exact value.
    pub(crate) fn record(&mut self, v: u64) {
        match &mut self.overflow {
            Some(o) => o.record(v),
            None if self.exact.len() < EXACT_CAP => self.exact.push(v),
            None => {
                let mut o = Overflow {
                    hdr: Histogram::new(3)
                        .expect("3 significant digits is a valid hdrhistogram precision"),
                    buckets: BTreeMap::new(),
                };
                for &x in self.exact.iter().chain([&v]) {
                    o.record(x);
                }
                self.exact = Vec::new();
                self.overflow = Some(Box::new(o));
            }
        }
        self.total = self.total.saturating_add(v);
        self.max = self.max.max(v);
    }

    /// The distribution's summary. Percentiles are nearest-rank: exact while the values are
    /// kept, hdrhistogram's (3 significant digits) beyond, clamped to the exact maximum.
    pub(crate) fn distribution(&self) -> Distribution {
        let bucket = |(idx, count): (usize, u64)| {
            let (from, to) = bucket_bounds(idx);
            Bucket { from, to, count }
        };
        if let Some(o) = &self.overflow {
            let count = o.hdr.len();
            let [p50, p90, p99] = percentiles(count, self.max, |q, _| o.hdr.value_at_quantile(q));
            return Distribution {
                total: self.total,
                count,
                p50,
                p90,
                p99,
                max: self.max,
                buckets: o.buckets.iter().map(|(&i, &n)| bucket((i, n))).collect(),
            };
        }
        // Recorded in time order, which for one value (the common case: a job's command) or
        // values that only grow is already sorted: no copy then.
        let sorted: std::borrow::Cow<'_, [u64]> = if self.exact.is_sorted() {
            std::borrow::Cow::Borrowed(&self.exact)
        } else {
            let mut v = self.exact.clone();
            v.sort_unstable();
            std::borrow::Cow::Owned(v)
        };
        let count = sorted.len() as u64;
        let [p50, p90, p99] = percentiles(count, self.max, |_, rank| sorted[rank as usize - 1]);
        let mut buckets: Vec<Bucket> = Vec::new();
        for &v in sorted.iter() {
            let idx = bucket_of(v);
            match buckets.last_mut() {
                Some(last) if bucket_bounds(idx).0 == last.from => last.count += 1,
                _ => buckets.push(bucket((idx, 1))),
            }
        }
        Distribution {
            total: self.total,
            count,
            p50,
            p90,
            p99,
            max: self.max,
            buckets,
        }
    }
}

impl Distribution {
    /// The distribution of a probe histogram: each bucket's values are taken at its midpoint
    /// for the percentiles; total, count and max are the kernel's exact figures. Two
    /// refinements use them: the top bucket ends at the exact max, and a histogram with a
    /// single non-empty bucket is read at its exact mean (total / count).
    pub(crate) fn from_kernel(h: &Hist) -> Distribution {
        // Built for every finished job, right after it ran with cold caches: one pass over the
        // buckets and one allocation (the non-empty buckets).
        if h.count == 0 {
            return Distribution::default();
        }
        let buckets: Vec<Bucket> = h
            .buckets
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n != 0)
            .map(|(i, &count)| {
                let (from, to) = kernel_bounds(i);
                Bucket { from, to, count }
            })
            .collect();
        let count = buckets.iter().map(|b| b.count).sum();
        // The value a bucket's values stand for: the middle of what it can hold, up to the
        // exact max.
        let mid = |b: &Bucket| {
            let to = if (b.from..b.to).contains(&h.max) {
                b.to.min(h.max.saturating_add(1)).max(b.from + 1)
            } else {
                b.to
            };
            if buckets.len() == 1 && h.count == b.count {
                (h.total / b.count).clamp(b.from, to - 1)
            } else {
                b.from + (to - b.from) / 2
            }
        };
        let at_rank = |rank: u64| {
            let mut seen = 0;
            for b in &buckets {
                seen += b.count;
                if seen >= rank {
                    return mid(b);
                }
            }
            buckets.last().map_or(0, mid)
        };
        let [p50, p90, p99] = percentiles(count, h.max, |_, rank| at_rank(rank));
        Distribution {
            total: h.total,
            count,
            p50,
            p90,
            p99,
            max: h.max,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range_without_gaps() {
        let mut expected_from = 0;
        for idx in 0..252 {
            let (from, to) = bucket_bounds(idx);
            assert_eq!(from, expected_from, "bucket {idx}");
            assert!(to > from);
            assert_eq!(bucket_of(from), idx);
            assert_eq!(bucket_of(to - 1), idx);
            expected_from = to;
        }
        assert_eq!(bucket_of(u64::MAX), 251);
    }

    #[test]
    fn kernel_buckets_tile_u64_and_match_the_full_scheme_in_their_range() {
        let mut expected_from = 0;
        for i in 0..HIST_BUCKETS {
            let (from, to) = kernel_bounds(i);
            assert_eq!(from, expected_from, "kernel bucket {i}");
            assert!(to > from);
            assert_eq!(kernel_index(from), i);
            assert_eq!(kernel_index(to - 1), i);
            if i > 0 && i < HIST_BUCKETS - 1 {
                assert_eq!((from, to), bucket_bounds(i + HIST_FIRST));
            }
            expected_from = to;
        }
        assert_eq!(expected_from, u64::MAX);
        assert_eq!(kernel_bounds(0), (0, 40), "below 32 ns: one bucket");
        assert_eq!(
            kernel_bounds(HIST_BUCKETS - 1).0,
            7 << 44,
            "~34 h and above: one bucket"
        );
        assert_eq!(kernel_index(0), 0);
        assert_eq!(kernel_index(u64::MAX), HIST_BUCKETS - 1);
        // 1 µs, 1 ms, 1 s and 1 h keep the full scheme's 25% buckets.
        for v in [1_000, 1_000_000, 1_000_000_000, 3_600_000_000_000] {
            let (from, to) = kernel_bounds(kernel_index(v));
            assert!((to - from) * 4 <= from && from <= v && v < to, "{v}");
        }
    }

    #[test]
    fn bucket_width_is_at_most_a_quarter_of_its_start() {
        for idx in 4..252 {
            let (from, to) = bucket_bounds(idx);
            assert!((to - from) * 4 <= from, "bucket {idx}: [{from}, {to})");
        }
    }

    /// The distribution of `values`, recorded in order.
    fn distribution_of(values: impl IntoIterator<Item = u64>) -> Distribution {
        let mut r = Recorder::default();
        for v in values {
            r.record(v);
        }
        r.distribution()
    }

    #[test]
    fn exact_values_give_exact_totals_and_close_percentiles() {
        let d = distribution_of((1..=1000u64).map(|v| v * 1000));
        assert_eq!(d.count, 1000);
        assert_eq!(d.total, 1000 * 1001 / 2 * 1000);
        assert_eq!(d.max, 1_000_000);
        assert!(d.p50.abs_diff(500_000) <= 1_000, "p50 {}", d.p50);
        assert!(d.p99.abs_diff(990_000) <= 2_000, "p99 {}", d.p99);
        assert_eq!(d.buckets.iter().map(|b| b.count).sum::<u64>(), 1000);
    }

    #[test]
    fn kernel_buckets_are_read_at_their_midpoint_and_clamped_to_max() {
        let mut h = Hist {
            total: 0,
            count: 0,
            max: 0,
            groups: 0,
            buckets: [0; HIST_BUCKETS],
        };
        // 10 values of ~1 ms (bucket of 1_000_000), one of ~3 ms.
        h.buckets[kernel_index(1_000_000)] = 10;
        h.buckets[kernel_index(3_000_000)] = 1;
        h.total = 10 * 1_000_000 + 3_000_000;
        h.count = 11;
        h.max = 3_000_000;
        let d = Distribution::from_kernel(&h);
        assert_eq!(d.count, 11);
        assert_eq!(d.total, 13_000_000);
        assert_eq!(d.buckets.len(), 2);
        let (from, to) = bucket_bounds(bucket_of(1_000_000));
        assert!(
            d.p50 >= from && d.p50 < to,
            "p50 {} not in [{from}, {to})",
            d.p50
        );
        assert!(d.p99 <= 3_000_000 && d.p99 > 2_800_000, "p99 {}", d.p99);
    }

    #[test]
    fn a_single_bucket_is_read_at_its_exact_mean() {
        let mut h = Hist {
            total: 400_200_000,
            count: 2,
            max: 200_150_000,
            groups: 0,
            buckets: [0; HIST_BUCKETS],
        };
        h.buckets[kernel_index(200_100_000)] = 2;
        let d = Distribution::from_kernel(&h);
        assert!(d.p50.abs_diff(200_100_000) < 200_000, "p50 {}", d.p50);
    }

    #[test]
    fn large_first_values_do_not_saturate_the_recorder() {
        let d = distribution_of(std::iter::once(15_500_000).chain([700_000; 10]));
        assert!(d.p50.abs_diff(700_000) < 1_000, "p50 {}", d.p50);
        assert_eq!(d.max, 15_500_000);
    }

    #[test]
    fn many_values_switch_to_hdrhistogram_without_losing_any() {
        let mut r = Recorder::default();
        for v in 1..=10_000u64 {
            r.record(v * 100);
        }
        assert!(r.overflow.is_some() && r.exact.is_empty());
        let d = r.distribution();
        assert_eq!(d.count, 10_000);
        assert_eq!(d.total, 10_000 * 10_001 / 2 * 100);
        assert!(d.p50.abs_diff(500_000) <= 1_000, "p50 {}", d.p50);
        assert!(d.p99.abs_diff(990_000) <= 2_000, "p99 {}", d.p99);
    }

    #[test]
    fn exact_percentiles_are_nearest_rank() {
        let d = distribution_of([5, 1, 4, 2, 3]);
        assert_eq!((d.p50, d.p90, d.p99, d.max), (3, 5, 5, 5));
    }

    #[test]
    fn exact_values_are_bucketed_like_the_probes_in_order() {
        let d = distribution_of([5_000, 1_000, 1_001, 40, 1_002]);
        let at = |v| {
            let (from, to) = bucket_bounds(bucket_of(v));
            (from, to)
        };
        let got: Vec<_> = d.buckets.iter().map(|b| (b.from, b.to, b.count)).collect();
        let want = [(at(40), 1), (at(1_000), 3), (at(5_000), 1)]
            .map(|((from, to), n)| (from, to, n))
            .to_vec();
        assert_eq!(got, want);
        assert_eq!((d.count, d.total, d.max), (5, 8_043, 5_000));
    }

    #[test]
    fn empty_distribution_is_all_zero() {
        assert_eq!(Recorder::default().distribution(), Distribution::default());
    }
}
