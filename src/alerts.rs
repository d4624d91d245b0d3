//! The operational alerting rules (`pec-operator rules`), shipped beside the
//! SLA ones as `charts/pec-operator/files/operational-rules.yaml` (a test
//! compares them). Each alert names the object it is about in its summary
//! and description, links its section of `docs/runbooks.md` under a base URL
//! the platform engineer chooses (`--runbook-base-url`, chart value
//! `alerts.runbookBaseUrl`), and carries a `severity` of `critical` or
//! `warning`, which `--critical`/`--warning` (chart `alerts.severities`)
//! rename for an Alertmanager that routes on other names.
//!
//! Like the SLA rules, every expression aggregates by the object before it
//! compares, so two operator replicas (or an old and a new leader) give one
//! alert, not two or a failed evaluation.

use crate::sla::rules::{File, Group, Rule};

/// The runbook base of the shipped file: a placeholder the chart replaces
/// with `alerts.runbookBaseUrl`.
pub const DEFAULT_RUNBOOK_BASE: &str = "https://pec-operator.example/docs/runbooks.md";

/// What the generated rules say besides their expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where `docs/runbooks.md` is served; each alert links `<base>#<alert>`.
    pub runbook_base: String,
    /// The severity of alerts that need a person now.
    pub critical: String,
    /// The severity of alerts that need a person today.
    pub warning: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runbook_base: DEFAULT_RUNBOOK_BASE.into(),
            critical: "critical".into(),
            warning: "warning".into(),
        }
    }
}

/// How soon an alert needs a person.
#[derive(Clone, Copy)]
pub(crate) enum Severity {
    /// Now.
    Critical,
    /// Today.
    Warning,
}

/// An alerting rule with the annotations every alert of this project
/// carries: `summary` and `description` (naming the object), and
/// `runbook_url` (its section of `docs/runbooks.md` under the base).
pub(crate) fn rule(
    options: &Options,
    name: &'static str,
    severity: Severity,
    expr: String,
    for_: &'static str,
    summary: String,
    description: String,
) -> Rule {
    let severity = match severity {
        Severity::Critical => options.critical.clone(),
        Severity::Warning => options.warning.clone(),
    };
    Rule {
        record: None,
        alert: Some(name),
        expr,
        for_: Some(for_),
        labels: Some([("severity", severity)].into()),
        annotations: Some(
            [
                ("summary", summary),
                ("description", description),
                (
                    "runbook_url",
                    format!("{}#{}", options.runbook_base, anchor(name)),
                ),
            ]
            .into(),
        ),
    }
}

/// One operational alert.
struct Alert {
    name: &'static str,
    severity: Severity,
    expr: &'static str,
    for_: &'static str,
    summary: &'static str,
    description: &'static str,
}

const KEY: &str = "SigningKey {{ $labels.namespace }}/{{ $labels.signingkey }}";
const DOMAIN: &str =
    "MailDomain {{ $labels.namespace }}/{{ $labels.maildomain }} ({{ $labels.domain }})";
const SITE: &str = "Site {{ $labels.site }}";

fn alerts() -> Vec<Alert> {
    use Severity::{Critical, Warning};
    vec![
        Alert {
            name: "PecCertificateExpiring",
            severity: Warning,
            expr: "max by (namespace, signingkey) (pec_certificate_expiring) == 1",
            for_: "10m",
            summary: "Certificate of {key} is within renewBefore of expiry with no successor",
            description: "The active certificate of {key} is within renewBefore of its expiry and no renewed generation is ready. Check the key's Issued and Ready conditions and its issuer.",
        },
        Alert {
            name: "PecCertificateExpiryImminent",
            severity: Critical,
            expr: "min by (namespace, signingkey) (pec_certificate_not_after_timestamp_seconds) - time() < 7 * 86400",
            for_: "5m",
            summary: "Certificate of {key} expires within 7 days",
            description: "The active certificate of {key} expires within 7 days; receipts signed after that will not verify. Renew it or switch its issuer now.",
        },
        Alert {
            name: "PecCertificateRenewalFailing",
            severity: Warning,
            expr: "time() - max by (namespace, signingkey) (pec_certificate_renewal_timestamp_seconds) > 3600",
            for_: "5m",
            summary: "Renewal of {key} is over an hour late",
            description: "The successor of the active certificate of {key} was due over an hour ago and is not active.",
        },
        Alert {
            name: "PecSigningKeyFailing",
            severity: Warning,
            expr: "sum by (namespace, signingkey, reason) (increase(pec_signing_key_failures_total[15m])) > 0",
            for_: "0s",
            summary: "{key} fails: {{ $labels.reason }}",
            description: "Lifecycle steps of {key} failed in the last 15 minutes with reason {{ $labels.reason }}; the operator retries with backoff and keeps the current generation in use.",
        },
        Alert {
            name: "PecSiteDown",
            severity: Critical,
            expr: "max by (site) (pec_site_phase{phase=\"Down\"}) == 1",
            for_: "1m",
            summary: "{site} is Down",
            description: "{site} failed its health checks; its domains' traffic moved to their other sites. Check its nodes.",
        },
        Alert {
            name: "PecSiteFenced",
            severity: Critical,
            expr: "max by (site) (pec_site_fenced) == 1",
            for_: "0s",
            summary: "{site} is fenced",
            description: "{site} flapped and serves nothing until a person clears spec.fenced.",
        },
        Alert {
            name: "PecSiteMaintenanceRefused",
            severity: Warning,
            expr: "max by (site) (pec_site_maintenance_refused) == 1",
            for_: "5m",
            summary: "Maintenance of {site} is refused",
            description: "Taking {site} out would leave a domain with no serving site; bring another site up first (or force it).",
        },
        Alert {
            name: "PecDomainNoHealthySite",
            severity: Critical,
            expr: "max by (namespace, maildomain, domain) (pec_domain_no_healthy_site) == 1",
            for_: "1m",
            summary: "{domain} has no healthy site",
            description: "No listed site of {domain} is healthy; its Service keeps the last endpoints. The domain is likely down.",
        },
        Alert {
            name: "PecDomainOnOneSite",
            severity: Warning,
            expr: "max by (namespace, maildomain, domain) (pec_domain_serving_sites) == 1",
            for_: "15m",
            summary: "{domain} is served from one site only",
            description: "{domain} runs in one data center; PEC asks for two. Check its other sites.",
        },
        Alert {
            name: "PecOperatorNoLeader",
            severity: Critical,
            expr: "max(pec_leader) == 0",
            for_: "2m",
            summary: "No pec-operator replica leads",
            description: "The operator's replicas run but none holds the leader Lease: nothing reconciles, fails over or rotates keys.",
        },
        Alert {
            name: "PecOperatorAbsent",
            severity: Critical,
            expr: "absent(pec_build_info)",
            for_: "5m",
            summary: "pec-operator is not scraped",
            description: "No replica of the operator has been scraped for 5 minutes: nothing reconciles, fails over, rotates keys or measures the SLA.",
        },
        Alert {
            name: "PecReconcileErrors",
            severity: Warning,
            expr: "sum by (controller, reason) (rate(pec_reconcile_errors_total[10m])) > 0",
            for_: "15m",
            summary: "The {{ $labels.controller }} controller keeps failing: {{ $labels.reason }}",
            description: "Reconciles of the {{ $labels.controller }} controller have failed with {{ $labels.reason }} for 15 minutes; its Events and the objects' Ready conditions say which objects.",
        },
    ]
}

