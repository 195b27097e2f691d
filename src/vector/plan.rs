//! How a query runs: an exact scan of the vectors it may return, or a walk
//! of the graph (with a filter when only some photos are allowed), whichever
//! is expected to cost less.
//!
//! The expected costs come from measurements, not constants: every query
//! times the way it ran and moves that way's estimate towards what it saw.
//!
//! - **A scan** costs a fixed time per vector it reads (the allowed ones,
//!   or every live one).
//! - **A graph search** at breadth `ef` costs `ef / 64` times a base, the
//!   time of an unfiltered search at `ef` 64. A filter that allows a share
//!   `p` of the photos adds a time per unit of `1 / p - 1`: the walk must
//!   visit about `1 / p` points for every allowed one it keeps.
//!
//! On the million-photo benchmark this model is within about a third of the
//! measured times from 0.1% to 50% allowed (BENCHMARKS.md, "Filtered
//! queries"). Near the crossing point the two ways cost about the same, so
//! an estimate that is off there costs little.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The breadth the graph estimates are per.
const BASE_EF: f64 = 64.0;
/// Weight of a new measurement in an estimate.
const LEARNING_RATE: f64 = 0.1;
/// Filters allowing this share or more are timed as unfiltered searches.
const UNFILTERED_SHARE: f64 = 0.9;

/// The way a query runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Scan,
    Graph,
}

/// An estimate in nanoseconds, updated without a lock (a lost update only
/// slows learning).
struct Estimate(AtomicU64);

impl Estimate {
    fn new(ns: f64) -> Self {
        Self(AtomicU64::new(ns.to_bits()))
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn observe(&self, ns: f64) {
        if ns.is_finite() && ns >= 0.0 {
            let next = self.get() + LEARNING_RATE * (ns - self.get());
            self.0.store(next.to_bits(), Ordering::Relaxed);
        }
    }
}

/// The estimates of one index.
pub struct Costs {
    /// Per vector scanned.
    scan: Estimate,
    /// An unfiltered graph search at `BASE_EF`.
    graph: Estimate,
    /// What a filter adds to a graph search at `BASE_EF`, per unit of
    /// `1 / p - 1`.
    filter: Estimate,
}

impl Default for Costs {
    /// Starting points measured on the million-photo benchmark (512
    /// dimensions, one thread), which the first queries then correct.
    fn default() -> Self {
        Self {
            scan: Estimate::new(150.0),
            graph: Estimate::new(400_000.0),
            filter: Estimate::new(90_000.0),
        }
    }
}

/// The current estimates, for reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CostEstimates {
    pub scan_ns_per_vector: f64,
    pub graph_ns: f64,
    pub filter_ns_per_inverse_share: f64,
}

impl Costs {
    /// The expected time of scanning `candidates` vectors.
    pub fn scan_ns(&self, candidates: usize) -> f64 {
        candidates as f64 * self.scan.get()
    }

    /// The expected time of a graph search at breadth `ef` whose filter
    /// allows the share `share` of the points.
    pub fn graph_ns(&self, ef: usize, share: f64) -> f64 {
        let share = share.clamp(1e-9, 1.0);
        ef as f64 / BASE_EF * (self.graph.get() + self.filter.get() * (1.0 / share - 1.0))
    }

    /// The cheaper way for a query that may return `candidates` vectors,
    /// a share `share` of the graph's, searched at breadth `ef`.
    pub fn choose(&self, candidates: usize, ef: usize, share: f64) -> Plan {
        if self.scan_ns(candidates) <= self.graph_ns(ef, share) {
            Plan::Scan
        } else {
            Plan::Graph
        }
    }

    /// Learns from a scan of `candidates` vectors that took `took`.
    pub fn observe_scan(&self, candidates: usize, took: Duration) {
        // A scan of a few vectors is mostly fixed overhead: it says little
        // about the time per vector.
        if candidates >= 1_000 {
            self.scan
                .observe(took.as_nanos() as f64 / candidates as f64);
        }
    }

    /// Learns from a graph search at breadth `ef` with a filter allowing
    /// the share `share` that took `took`.
    pub fn observe_graph(&self, ef: usize, share: f64, took: Duration) {
        let at_base = took.as_nanos() as f64 * BASE_EF / ef.max(1) as f64;
        if share >= UNFILTERED_SHARE {
            self.graph.observe(at_base);
        } else {
            let extra = (at_base - self.graph.get()).max(0.0);
            self.filter.observe(extra / (1.0 / share.max(1e-9) - 1.0));
        }
    }

    pub fn estimates(&self) -> CostEstimates {
        CostEstimates {
            scan_ns_per_vector: self.scan.get(),
            graph_ns: self.graph.get(),
            filter_ns_per_inverse_share: self.filter.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selective_filters_scan_and_broad_ones_walk_the_graph() {
        let costs = Costs::default();
        let n = 1_000_000;
        assert_eq!(costs.choose(n / 1000, 64, 0.001), Plan::Scan);
        assert_eq!(costs.choose(n / 2, 64, 0.5), Plan::Graph);
        assert_eq!(costs.choose(n, 64, 1.0), Plan::Graph);
        // A small index is cheaper to read whole.
        assert_eq!(costs.choose(500, 64, 1.0), Plan::Scan);
        // Deep pages: a graph search as wide as a tenth of the photos
        // costs more than reading them all.
        assert_eq!(costs.choose(n, n / 10, 1.0), Plan::Scan);
    }

    #[test]
    fn estimates_follow_what_queries_measure() {
        let costs = Costs::default();
        // Scans turn out ten times slower than assumed: a filter allowing
        // 1% of a million photos moves to the graph.
        assert_eq!(costs.choose(10_000, 64, 0.01), Plan::Scan);
        for _ in 0..100 {
            costs.observe_scan(10_000, Duration::from_micros(15_000));
        }
        assert!((costs.estimates().scan_ns_per_vector - 1_500.0).abs() < 10.0);
        assert_eq!(costs.choose(10_000, 64, 0.01), Plan::Graph);
        // Filtered walks turn out slow too: back to the scan.
        for _ in 0..100 {
            costs.observe_graph(64, 0.01, Duration::from_millis(200));
        }
        assert_eq!(costs.choose(10_000, 64, 0.01), Plan::Scan);
        // Tiny scans and nonsense durations teach nothing.
        let before = costs.estimates().scan_ns_per_vector;
        costs.observe_scan(3, Duration::from_secs(1));
        assert_eq!(costs.estimates().scan_ns_per_vector, before);
    }
}
