//! The operator's heap as its allocator, jemalloc, counts it, read at
//! scrape time: what the caches and every other live object take
//! (`pec_operator_heap_allocated_bytes`) and what the allocator keeps in
//! physical memory for them (`pec_operator_heap_resident_bytes`).
//!
//! `process_resident_memory_bytes` alone cannot tell a growing cache from
//! pages the allocator has not given back yet, or from the binary's own
//! code. These two can: the first follows the objects, the gap between the
//! first and the second is the allocator's slack, and what the process
//! holds beyond the second is code, stacks and the runtime's own mappings.
//!
//! The figures are jemalloc's, the binary's global allocator, so this
//! module lives in the binary rather than in the library.

use prometheus::{IntGauge, core::Collector, proto::MetricFamily};
use tikv_jemalloc_ctl::{epoch, stats};

/// The heap gauges, refreshed from jemalloc at each scrape.
pub struct HeapCollector {
    allocated: IntGauge,
    resident: IntGauge,
}

impl HeapCollector {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            allocated: IntGauge::new(
                "pec_operator_heap_allocated_bytes",
                "Bytes of heap the operator's live objects take (jemalloc's stats.allocated).",
            )?,
            resident: IntGauge::new(
                "pec_operator_heap_resident_bytes",
                "Bytes of physical memory the allocator holds: the live objects, freed pages \
                 not yet returned and its own metadata (jemalloc's stats.resident).",
            )?,
        })
    }

    /// Reads jemalloc's current figures into the gauges. jemalloc caches
    /// its statistics until the epoch is advanced; a failed read leaves
    /// the last figures.
    fn refresh(&self) {
        if epoch::advance().is_err() {
            return;
        }
        if let Ok(bytes) = stats::allocated::read() {
            self.allocated.set(saturating(bytes));
        }
        if let Ok(bytes) = stats::resident::read() {
            self.resident.set(saturating(bytes));
        }
    }

    fn gauges(&self) -> [&IntGauge; 2] {
        [&self.allocated, &self.resident]
    }
}

fn saturating(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl Collector for HeapCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauges().into_iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.gauges()
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(collector: &HeapCollector) -> (f64, f64) {
        let families = collector.collect();
        let value = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric()[0].get_gauge().get_value())
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        (
            value("pec_operator_heap_allocated_bytes"),
            value("pec_operator_heap_resident_bytes"),
        )
    }

    #[test]
    fn the_allocator_runs_with_the_binary_s_options() {
        assert_eq!(tikv_jemalloc_ctl::opt::narenas::read().unwrap(), 1);
        assert!(tikv_jemalloc_ctl::background_thread::read().unwrap());
    }

    /// The binary's tests allocate from jemalloc too (its global
    /// allocator), so a block allocated here shows in the gauges. Other
    /// tests running at once allocate far less than the block.
    #[test]
    fn the_gauges_follow_what_is_allocated_and_freed() {
        const SIZE: usize = 256 << 20;
        let collector = HeapCollector::new().unwrap();
        let (before, _) = gauges(&collector);
        let block = std::hint::black_box(vec![1u8; SIZE]);
        let (during, resident) = gauges(&collector);
        drop(block);
        let (after, _) = gauges(&collector);
        let size = SIZE as f64;
        assert!(during - before > size * 0.9, "{before} -> {during}");
        assert!(
            resident >= during,
            "resident {resident} < allocated {during}"
        );
        assert!(during - after > size * 0.9, "{during} -> {after}");
    }
}
