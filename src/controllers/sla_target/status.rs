//! Pure pieces of the SlaTarget controller: which domains and objects are
//! measured, and the status conditions.

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use crate::{
    api::{MailDomain, Scope, SlaObjectStatus, SlaTarget, SlaTargetStatus},
    conditions::{self, Verdict},
};

/// Condition: every object is on track.
pub const MET: &str = "Met";
/// Condition: some object burns its budget fast or has a long ongoing outage.
pub const AT_RISK: &str = "AtRisk";
/// Condition: some object exceeded its budget or the single-outage cap.
pub const BREACHED: &str = "Breached";
/// Condition: the targets contradict each other (RTO longer than the cap).
pub const TARGETS_INCONSISTENT: &str = "TargetsInconsistent";
/// Condition: the spec can be measured.
pub const READY: &str = "Ready";

/// One object to measure: a domain, or a domain in one of its sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    /// `<maildomain>` or `<maildomain>@<site>`.
    pub name: String,
    /// The MailDomain's name.
    pub maildomain: String,
    /// Its FQDN.
    pub domain: String,
    /// The site, when measured per site.
    pub site: Option<String>,
}

/// The objects `sla` measures among `domains` (those of its namespace).
pub fn select(sla: &SlaTarget, domains: &[MailDomain]) -> Vec<Measured> {
    let selector = &sla.spec.selector;
    let mut out = Vec::new();
    for md in domains {
        let name = md.name_any();
        let by_name = selector.names.contains(&name);
        let labels = md.labels();
        let by_labels = !selector.match_labels.is_empty()
            && selector
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
        if !by_name && !by_labels {
            continue;
        }
        if matches!(selector.scope, Scope::Domain | Scope::Both) {
            out.push(Measured {
                name: name.clone(),
                maildomain: name.clone(),
                domain: md.spec.domain.clone(),
                site: None,
            });
        }
        if matches!(selector.scope, Scope::Site | Scope::Both) {
            for site in &md.spec.sites {
                out.push(Measured {
                    name: format!("{name}@{site}"),
                    maildomain: name.clone(),
                    domain: md.spec.domain.clone(),
                    site: Some(site.clone()),
                });
            }
        }
    }
    out
}

