//! The gateway's Prometheus metrics, in a registry of its own so that tests
//! and several gateways in one process never share counters.
//!
//! It touches nothing but memory; [`crate::http`] serves the text encoding.
//! The process collector (CPU, memory, file descriptors) is not included:
//! prometheus 0.14 has it only behind its `process` feature, which this
//! crate does not enable.
//!
//! The metrics are public fields; record with them directly, e.g.
//! `metrics.messages.with_label_values(&["accettazione", "ok"]).inc()`.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder, core::Collector,
};

/// The content type of [`Metrics::encode`]'s body: Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bounds of `pec_gateway_signing_seconds`: an HSM signature takes from half
/// a millisecond (in-memory token) to most of a second (a busy network HSM).
const SIGNING_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Every metric of the gateway. Cheap to share behind an `Arc`; each field
/// is internally synchronized.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `pec_gateway_messages_total{kind,outcome}`: PEC messages handled, by
    /// kind (`accettazione`, `posta-certificata`, …) and outcome (`ok`,
    /// `refused`, …). Both label sets must be fixed vocabularies.
    pub messages: IntCounterVec,
    /// `pec_gateway_signing_seconds`: time to sign one receipt or envelope.
    pub signing_seconds: Histogram,
    /// `pec_gateway_queue_depth`: messages waiting in the outbound queue.
    pub queue_depth: IntGauge,
    /// `pec_gateway_antivirus_verdicts_total{verdict}`: `clean`,
    /// `infected` or `error`.
    pub antivirus_verdicts: IntCounterVec,
    /// `pec_gateway_antivirus_known_bytes_total`: bytes not sent to clamd
    /// because a receipt carried back an original byte for byte as this
    /// gateway scanned it at submission.
    pub antivirus_known_bytes: IntCounter,
    /// `pec_gateway_smtp_sessions_total{listener}`: `smtp` or `submissions`.
    pub smtp_sessions: IntCounterVec,
    /// `pec_gateway_smtp_replies_total{listener,code}`: replies sent, by
    /// 3-digit code; prefer [`Metrics::smtp_reply`], which keeps the code
    /// label bounded.
    pub smtp_replies: IntCounterVec,
    /// `pec_gateway_auth_failures_total`: failed `AUTH` attempts.
    pub auth_failures: IntCounter,
}

impl Metrics {
    /// Fresh metrics in a fresh registry, with `pec_gateway_build_info` set
    /// and the fixed label values (verdicts, listeners) present at zero so
    /// that rates work from the first scrape.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let messages = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "pec_gateway_messages_total",
                    "PEC messages handled, by kind and outcome.",
                ),
                &["kind", "outcome"],
            ),
        );
        let signing_seconds = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "pec_gateway_signing_seconds",
                    "Time to sign one receipt or envelope in the HSM.",
                )
                .buckets(SIGNING_BUCKETS.to_vec()),
            ),
        );
        let queue_depth = register(
            &registry,
            IntGauge::new(
                "pec_gateway_queue_depth",
                "Messages waiting in the outbound queue.",
            ),
        );
        let antivirus_verdicts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "pec_gateway_antivirus_verdicts_total",
                    "Antivirus scans, by verdict (clean, infected, error).",
                ),
                &["verdict"],
            ),
        );
        let antivirus_known_bytes = register(
            &registry,
            IntCounter::new(
                "pec_gateway_antivirus_known_bytes_total",
                "Bytes of returned originals not scanned again: a receipt carried them back byte for byte as scanned at submission.",
            ),
        );
        let smtp_sessions = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "pec_gateway_smtp_sessions_total",
                    "SMTP sessions opened, by listener.",
                ),
                &["listener"],
            ),
        );
        let smtp_replies = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "pec_gateway_smtp_replies_total",
                    "SMTP replies sent, by listener and code.",
                ),
                &["listener", "code"],
            ),
        );
        let auth_failures = register(
            &registry,
            IntCounter::new(
                "pec_gateway_auth_failures_total",
                "Failed SMTP AUTH attempts.",
            ),
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "pec_gateway_build_info",
                    "Always 1; the version is in the label.",
                ),
                &["version"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for verdict in ["clean", "infected", "error"] {
            antivirus_verdicts.with_label_values(&[verdict]);
        }
        for listener in ["smtp", "submissions"] {
            smtp_sessions.with_label_values(&[listener]);
        }
        Metrics {
            registry,
            messages,
            signing_seconds,
            queue_depth,
            antivirus_verdicts,
            antivirus_known_bytes,
            smtp_sessions,
            smtp_replies,
            auth_failures,
        }
    }

    /// Counts one SMTP reply. Codes outside 200–599 count as `other`, so a
    /// bug can never grow the label set past a few hundred values.
    pub fn smtp_reply(&self, listener: &str, code: u16) {
        let code = if (200..600).contains(&code) {
            code.to_string()
        } else {
            "other".to_owned()
        };
        self.smtp_replies
            .with_label_values(&[listener, code.as_str()])
            .inc();
    }

    /// Every metric in the text format, and its content type
    /// ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<(String, &'static str), prometheus::Error> {
        let mut body = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut body)?;
        let body = String::from_utf8(body)
            .map_err(|e| prometheus::Error::Msg(format!("metrics are not UTF-8: {e}")))?;
        Ok((body, CONTENT_TYPE))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a metric built from constant names and help texts, which can
