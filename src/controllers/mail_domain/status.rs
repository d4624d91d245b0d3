//! Pure status computation for a MailDomain, from its sites and Deployments.

use chrono::{DateTime, Utc};
use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Time};
use kube::ResourceExt;

use super::{build::SITE_LABEL, gateway::GatewaySigning, observe::Resolution, references::Problem};

/// How a MailDomain's `signingKeyRef` resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyResolution {
    /// No key named.
    NoRef,
    /// The named key does not exist.
    NotFound(String),
    /// The named key has no active generation.
    NotReady(String),
    /// The active generation the gateways use.
    Active(GatewaySigning),
    /// The key's certificate does not name the domain: receipts would be
    /// signed in another domain's name. The gateways keep the generation
    /// they have (nothing that works is taken away), and the domain is not
    /// Ready until the key or the reference is fixed.
    Uncovered {
        /// The generation the gateways keep using.
        signing: GatewaySigning,
        /// The names the key's certificate carries.
        names: Vec<String>,
    },
}

impl KeyResolution {
    /// How `md`'s reference resolves, given the SigningKey found under that name.
    pub fn of(md: &MailDomain, found: Option<&crate::api::SigningKey>) -> Self {
        match (&md.spec.signing_key_ref, found) {
            (None, _) => Self::NoRef,
            (Some(name), None) => Self::NotFound(name.clone()),
            (Some(name), Some(sk)) => match GatewaySigning::of(sk) {
                None => Self::NotReady(name.clone()),
                Some(signing) if !covers(sk, &md.spec.domain) => Self::Uncovered {
                    signing,
                    names: certificate_names(sk),
                },
                Some(signing) => Self::Active(signing),
            },
        }
    }

    /// The configuration the gateways get, if any.
    pub fn config(&self) -> Option<&GatewaySigning> {
        match self {
            Self::Active(c) | Self::Uncovered { signing: c, .. } => Some(c),
            _ => None,
        }
    }
}

/// The DNS names a SigningKey's certificates carry: `dnsNames`, or the
/// common name when there are none.
fn certificate_names(sk: &crate::api::SigningKey) -> Vec<String> {
    if sk.spec.dns_names.is_empty() {
        vec![sk.spec.subject.common_name.clone()]
    } else {
        sk.spec.dns_names.clone()
    }
}

/// Whether `sk`'s certificate names `domain`, as a TLS client would match
/// it: case-insensitively, a trailing dot ignored, `*.` standing for exactly
/// one leftmost label.
pub fn covers(sk: &crate::api::SigningKey, domain: &str) -> bool {
    names_cover(&certificate_names(sk), domain)
}

/// Whether one of a certificate's DNS `names` matches `domain` (see [`covers`]).
pub fn names_cover(names: &[String], domain: &str) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
    let domain = norm(domain);
    names.iter().any(|name| {
        let name = norm(name);
        match name.strip_prefix("*.") {
            Some(suffix) => domain
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => name == domain,
        }
    })
}
use crate::{
    api::{Failover, MailDomain, MailDomainStatus, SiteGatewayStatus},
    conditions::{self, Verdict},
    failover::serving::Plan,
    time::to_k8s,
};

/// Condition: every listed site runs its full count of ready, updated gateways.
pub const READY: &str = "Ready";
/// Condition: some listed site is below full strength.
pub const DEGRADED: &str = "Degraded";
/// Condition: a rollout is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition: the domain is served from at least two data centers.
pub const SITE_REDUNDANCY: &str = "SiteRedundancy";
pub use crate::controllers::names::NO_HEALTHY_SITE;
/// Condition: the signing key reference resolves to a usable key.
pub const SIGNING_KEY_RESOLVED: &str = "SigningKeyResolved";
/// Condition: the Secrets, claim and ConfigMaps the spec names exist and fit
/// (see `references`).
pub const REFERENCES_RESOLVED: &str = "ReferencesResolved";