/// The status for the measured `objects`, with `inconsistency` (if any) and
/// what keeps objects from being measured (`problems`: reason and message;
/// the first reason is Ready's).
pub fn compute(
    sla: &SlaTarget,
    objects: Vec<SlaObjectStatus>,
    inconsistency: Option<String>,
    problems: &[(&'static str, String)],
    now: DateTime<Utc>,
) -> SlaTargetStatus {
    let worst = objects
        .iter()
        .map(|o| o.state.as_str())
        .max_by_key(|s| rank(s))
        .unwrap_or("Met");
    let at = |state: &str| {
        objects
            .iter()
            .filter(|o| o.state == state)
            .map(|o| o.name.clone())
            .collect::<Vec<_>>()
    };
    let (breached, at_risk) = (at("Breached"), at("AtRisk"));
    let ready = match problems {
        [] => Verdict::new(
            READY,
            true,
            "Measuring",
            format!("measuring {} object(s)", objects.len()),
        ),
        [(reason, _), ..] => Verdict::new(
            READY,
            false,
            reason,
            problems
                .iter()
                .map(|(_, message)| message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let verdicts = [
        ready,
        Verdict::new(
            MET,
            breached.is_empty() && at_risk.is_empty(),
            if worst == "Met" {
                "OnTrack"
            } else {
                "NotOnTrack"
            },
            format!("worst state: {worst}"),
        ),
        if at_risk.is_empty() {
            Verdict::new(AT_RISK, false, "BudgetBurningSlowly", "no object at risk")
        } else {
            Verdict::new(
                AT_RISK,
                true,
                "BudgetBurningFast",
                format!("at risk: {}", at_risk.join(", ")),
            )
        },
        if breached.is_empty() {
            Verdict::new(
                BREACHED,
                false,
                "WithinBudget",
                "no object breached the objective or the single-outage cap",
            )
        } else {
            Verdict::new(
                BREACHED,
                true,
                "BudgetOrCapExceeded",
                format!("breached: {}", breached.join(", ")),
            )
        },
        match inconsistency {
            Some(message) => Verdict::new(
                TARGETS_INCONSISTENT,
                true,
                "RtoExceedsSingleOutageCap",
                message,
            ),
            None => Verdict::new(
                TARGETS_INCONSISTENT,
                false,
                "Consistent",
                "rto fits within the single-outage cap",
            ),
        },
    ];
    let previous = sla
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = sla.metadata.generation;
    let lowest = objects
        .iter()
        .map(|o| o.period.availability_lower)
        .fold(f64::INFINITY, f64::min);
    let least_left = objects
        .iter()
        .map(|o| o.period.budget_left_seconds / o.period.budget_seconds.max(f64::MIN_POSITIVE))
        .fold(f64::INFINITY, f64::min);
    SlaTargetStatus {
        observed_generation: generation,
        state: Some(worst.to_string()),
        worst_availability: lowest.is_finite().then(|| format!("{lowest:.4}%")),
        least_budget_left: least_left
            .is_finite()
            .then(|| format!("{:.1}%", least_left * 100.0)),
        objects,
        conditions: conditions::merge(previous, &verdicts, generation, now),
    }
}

fn rank(state: &str) -> u8 {
    match state {
        "Breached" => 2,
        "AtRisk" => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{SlaSelector, SlaTargetSpec},
        controllers::mail_domain::build::tests::domain,
    };

    fn sla(names: &[&str], scope: Scope) -> SlaTarget {
        let spec: SlaTargetSpec = serde_json::from_value(serde_json::json!({
            "selector": {"names": names, "scope": scope},
        }))
        .expect("spec");
        let mut s = SlaTarget::new("pec", spec);
        s.spec.selector = SlaSelector {
            names: names.iter().map(|n| n.to_string()).collect(),
            match_labels: Default::default(),
            scope,
        };
        s
    }

    #[test]
    fn selects_domains_and_sites_by_scope() {
        let domains = [domain(&["dc-it1", "dc-it2"])];
        let names = |scope| {
            select(&sla(&["acme"], scope), &domains)
                .into_iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Scope::Domain), ["acme"]);
        assert_eq!(names(Scope::Site), ["acme@dc-it1", "acme@dc-it2"]);
        assert_eq!(names(Scope::Both), ["acme", "acme@dc-it1", "acme@dc-it2"]);
        assert!(select(&sla(&["other"], Scope::Domain), &domains).is_empty());
    }

    #[test]
    fn spec_defaults_are_the_legal_targets() {
        let s = sla(&["acme"], Scope::Domain);
        assert_eq!(s.spec.objective, 99.8);
        assert_eq!(s.spec.single_outage_budget_fraction, 0.5);
        assert_eq!((s.spec.rto.as_str(), s.spec.rpo.as_str()), ("4h", "0s"));
        assert_eq!(s.spec.time_zone, "Europe/Rome");
    }

    #[test]
    fn worst_state_and_conditions() {
        let s = sla(&["acme"], Scope::Domain);
        let object = |name: &str, state: &str| SlaObjectStatus {
            name: name.into(),
            state: state.into(),
            ..SlaObjectStatus::default()
        };
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("valid");
        let st = compute(
            &s,
            vec![object("a", "Met"), object("b", "AtRisk")],
            Some("rto too long".into()),
            &[],
            now,
        );
        assert_eq!(st.state.as_deref(), Some("AtRisk"));
        assert!(conditions::is_true(&st.conditions, AT_RISK));
        assert!(!conditions::is_true(&st.conditions, MET));
        assert!(conditions::is_true(&st.conditions, TARGETS_INCONSISTENT));
        let problems = [
            (
                "MailDomainNotFound",
                "MailDomain ghost not found".to_string(),
            ),
            (
                "ProbeNotPossible",
                "MailDomain ro is ReceiveOnly".to_string(),
            ),
        ];
        let missing = compute(&s, vec![], None, &problems, now);
        assert!(!conditions::is_true(&missing.conditions, READY));
        let ready = missing
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .expect("Ready");
        assert_eq!(ready.reason, "MailDomainNotFound");
        assert!(ready.message.contains("ghost") && ready.message.contains("ReceiveOnly"));
    }
}
