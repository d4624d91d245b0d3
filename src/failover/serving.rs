//! Which sites serve a domain's traffic now.
//!
//! A site is eligible when it is healthy, has at least one ready gateway for
//! the domain, and either already serves or has been healthy without
//! interruption for the stabilization window. A site that stops being
//! eligible leaves at once; one that recovers rejoins only after the window,
//! so a flapping site causes at most one switch per window. If no site is
//! eligible, the last serving set stays: the domain is never blackholed.

use chrono::{DateTime, Duration, Utc};

use crate::api::{FailoverMode, SitePhase};

/// One listed site of the domain, as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Site name.
    pub site: String,
    /// Failover preference: lower serves first in ActivePassive mode.
    pub priority: i32,
    /// The site's phase; `None` while the Site is missing or not yet checked.
    pub phase: Option<SitePhase>,
    /// Since when the site has been healthy without interruption.
    pub healthy_since: Option<DateTime<Utc>>,
    /// Ready gateway pods of this domain in the site.
    pub ready_gateways: u32,
}

/// What serves now, and why it changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The serving sites, in `spec.sites` order.
    pub serving: Vec<String>,
    /// In ActivePassive mode, the serving site.
    pub active: Option<String>,
    /// No listed site is eligible: the previous serving set was kept, and
    /// the endpoints it had stay as they are.
    pub kept_last: bool,
    /// No listed site is healthy at all (a subset of `kept_last`: sites that
    /// are healthy but whose gateways are not ready yet do not raise it).
    pub no_healthy_site: bool,
    /// When a site waiting for stabilization becomes eligible (the next requeue).
    pub next_check: Option<DateTime<Utc>>,
}

/// Why a site is not eligible, or `None` if it is. Ordered checks.
pub fn ineligible(
    c: &Candidate,
    previous: &[String],
    stabilization: Duration,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    match c.phase {
        None => return Some("SiteUnknown"),
        Some(SitePhase::Down) => return Some("SiteDown"),
        Some(SitePhase::Maintenance) => return Some("Maintenance"),
        Some(SitePhase::Fenced) => return Some("Fenced"),
        Some(SitePhase::Serving | SitePhase::Degraded) => {}
    }
    if c.ready_gateways == 0 {
        return Some("NoReadyGateway");
    }
    let serves = previous.contains(&c.site);
    // A new domain (nothing served yet) takes its healthy sites at once.
    let stable = c
        .healthy_since
        .is_some_and(|since| now - since >= stabilization);
    if !serves && !previous.is_empty() && !stable {
        return Some("Stabilizing");
    }
    None
}

/// Plans the serving sites of a domain.
pub fn plan(
    mode: FailoverMode,
    stabilization: Duration,
    candidates: &[Candidate],
    previous: &[String],
    now: DateTime<Utc>,
) -> Plan {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| ineligible(c, previous, stabilization, now).is_none())
        .collect();
    let next_check = candidates
        .iter()
        .filter(|c| ineligible(c, previous, stabilization, now) == Some("Stabilizing"))
        .filter_map(|c| c.healthy_since.map(|s| s + stabilization))
        .min();
    let no_healthy_site = !candidates
        .iter()
        .any(|c| c.phase.is_some_and(SitePhase::is_healthy));
    if eligible.is_empty() {
        return Plan {
            serving: previous.to_vec(),
            active: match mode {
                FailoverMode::ActivePassive => previous.first().cloned(),
                FailoverMode::ActiveActive => None,
            },
            kept_last: true,
            no_healthy_site,
            next_check,
        };
    }
    match mode {
        FailoverMode::ActiveActive => Plan {
            serving: eligible.iter().map(|c| c.site.clone()).collect(),
            active: None,
            kept_last: false,
            no_healthy_site,
            next_check,
        },
        FailoverMode::ActivePassive => {
            // Lowest priority wins; spec order breaks ties (min_by_key keeps the first).
            let best = eligible
                .iter()
                .min_by_key(|c| c.priority)
                .map(|c| c.site.clone());
            Plan {
                serving: best.iter().cloned().collect(),
                active: best,
                kept_last: false,
                no_healthy_site,
                next_check,
            }
        }
    }
}