/// The messages of `problems`, one sentence each.
fn joined(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Reasons.
pub mod reason {
    /// Every site at full strength.
    pub const ALL_SITES_READY: &str = "AllSitesReady";
    /// A listed Site does not exist.
    pub const SITE_NOT_FOUND: &str = "SiteNotFound";
    /// Some gateways are not ready yet.
    pub const GATEWAYS_NOT_READY: &str = "GatewaysNotReady";
    /// Some site is below full strength.
    pub const SITE_BELOW_STRENGTH: &str = "SiteBelowStrength";
    /// Every site is at full strength.
    pub const AT_FULL_STRENGTH: &str = "AtFullStrength";
    /// Pods are being replaced or added.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// No rollout under way.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// Two or more sites.
    pub const MULTI_SITE: &str = "MultiSite";
    /// Only one site: PEC needs two data centers.
    pub const SINGLE_SITE: &str = "SingleSite";
    /// The SigningKey has an active generation the gateways use.
    pub const KEY_ACTIVE: &str = "KeyActive";
    /// The SigningKey exists but has no active certificate.
    pub const KEY_NOT_READY: &str = "SigningKeyNotReady";
    /// The named SigningKey does not exist.
    pub const KEY_NOT_FOUND: &str = "SigningKeyNotFound";
    /// The named SigningKey's certificate does not name the domain.
    pub const KEY_DOES_NOT_COVER_DOMAIN: &str = "SigningKeyDoesNotCoverDomain";
    /// No signing key named.
    pub const NO_SIGNING_KEY: &str = "NoSigningKeyRef";
    /// No listed site is healthy with a ready gateway.
    pub const ALL_SITES_UNAVAILABLE: &str = "AllSitesUnavailable";
    /// At least one site serves.
    pub const SERVING: &str = "Serving";
}

/// Gateway counts of one site, from its Deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    desired: i32,
    ready: i32,
    updated: i32,
    total: i32,
    settled: bool,
}

impl Counts {
    fn of(desired: i32, deployment: Option<&Deployment>) -> Self {
        let Some(d) = deployment else {
            return Self {
                desired,
                ..Self::default()
            };
        };
        let status = d.status.clone().unwrap_or_default();
        Self {
            desired,
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            total: status.replicas.unwrap_or(0),
            settled: status.observed_generation >= d.metadata.generation,
        }
    }

    fn at_full_strength(&self) -> bool {
        self.settled && self.ready >= self.desired && self.updated >= self.desired
    }

    fn rolling(&self) -> bool {
        !self.settled || self.updated < self.desired || self.total > self.desired
    }
}

/// How what a MailDomain names resolved: its SigningKey, the other objects
/// (`references`: the problems found, empty when all resolve) and its Sites.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    /// The SigningKey.
    pub key: &'a KeyResolution,
    /// The problems of the Secrets, claim and ConfigMaps it names.
    pub references: &'a [Problem],
    /// The Sites.
    pub sites: &'a Resolution,
}