/// The anchor of `alert`'s section in `docs/runbooks.md` (a lower-case
/// heading).
pub fn anchor(alert: &str) -> String {
    alert.to_ascii_lowercase()
}

/// The operational rules file, as YAML.
pub fn yaml(options: &Options) -> Result<String, serde_yaml::Error> {
    let objects = |text: &str| {
        text.replace("{key}", KEY)
            .replace("{domain}", DOMAIN)
            .replace("{site}", SITE)
    };
    let rules = alerts()
        .into_iter()
        .map(|a| {
            rule(
                options,
                a.name,
                a.severity,
                a.expr.to_string(),
                a.for_,
                objects(a.summary),
                objects(a.description),
            )
        })
        .collect();
    let file = File {
        groups: vec![Group {
            name: "pec-operational-alerts",
            rules,
        }],
    };
    Ok(format!(
        "# Generated by `pec-operator rules` from src/alerts.rs; do not edit.\n{}",
        serde_yaml::to_string(&file)?
    ))
}

/// The names of the operational alerts.
pub fn names() -> Vec<&'static str> {
    alerts().iter().map(|a| a.name).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Fails when the chart's `files/<file>` is not what `command` prints.
    pub(crate) fn assert_shipped(file: &str, rendered: &str, command: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("charts/pec-operator/files")
            .join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "{} drifted; run `cargo run -- {command} > {}`",
            path.display(),
            path.display()
        );
    }

    #[test]
    fn shipped_rules_match_the_generator() {
        let rendered = yaml(&Options::default()).expect("rules render");
        assert_shipped("operational-rules.yaml", &rendered, "rules");
    }

    #[test]
    fn every_alert_has_a_runbook_section() {
        let runbooks = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks.md"),
        )
        .expect("docs/runbooks.md");
        let sla = crate::sla::rules::yaml(&Options::default()).expect("SLA rules render");
        let sla_alerts = sla
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- alert: "))
            .collect::<Vec<_>>();
        assert_eq!(sla_alerts.len(), 6, "{sla_alerts:?}");
        for name in names().into_iter().chain(sla_alerts) {
            assert!(
                runbooks.contains(&format!("\n## {name}\n")),
                "docs/runbooks.md has no section `## {name}`"
            );
        }
    }

    #[test]
    fn options_rename_severities_and_move_the_runbooks() {
        let options = Options {
            runbook_base: "https://wiki.provider.example/pec".into(),
            critical: "page".into(),
            warning: "ticket".into(),
        };
        let y = yaml(&options).expect("rules render");
        assert!(y.contains("runbook_url: https://wiki.provider.example/pec#pecsitedown"));
        assert!(y.contains("severity: page") && y.contains("severity: ticket"));
        assert!(!y.contains("severity: critical") && !y.contains(DEFAULT_RUNBOOK_BASE));
    }

    #[test]
    fn summaries_name_the_object() {
        let y = yaml(&Options::default()).expect("rules render");
        assert!(!y.contains("{key}") && !y.contains("{domain}") && !y.contains("{site}"));
        assert!(y.contains("{{ $labels.signingkey }}") && y.contains("{{ $labels.maildomain }}"));
    }
}