/// Why the serving set changed from `before` to `after`, for Events and the
/// failover metric: the reason a removed site left, else `SiteRejoined`;
/// `None` when nothing changed, nothing served before (a new domain), or
/// only sites that never served before (in `served`) were added: a site
/// joining a domain for the first time moves no traffic away from anything.
pub fn change_reason(
    before: &[String],
    after: &[String],
    served: &[String],
    candidates: &[Candidate],
    stabilization: Duration,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    // A domain's first serving sites are not a switch: nothing served before.
    if before == after || before.is_empty() {
        return None;
    }
    let removed = before.iter().find(|s| !after.contains(s));
    let rejoined = after
        .iter()
        .any(|s| !before.contains(s) && served.contains(s));
    match removed {
        Some(site) => Some(
            candidates
                .iter()
                .find(|c| c.site == *site)
                .map_or("SiteRemoved", |c| {
                    ineligible(c, before, stabilization, now).unwrap_or("PreferredSiteRejoined")
                }),
        ),
        None if rejoined => Some("SiteRejoined"),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAB: Duration = Duration::seconds(300);

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid")
    }

    fn site(name: &str, priority: i32, phase: SitePhase, healthy_since: i64) -> Candidate {
        Candidate {
            site: name.into(),
            priority,
            phase: Some(phase),
            healthy_since: phase.is_healthy().then(|| t(healthy_since)),
            ready_gateways: 2,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn active_active_serves_every_healthy_site() {
        let c = [
            site("a", 0, SitePhase::Serving, 0),
            site("b", 10, SitePhase::Degraded, 0),
        ];
        let p = plan(
            FailoverMode::ActiveActive,
            STAB,
            &c,
            &names(&["a", "b"]),
            t(1000),
        );
        assert_eq!(p.serving, names(&["a", "b"]));
        assert!(!p.no_healthy_site);
    }

    #[test]
    fn a_down_site_leaves_at_once() {
        let c = [
            site("a", 0, SitePhase::Down, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let p = plan(
            FailoverMode::ActiveActive,
            STAB,
            &c,
            &names(&["a", "b"]),
            t(1000),
        );
        assert_eq!(p.serving, names(&["b"]));
        assert_eq!(
            change_reason(
                &names(&["a", "b"]),
                &p.serving,
                &names(&["a", "b"]),
                &c,
                STAB,
                t(1000)
            ),
            Some("SiteDown")
        );
    }

    #[test]
    fn a_new_domain_starting_to_serve_is_not_a_switch() {
        let c = [
            site("a", 0, SitePhase::Serving, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let p = plan(FailoverMode::ActiveActive, STAB, &c, &[], t(1000));
        assert_eq!(p.serving, names(&["a", "b"]));
        assert_eq!(change_reason(&[], &p.serving, &[], &c, STAB, t(1000)), None);
    }

    #[test]
    fn a_site_joining_for_the_first_time_is_not_a_switch() {
        let c = [
            site("a", 0, SitePhase::Serving, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let (a, ab) = (names(&["a"]), names(&["a", "b"]));
        // b's gateways became ready after a's: b joins, nothing moved away.
        assert_eq!(change_reason(&a, &ab, &a, &c, STAB, t(1000)), None);
        // b served before and left: it rejoins.
        assert_eq!(
            change_reason(&a, &ab, &ab, &c, STAB, t(1000)),
            Some("SiteRejoined")
        );
        // A first-time site joining while another leaves is still a switch.
        let down = [
            site("a", 0, SitePhase::Down, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        assert_eq!(
            change_reason(&a, &names(&["b"]), &a, &down, STAB, t(1000)),
            Some("SiteDown")
        );
    }

    #[test]
    fn a_recovered_site_rejoins_only_after_stabilization() {
        let c = [
            site("a", 0, SitePhase::Serving, 1000),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let before = names(&["b"]);
        let early = plan(FailoverMode::ActiveActive, STAB, &c, &before, t(1299));
        assert_eq!(early.serving, names(&["b"]));
        assert_eq!(early.next_check, Some(t(1300)));
        let later = plan(FailoverMode::ActiveActive, STAB, &c, &before, t(1300));
        assert_eq!(later.serving, names(&["a", "b"]));
    }

    #[test]
    fn a_new_domain_takes_healthy_sites_without_waiting() {
        let c = [
            site("a", 0, SitePhase::Serving, 990),
            site("b", 10, SitePhase::Serving, 995),
        ];
        assert_eq!(
            plan(FailoverMode::ActiveActive, STAB, &c, &[], t(1000)).serving,
            names(&["a", "b"])
        );
    }

    #[test]
    fn active_passive_serves_the_preferred_site_and_fails_back_after_stabilization() {
        let healthy = [
            site("a", 0, SitePhase::Serving, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let p = plan(FailoverMode::ActivePassive, STAB, &healthy, &[], t(1000));
        assert_eq!(
            (p.serving.clone(), p.active.clone()),
            (names(&["a"]), Some("a".into()))
        );

        let a_down = [
            site("a", 0, SitePhase::Down, 0),
            site("b", 10, SitePhase::Serving, 0),
        ];
        let p = plan(
            FailoverMode::ActivePassive,
            STAB,
            &a_down,
            &names(&["a"]),
            t(1010),
        );
        assert_eq!(p.active.as_deref(), Some("b"));

        let a_back = [
            site("a", 0, SitePhase::Serving, 1100),
            site("b", 10, SitePhase::Serving, 0),
        ];
        assert_eq!(
            plan(
                FailoverMode::ActivePassive,
                STAB,
                &a_back,
                &names(&["b"]),
                t(1200)
            )
            .active
            .as_deref(),
            Some("b")
        );
        assert_eq!(
            plan(
                FailoverMode::ActivePassive,
                STAB,
                &a_back,
                &names(&["b"]),
                t(1400)
            )
            .active
            .as_deref(),
            Some("a")
        );
    }

    #[test]
    fn with_no_healthy_site_the_last_serving_set_stays() {
        let c = [
            site("a", 0, SitePhase::Down, 0),
            site("b", 10, SitePhase::Fenced, 0),
        ];
        let p = plan(
            FailoverMode::ActiveActive,
            STAB,
            &c,
            &names(&["b"]),
            t(1000),
        );
        assert_eq!(p.serving, names(&["b"]));
        assert!(p.kept_last && p.no_healthy_site);
    }

    #[test]
    fn gateways_still_starting_are_not_an_outage_alarm() {
        let mut a = site("a", 0, SitePhase::Serving, 0);
        a.ready_gateways = 0;
        let p = plan(FailoverMode::ActiveActive, STAB, &[a], &[], t(1000));
        assert!(p.serving.is_empty() && p.kept_last);
        assert!(!p.no_healthy_site);
    }

    #[test]
    fn a_site_without_ready_gateways_does_not_serve() {
        let mut a = site("a", 0, SitePhase::Serving, 0);
        a.ready_gateways = 0;
        let c = [a, site("b", 10, SitePhase::Serving, 0)];
        assert_eq!(
            plan(
                FailoverMode::ActiveActive,
                STAB,
                &c,
                &names(&["a", "b"]),
                t(1000)
            )
            .serving,
            names(&["b"])
        );
    }

    #[test]
    fn a_flapping_site_causes_at_most_one_switch_per_window() {
        // The site goes down and up every 20 s; count changes of the serving set over one window.
        let mut serving = names(&["a", "b"]);
        let mut switches = 0;
        let mut healthy_since = 0;
        for step in 0..15 {
            let now = 1000 + step * 20;
            let down = step % 2 == 0;
            if !down {
                healthy_since = now;
            }
            let a = if down {
                site("a", 0, SitePhase::Down, 0)
            } else {
                site("a", 0, SitePhase::Serving, healthy_since)
            };
            let p = plan(
                FailoverMode::ActiveActive,
                STAB,
                &[a, site("b", 10, SitePhase::Serving, 0)],
                &serving,
                t(now),
            );
            if p.serving != serving {
                switches += 1;
                serving = p.serving;
            }
        }
        assert_eq!(switches, 1);
    }
}
