//! SLA evaluation cost: feeds a period of 10, 1,000 and 100,000 outages into
//! an outage ledger (one observation per state change, as the controller
//! sees them), then times the evaluation into status and prints the size of
//! the status object. The ledger keeps aggregates, so evaluation and status
//! size should not grow with the number of outages. Pure: needs no cluster.
//!
//!     cargo bench --bench sla

use std::time::Instant;

use chrono::{Duration, TimeZone, Utc};
use chrono_tz::Europe::Rome;
use pec_operator::{
    api::PeriodKind,
    sla::{
        evaluate::{Targets, object_status},
        ledger::Ledger,
    },
};

fn main() {
    let targets = Targets {
        objective: 99.8,
        single_outage_fraction: 0.5,
        rto: Duration::hours(4),
        rpo: Duration::zero(),
    };
    let start = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("valid");
    let gap = Duration::seconds(30);
    println!(
        "{:>8}  {:>14}  {:>16}  {:>14}",
        "outages", "ingest (ms)", "evaluate (us)", "status (bytes)"
    );
    for outages in [10usize, 1_000, 100_000] {
        let mut ledger = Ledger::new(PeriodKind::Quadrimester, Rome, start);
        // Outages of 10 s every 60 s, observed every 10 s around each change.
        let began = Instant::now();
        let mut t = start;
        for _ in 0..outages {
            ledger.observe(PeriodKind::Quadrimester, Rome, t, true, "", gap);
            t += Duration::seconds(20);
            ledger.observe(
                PeriodKind::Quadrimester,
                Rome,
                t,
                false,
                "NoReadyEndpoint",
                gap,
            );
            t += Duration::seconds(10);
            ledger.observe(PeriodKind::Quadrimester, Rome, t, true, "", gap);
            t += Duration::seconds(30);
        }
        let ingest = began.elapsed();
        let runs = 1_000;
        let began = Instant::now();
        let mut status = None;
        for _ in 0..runs {
            status = Some(object_status(
                "acme",
                "pec.acme.it",
                None,
                &ledger,
                &targets,
                Rome,
                t,
            ));
        }
        let evaluate = began.elapsed() / runs;
        let bytes = serde_json::to_vec(&status).map(|v| v.len()).unwrap_or(0);
        println!(
            "{outages:>8}  {:>14.3}  {:>16.2}  {bytes:>14}",
            ingest.as_secs_f64() * 1000.0,
            evaluate.as_secs_f64() * 1e6
        );
    }
}
