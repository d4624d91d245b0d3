//! `pec-operator sla report`: where each SlaTarget stands, for a person on
//! call, as a text table or JSON. Pure rendering of what status holds.

use serde_json::{Value, json};

use crate::api::{PeriodStatus, SlaTarget};

fn row(target: &str, object: &str, p: &PeriodStatus, state: &str) -> [String; 9] {
    [
        target.to_string(),
        object.to_string(),
        p.label.clone(),
        format!("{:.4}%", p.availability_lower),
        format!("{:.4}%", p.availability_upper),
        format!("{:.0}s/{:.0}s", p.budget_used_seconds, p.budget_seconds),
        format!(
            "{:.0}s/{:.0}s",
            p.longest_outage.as_ref().map_or(0.0, |o| o.seconds),
            p.single_outage_cap_seconds
        ),
        format!("{:.0}s", p.unobserved_seconds),
        state.to_string(),
    ]
}

/// The report as a text table: one line per object and period, current period first.
pub fn text(targets: &[SlaTarget]) -> String {
    let header = [
        "SLATARGET",
        "OBJECT",
        "PERIOD",
        "AVAIL(LOW)",
        "AVAIL(HIGH)",
        "BUDGET USED",
        "LONGEST/CAP",
        "UNOBSERVED",
        "STATE",
    ]
    .map(String::from);
    let mut rows = vec![header];
    let mut exclusions = Vec::new();
    for t in targets {
        let name = format!(
            "{}/{}",
            t.metadata.namespace.clone().unwrap_or_default(),
            t.metadata.name.clone().unwrap_or_default()
        );
        for o in t.status.iter().flat_map(|s| &s.objects) {
            let ongoing = o.ongoing_outage.as_ref().map_or(String::new(), |x| {
                format!(" (outage ongoing {:.0}s)", x.seconds)
            });
            rows.push(row(
                &name,
                &o.name,
                &o.period,
                &format!("{}{ongoing}", o.state),
            ));
            for p in o.history.iter().rev() {
                let met = if p.met == Some(true) { "met" } else { "missed" };
                rows.push(row(&name, &o.name, p, met));
            }
        }
        exclusions.extend(t.spec.exclusions.iter().map(|e| {
            format!(
                "{name}: declared maintenance {} to {} ({}): measured as usual, not subtracted",
                e.start.0, e.end.0, e.reason
            )
        }));
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .chain(exclusions)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The report as JSON: every SlaTarget with its objects' current and past periods.
pub fn json(targets: &[SlaTarget]) -> Value {
    Value::Array(
        targets
            .iter()
            .map(|t| {
                json!({
                    "namespace": t.metadata.namespace,
                    "name": t.metadata.name,
                    "objective": t.spec.objective,
                    "state": t.status.as_ref().and_then(|s| s.state.clone()),
                    "exclusions": t.spec.exclusions,
                    "objects": t.status.as_ref().map(|s| s.objects.clone()).unwrap_or_default(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{OutageStatus, SlaObjectStatus, SlaTargetSpec, SlaTargetStatus};

    fn target() -> SlaTarget {
        let spec: SlaTargetSpec =
            serde_json::from_value(json!({"selector": {"names": ["acme"]}})).expect("spec");
        let mut t = SlaTarget::new("pec", spec);
        t.metadata.namespace = Some("mail".into());
        let period = |label: &str, met| PeriodStatus {
            label: label.into(),
            availability_lower: 99.95,
            availability_upper: 99.97,
            budget_seconds: 20_728.8,
            budget_used_seconds: 3600.0,
            single_outage_cap_seconds: 10_364.4,
            longest_outage: Some(OutageStatus {
                seconds: 1800.0,
                ..OutageStatus::default()
            }),
            met,
            ..PeriodStatus::default()
        };
        t.status = Some(SlaTargetStatus {
            state: Some("Met".into()),
            objects: vec![SlaObjectStatus {
                name: "acme".into(),
                domain: "pec.acme.it".into(),
                state: "Met".into(),
                period: period("2026-09/12", None),
                history: vec![period("2026-05/08", Some(true))],
                ..SlaObjectStatus::default()
            }],
            ..SlaTargetStatus::default()
        });
        t
    }

    #[test]
    fn text_lists_current_and_past_periods() {
        let out = text(&[target()]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].contains("mail/pec")
                && lines[1].contains("2026-09/12")
                && lines[1].contains("3600s/20729s")
        );
        assert!(lines[2].contains("2026-05/08") && lines[2].ends_with("met"));
        assert!(lines[1].contains("1800s/10364s"));
    }

    #[test]
    fn declared_maintenance_is_listed_separately_never_subtracted() {
        let mut t = target();
        let at = |s| crate::time::to_k8s(chrono::DateTime::from_timestamp(s, 0).expect("valid"));
        t.spec.exclusions = vec![crate::api::Exclusion {
            start: at(1_790_000_000),
            end: at(1_790_003_600),
            reason: "router firmware".into(),
        }];
        let out = text(&[t]);
        let last = out.lines().last().expect("a line");
        assert!(
            last.contains("router firmware") && last.contains("not subtracted"),
            "{last}"
        );
        assert!(
            out.contains("3600s/20729s"),
            "the downtime is still counted"
        );
    }

    #[test]
    fn json_carries_the_objects() {
        let v = json(&[target()]);
        assert_eq!(v[0]["objects"][0]["period"]["budgetSeconds"], 20_728.8);
        assert_eq!(v[0]["state"], "Met");
    }
}