/// only fail through a typo here; the tests exercise every one.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.expect("metric definitions are constants");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric name is registered once");
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_appears_after_use() {
        let metrics = Metrics::new();
        metrics
            .messages
            .with_label_values(&["accettazione", "ok"])
            .inc();
        metrics.signing_seconds.observe(0.003);
        metrics.queue_depth.set(4);
        metrics
            .antivirus_verdicts
            .with_label_values(&["infected"])
            .inc();
        metrics
            .smtp_sessions
            .with_label_values(&["submissions"])
            .inc();
        metrics.antivirus_known_bytes.inc_by(1024);
        metrics.smtp_reply("smtp", 250);
        metrics.auth_failures.inc();
        let (body, _) = metrics.encode().unwrap();
        for line in [
            r#"pec_gateway_messages_total{kind="accettazione",outcome="ok"} 1"#,
            r#"pec_gateway_signing_seconds_bucket{le="0.005"} 1"#,
            r#"pec_gateway_signing_seconds_bucket{le="0.0005"} 0"#,
            r#"pec_gateway_signing_seconds_bucket{le="1"} 1"#,
            "pec_gateway_queue_depth 4",
            r#"pec_gateway_antivirus_verdicts_total{verdict="infected"} 1"#,
            r#"pec_gateway_antivirus_verdicts_total{verdict="clean"} 0"#,
            "pec_gateway_antivirus_known_bytes_total 1024",
            r#"pec_gateway_smtp_sessions_total{listener="submissions"} 1"#,
            r#"pec_gateway_smtp_sessions_total{listener="smtp"} 0"#,
            r#"pec_gateway_smtp_replies_total{code="250",listener="smtp"} 1"#,
            "pec_gateway_auth_failures_total 1",
            &format!(
                "pec_gateway_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "{line:?} missing from\n{body}"
            );
        }
    }

    #[test]
    fn the_content_type_is_prometheus_text_with_a_charset() {
        let (_, content_type) = Metrics::new().encode().unwrap();
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn reply_codes_outside_smtp_s_range_share_one_label() {
        let metrics = Metrics::new();
        metrics.smtp_reply("smtp", 99);
        metrics.smtp_reply("smtp", 1000);
        let (body, _) = metrics.encode().unwrap();
        assert!(body.contains(r#"pec_gateway_smtp_replies_total{code="other",listener="smtp"} 2"#));
    }

    #[test]
    fn two_instances_do_not_share_counters() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.auth_failures.inc();
        assert_eq!(b.auth_failures.get(), 0);
    }
}