/// The status of `md`, given how what it names resolved, its Deployments,
/// the serving plan and the reason the serving sites changed in this pass.
pub fn compute(
    md: &MailDomain,
    resolved: &Resolved<'_>,
    deployments: &[Deployment],
    plan: &Plan,
    switch: Option<&str>,
    now: DateTime<Utc>,
) -> MailDomainStatus {
    let Resolved {
        key,
        references,
        sites,
    } = *resolved;
    let desired = md.spec.gateway.replicas_per_site;
    let per_site: Vec<(String, Counts)> = md
        .spec
        .sites
        .iter()
        .map(|site| {
            let d = deployments
                .iter()
                .find(|d| d.labels().get(SITE_LABEL) == Some(site));
            (site.clone(), Counts::of(desired, d))
        })
        .collect();
    let ready_total: i32 = per_site.iter().map(|(_, c)| c.ready.min(c.desired)).sum();
    let desired_total: i32 = per_site.iter().map(|(_, c)| c.desired).sum();
    let weak: Vec<String> = per_site
        .iter()
        .filter(|(_, c)| !c.at_full_strength())
        .map(|(s, c)| format!("{s} {}/{}", c.ready, c.desired))
        .collect();

    let ready = if let KeyResolution::Uncovered { signing, names } = key {
        Verdict::new(
            READY,
            false,
            reason::KEY_DOES_NOT_COVER_DOMAIN,
            format!(
                "SigningKey {} certifies [{}], not {}: receipts would be signed in another domain's name; add {} to its dnsNames or name another key in spec.signingKeyRef",
                signing.config.key,
                names.join(", "),
                md.spec.domain,
                md.spec.domain
            ),
        )
    } else if let Some(first) = references.first() {
        Verdict::new(READY, false, first.reason, joined(references))
    } else if !sites.missing.is_empty() {
        Verdict::new(
            READY,
            false,
            reason::SITE_NOT_FOUND,
            format!(
                "Site {} not found; create it or remove it from spec.sites",
                sites.missing.join(", ")
            ),
        )
    } else if weak.is_empty() {
        Verdict::new(
            READY,
            true,
            reason::ALL_SITES_READY,
            format!(
                "{ready_total}/{desired_total} gateways ready in {} sites",
                per_site.len()
            ),
        )
    } else {
        Verdict::new(
            READY,
            false,
            reason::GATEWAYS_NOT_READY,
            format!("ready gateways: {}", weak.join(", ")),
        )
    };
    let degraded = if weak.is_empty() {
        Verdict::new(
            DEGRADED,
            false,
            reason::AT_FULL_STRENGTH,
            "every site at full strength",
        )
    } else {
        Verdict::new(
            DEGRADED,
            true,
            reason::SITE_BELOW_STRENGTH,
            format!("below full strength: {}", weak.join(", ")),
        )
    };
    let rolling: Vec<&str> = per_site
        .iter()
        .filter(|(_, c)| c.rolling())
        .map(|(s, _)| s.as_str())
        .collect();
    let progressing = if rolling.is_empty() {
        Verdict::new(
            PROGRESSING,
            false,
            reason::ROLLOUT_COMPLETE,
            "no rollout under way",
        )
    } else {
        Verdict::new(
            PROGRESSING,
            true,
            reason::ROLLING_OUT,
            format!("rolling out in {}", rolling.join(", ")),
        )
    };
    let redundancy = if md.spec.sites.len() >= 2 {
        Verdict::new(
            SITE_REDUNDANCY,
            true,
            reason::MULTI_SITE,
            format!("served from {} sites", md.spec.sites.len()),
        )
    } else {
        Verdict::new(
            SITE_REDUNDANCY,
            false,
            reason::SINGLE_SITE,
            "PEC services must run in at least two data centers; add a second Site to spec.sites",
        )
    };
    let signing_key = match key {
        KeyResolution::Active(c) => Verdict::new(
            SIGNING_KEY_RESOLVED,
            true,
            reason::KEY_ACTIVE,
            format!(
                "gateways sign with SigningKey {} generation {}",
                c.config.key, c.config.generation
            ),
        ),
        KeyResolution::Uncovered { signing, names } => Verdict::new(
            SIGNING_KEY_RESOLVED,
            false,
            reason::KEY_DOES_NOT_COVER_DOMAIN,
            format!(
                "SigningKey {} certifies [{}], not {}",
                signing.config.key,
                names.join(", "),
                md.spec.domain
            ),
        ),
        KeyResolution::NotReady(name) => Verdict::new(
            SIGNING_KEY_RESOLVED,
            false,
            reason::KEY_NOT_READY,
            format!("SigningKey {name} has no active certificate yet; see its conditions"),
        ),
        KeyResolution::NotFound(name) => Verdict::new(
            SIGNING_KEY_RESOLVED,
            false,
            reason::KEY_NOT_FOUND,
            format!(
                "SigningKey {name} not found in this namespace; create it or fix spec.signingKeyRef"
            ),
        ),
        KeyResolution::NoRef => Verdict::new(
            SIGNING_KEY_RESOLVED,
            false,
            reason::NO_SIGNING_KEY,
            "spec.signingKeyRef is empty: receipts and envelopes cannot be signed",
        ),
    };
    let resolved = match references.first() {
        None => Verdict::new(
            REFERENCES_RESOLVED,
            true,
            super::references::reason::RESOLVED,
            "every Secret, claim and ConfigMap the gateways read exists and fits",
        ),
        Some(first) => Verdict::new(REFERENCES_RESOLVED, false, first.reason, joined(references)),
    };
    let old_generation = md.status.as_ref().and_then(|s| s.signing_key_generation);
    let signing_key_generation = match key {
        KeyResolution::Active(c) if rolling.is_empty() && sites.missing.is_empty() => {
            Some(c.config.generation)
        }
        _ => old_generation,
    };

    let stranded = if plan.no_healthy_site {
        Verdict::new(
            NO_HEALTHY_SITE,
            true,
            reason::ALL_SITES_UNAVAILABLE,
            format!(
                "no listed site is healthy with a ready gateway; keeping the last serving sites [{}]",
                plan.serving.join(", ")
            ),
        )
    } else {
        Verdict::new(
            NO_HEALTHY_SITE,
            false,
            reason::SERVING,
            format!("serving from [{}]", plan.serving.join(", ")),
        )
    };

    let old = md.status.clone().unwrap_or_default();
    let last_failover = match switch {
        Some(why) => Some(Failover {
            from: old.serving_sites.clone(),
            to: plan.serving.clone(),
            at: to_k8s(now),
            reason: why.to_string(),
        }),
        None => old.last_failover.clone(),
    };
    let previous = old.conditions.as_slice();
    let generation = md.metadata.generation;
    MailDomainStatus {
        observed_generation: generation,
        serving_sites: plan.serving.clone(),
        signing_key_generation,
        active_site: plan.active.clone(),
        last_failover,
        gateways: Some(format!("{ready_total}/{desired_total}")),
        sites: per_site
            .iter()
            .map(|(site, c)| SiteGatewayStatus {
                site: site.clone(),
                desired: c.desired,
                ready: c.ready,
                first_served_time: first_served(&old, site, &plan.serving, now),
            })
            .collect(),
        conditions: conditions::merge(
            previous,
            &[
                ready,
                degraded,
                progressing,
                redundancy,
                stranded,
                signing_key,
                resolved,
            ],
            generation,
            now,
        ),
    }
}

/// When `site` first served: as `old` recorded it, else `now` if it serves
/// now (`serving`) or did in `old`. The second case is a status written
/// before the time was recorded, whose serving sites have served.
fn first_served(
    old: &MailDomainStatus,
    site: &String,
    serving: &[String],
    now: DateTime<Utc>,
) -> Option<Time> {
    old.sites
        .iter()
        .find(|s| s.site == *site)
        .and_then(|s| s.first_served_time.clone())
        .or_else(|| {
            (serving.contains(site) || old.serving_sites.contains(site)).then(|| to_k8s(now))
        })
}

/// The sites that have served the domain at some time, as `old` recorded
/// it: a site among them that serves again rejoins; any other joins.
pub fn served_sites(old: &MailDomainStatus) -> Vec<String> {
    old.sites
        .iter()
        .filter(|s| s.first_served_time.is_some())
        .map(|s| s.site.clone())
        .chain(old.serving_sites.iter().cloned())
        .collect()
}

/// The status of `md` while `holder` holds its domain name: `Ready` (and
/// `ReferencesResolved`) false naming the holder, everything else as it was.
pub fn duplicate(md: &MailDomain, holder: &MailDomain, now: DateTime<Utc>) -> MailDomainStatus {
    let message = format!(
        "domain {} belongs to MailDomain {}/{}, created earlier; this one gets no gateways until its spec.domain changes or the other is deleted",
        md.spec.domain,
        holder.metadata.namespace.clone().unwrap_or_default(),
        holder.name_any()
    );
    let conflict = super::references::reason::DOMAIN_CONFLICT;
    let old = md.status.clone().unwrap_or_default();
    MailDomainStatus {
        observed_generation: md.metadata.generation,
        conditions: conditions::merge(
            &old.conditions,
            &[
                Verdict::new(READY, false, conflict, message.clone()),
                Verdict::new(REFERENCES_RESOLVED, false, conflict, message),
            ],
            md.metadata.generation,
            now,
        )
        .into_iter()
        .chain(
            old.conditions
                .iter()
                .filter(|c| c.type_ != READY && c.type_ != REFERENCES_RESOLVED)
                .cloned(),
        )
        .collect(),
        ..old
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::controllers::mail_domain::{
        build::{labels, tests::domain},
        observe::ResolvedSite,
    };
    use k8s_openapi::{
        api::apps::v1::DeploymentStatus, apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
    }

    fn deployment(site: &str, ready: i32, updated: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                labels: Some(labels("acme", site)),
                generation: Some(1),
                ..ObjectMeta::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                replicas: Some(updated),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn resolution(present: &[&str], missing: &[&str]) -> Resolution {
        Resolution {
            present: present
                .iter()
                .map(|s| ResolvedSite {
                    name: s.to_string(),
                    node_selector: Default::default(),
                    nodes: 0,
                })
                .collect(),
            missing: missing.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn serving(sites: &[&str]) -> Plan {
        Plan {
            serving: sites.iter().map(|s| s.to_string()).collect(),
            active: None,
            kept_last: false,
            no_healthy_site: false,
            next_check: None,
        }
    }

    fn reason_of(s: &MailDomainStatus, type_: &str) -> String {
        conditions::find(&s.conditions, type_)
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    }

    #[test]
    fn ready_when_every_site_is_at_full_strength() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[deployment("dc-it1", 2, 2), deployment("dc-it2", 2, 2)],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        assert!(conditions::is_true(&s.conditions, READY));
        assert!(!conditions::is_true(&s.conditions, DEGRADED));
        assert_eq!(s.gateways.as_deref(), Some("4/4"));
        assert_eq!(
            s.sites[1],
            SiteGatewayStatus {
                site: "dc-it2".into(),
                desired: 2,
                ready: 2,
                first_served_time: None,
            }
        );
    }

    #[test]
    fn degraded_when_a_site_is_below_strength() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[deployment("dc-it1", 2, 2), deployment("dc-it2", 1, 2)],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        assert_eq!(reason_of(&s, READY), reason::GATEWAYS_NOT_READY);
        assert!(conditions::is_true(&s.conditions, DEGRADED));
        assert!(
            conditions::find(&s.conditions, DEGRADED)
                .is_some_and(|c| c.message.contains("dc-it2 1/2"))
        );
    }

    #[test]
    fn progressing_while_pods_are_replaced() {
        let md = domain(&["dc-it1"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1"], &[]),
            },
            &[deployment("dc-it1", 2, 1)],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        assert!(conditions::is_true(&s.conditions, PROGRESSING));
    }

    #[test]
    fn missing_site_is_not_ready_with_a_message_that_names_it() {
        let md = domain(&["dc-it1", "dc-it9"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1"], &["dc-it9"]),
            },
            &[deployment("dc-it1", 2, 2)],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        let ready = conditions::find(&s.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, reason::SITE_NOT_FOUND);
        assert!(ready.message.contains("dc-it9"));
    }

    pub(crate) fn key(dns_names: &[&str]) -> crate::api::SigningKey {
        let spec = serde_json::from_value(serde_json::json!({
            "hsm": {"tokenLabel": "t", "pinSecretRef": {"name": "pin"}},
            "subject": {"commonName": "pec.acme.it"},
            "dnsNames": dns_names,
            "issuer": {"selfSigned": {}},
            "certificate": {"duration": "8760h", "renewBefore": "720h"},
        }))
        .expect("SigningKey spec");
        crate::api::SigningKey::new("acme-key", spec)
    }

    #[test]
    fn a_certificate_covers_a_domain_as_a_tls_client_would_match_it() {
        assert!(covers(&key(&["PEC.acme.it."]), "pec.acme.it"));
        assert!(covers(&key(&["*.acme.it"]), "pec.acme.it"));
        assert!(!covers(&key(&["*.acme.it"]), "a.pec.acme.it"));
        assert!(!covers(&key(&["*.acme.it"]), "acme.it"));
        assert!(!covers(&key(&["pec.other.it"]), "pec.acme.it"));
        // Without dnsNames, the common name is what the certificate names.
        assert!(covers(&key(&[]), "pec.acme.it"));
    }

    #[test]
    fn a_key_for_another_domain_keeps_the_domain_not_ready_and_says_why() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let key = KeyResolution::Uncovered {
            signing: crate::controllers::mail_domain::gateway::tests::signing(),
            names: vec!["pec.other.it".into()],
        };
        assert!(
            key.config().is_some(),
            "the gateways keep the generation they sign with"
        );
        let s = compute(
            &md,
            &Resolved {
                key: &key,
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[deployment("dc-it1", 2, 2), deployment("dc-it2", 2, 2)],
            &serving(&["dc-it1", "dc-it2"]),
            None,
            now(),
        );
        let ready = conditions::find(&s.conditions, READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::KEY_DOES_NOT_COVER_DOMAIN)
        );
        assert!(
            ready.message.contains("pec.other.it") && ready.message.contains(&md.spec.domain),
            "{}",
            ready.message
        );
        assert_eq!(
            reason_of(&s, SIGNING_KEY_RESOLVED),
            reason::KEY_DOES_NOT_COVER_DOMAIN
        );
    }

    #[test]
    fn a_single_site_is_a_redundancy_warning_not_an_error() {
        let md = domain(&["dc-it1"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1"], &[]),
            },
            &[deployment("dc-it1", 2, 2)],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        assert!(conditions::is_true(&s.conditions, READY));
        assert_eq!(reason_of(&s, SITE_REDUNDANCY), reason::SINGLE_SITE);
    }

    #[test]
    fn records_a_failover_and_no_healthy_site() {
        let mut md = domain(&["dc-it1", "dc-it2"]);
        md.status = Some(MailDomainStatus {
            serving_sites: vec!["dc-it1".into(), "dc-it2".into()],
            ..MailDomainStatus::default()
        });
        let mut plan = serving(&["dc-it2"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[],
            &plan,
            Some("SiteDown"),
            now(),
        );
        let f = s.last_failover.clone().expect("failover recorded");
        assert_eq!(
            (f.from.len(), f.to, f.reason.as_str()),
            (2, vec!["dc-it2".to_string()], "SiteDown")
        );
        assert!(!conditions::is_true(&s.conditions, NO_HEALTHY_SITE));
        plan.no_healthy_site = true;
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[],
            &plan,
            None,
            now(),
        );
        assert!(conditions::is_true(&s.conditions, NO_HEALTHY_SITE));
        assert_eq!(s.serving_sites, ["dc-it2"]);
    }

    #[test]
    fn records_when_each_site_first_served() {
        let mut md = domain(&["dc-it1", "dc-it2"]);
        let both = resolution(&["dc-it1", "dc-it2"], &[]);
        let key = KeyResolution::of(&md, None);
        let resolved = Resolved {
            key: &key,
            references: &[],
            sites: &both,
        };
        let gateways = [deployment("dc-it1", 2, 2), deployment("dc-it2", 2, 2)];
        let first = compute(
            &md,
            &resolved,
            &gateways,
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        let times = |s: &MailDomainStatus| -> Vec<Option<Time>> {
            s.sites
                .iter()
                .map(|g| g.first_served_time.clone())
                .collect()
        };
        assert_eq!(times(&first), [Some(to_k8s(now())), None]);
        assert_eq!(served_sites(&first), ["dc-it1", "dc-it1"]);

        // Later dc-it2 joins; dc-it1 keeps its time, also once it left.
        md.status = Some(first);
        let later = now() + chrono::Duration::seconds(60);
        let second = compute(
            &md,
            &resolved,
            &gateways,
            &serving(&["dc-it2"]),
            None,
            later,
        );
        assert_eq!(times(&second), [Some(to_k8s(now())), Some(to_k8s(later))]);
        assert!(served_sites(&second).contains(&"dc-it1".to_string()));

        // A status written before the time was recorded: its serving sites
        // have served.
        md.status = Some(MailDomainStatus {
            serving_sites: vec!["dc-it2".into()],
            ..MailDomainStatus::default()
        });
        let upgraded = compute(
            &md,
            &resolved,
            &gateways,
            &serving(&["dc-it1"]),
            None,
            later,
        );
        assert_eq!(times(&upgraded), [Some(to_k8s(later)), Some(to_k8s(later))]);
    }

    #[test]
    fn a_missing_signing_key_is_reported() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let s = compute(
            &md,
            &Resolved {
                key: &KeyResolution::of(&md, None),
                references: &[],
                sites: &resolution(&["dc-it1", "dc-it2"], &[]),
            },
            &[],
            &serving(&["dc-it1"]),
            None,
            now(),
        );
        assert_eq!(reason_of(&s, SIGNING_KEY_RESOLVED), reason::KEY_NOT_FOUND);
    }
}
