//! What a MailDomain names besides its Sites and SigningKey: the TLS Secret,
//! the mailboxes Secret, the store claim and the providers' ConfigMaps, each
//! checked against what the gateways will read from it, and the domain name
//! itself against the other MailDomains. Pure: the objects are fetched in
//! `mod.rs`.
//!
//! A problem found here makes the domain `Ready=False` with a reason that
//! names the object and what to fix. The gateways are still applied as
//! before: a Secret deleted by mistake does not take running gateways away.

use chrono::{DateTime, Utc};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt;

use super::status::names_cover;
use crate::api::MailDomain;

/// Reasons, one per way a reference can be wrong.
pub mod reason {
    /// The TLS Secret does not exist.
    pub const TLS_SECRET_NOT_FOUND: &str = "TlsSecretNotFound";
    /// The TLS Secret lacks `tls.crt`/`tls.key` or its certificate is unreadable.
    pub const TLS_SECRET_INVALID: &str = "TlsSecretInvalid";
    /// The TLS certificate does not name the domain clients connect to.
    pub const TLS_NOT_FOR_DOMAIN: &str = "TlsCertificateDoesNotCoverDomain";
    /// The TLS certificate's validity has ended.
    pub const TLS_EXPIRED: &str = "TlsCertificateExpired";
    /// The mailboxes Secret does not exist.
    pub const MAILBOXES_NOT_FOUND: &str = "MailboxesSecretNotFound";
    /// The mailboxes Secret has no `mailboxes` key.
    pub const MAILBOXES_INVALID: &str = "MailboxesSecretInvalid";
    /// The store claim does not exist.
    pub const CLAIM_NOT_FOUND: &str = "StorageClaimNotFound";
    /// The store claim cannot be mounted by pods on several nodes.
    pub const CLAIM_NOT_SHARED: &str = "StorageClaimNotReadWriteMany";
    /// A providers' ConfigMap does not exist.
    pub const PROVIDERS_NOT_FOUND: &str = "ProvidersNotFound";
    /// A providers' ConfigMap has no `bundle.crt`.
    pub const PROVIDERS_INVALID: &str = "ProvidersInvalid";
    /// Another MailDomain, created earlier, has the same domain name.
    pub const DOMAIN_CONFLICT: &str = "DomainConflict";
    /// Every reference resolved.
    pub const RESOLVED: &str = "ReferencesResolved";
}

/// The TLS Secret's certificate: read whole (it is public).
const TLS_CRT: &str = "tls.crt";
/// The TLS Secret's private key: only its presence is checked.
const TLS_KEY: &str = "tls.key";
/// The mailboxes Secret's file: only its presence is checked.
const MAILBOXES: &str = "mailboxes";

/// A Secret as the checks here read it, and all the operator keeps of one
/// in its watch cache: its name and namespace, `tls.crt`, and a one-byte
/// marker for a `tls.key` or `mailboxes` that is present and not empty.
/// No private key, password hash, annotation (`kubectl apply` copies the
/// whole Secret into one) or other key stays in the operator's memory.
pub fn keep_what_is_checked(secret: &mut Secret) {
    secret.metadata = ObjectMeta {
        name: secret.metadata.name.take(),
        namespace: secret.metadata.namespace.take(),
        resource_version: secret.metadata.resource_version.take(),
        ..ObjectMeta::default()
    };
    secret.string_data = None;
    secret.type_ = None;
    secret.data = secret.data.take().map(|data| {
        data.into_iter()
            .filter(|(_, value)| !value.0.is_empty())
            .filter_map(|(key, value)| match key.as_str() {
                TLS_CRT => Some((key, value)),
                TLS_KEY | MAILBOXES => Some((key, ByteString(vec![1]))),
                _ => None,
            })
            .collect()
    });
}

/// An object a MailDomain names, as found (`None`: it does not exist).
#[derive(Debug, Clone)]
pub struct Named<T> {
    /// The name in the MailDomain's spec.
    pub name: String,
    /// The object, when it exists.
    pub found: Option<T>,
}

/// Every object a MailDomain names besides its Sites and SigningKey.
#[derive(Debug, Clone, Default)]
pub struct Referenced {
    /// `spec.gateway.tlsSecretRef`.
    pub tls: Option<Named<Secret>>,
    /// `spec.gateway.mailboxesSecretRef`.
    pub mailboxes: Option<Named<Secret>>,
    /// `spec.gateway.storageClaimName`.
    pub claim: Option<Named<PersistentVolumeClaim>>,
    /// `spec.gateway.providers`.
    pub providers: Vec<Named<ConfigMap>>,
}

/// What is wrong with one reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A reason from [`reason`].
    pub reason: &'static str,
    /// What is wrong and what to do, naming the object.
    pub message: String,
}

impl Problem {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// The problems of `md`'s references (empty when all resolve), in spec order.
pub fn check(md: &MailDomain, refs: &Referenced, now: DateTime<Utc>) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(tls) = &refs.tls {
        problems.extend(check_tls(&md.spec.domain, tls, now));
    }
    if let Some(Named { name, found }) = &refs.mailboxes {
        match found {
            None => problems.push(Problem::new(
                reason::MAILBOXES_NOT_FOUND,
                format!(
                    "Secret {name} (spec.gateway.mailboxesSecretRef) not found in this namespace; create it with a `mailboxes` key or fix the reference"
                ),
            )),
            Some(secret) if secret_value(secret, MAILBOXES).is_none() => {
                problems.push(Problem::new(
                    reason::MAILBOXES_INVALID,
                    format!(
                        "Secret {name} (spec.gateway.mailboxesSecretRef) has no `mailboxes` key: the gateways would know no mailbox"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(Named { name, found }) = &refs.claim {
        match found {
            None => problems.push(Problem::new(
                reason::CLAIM_NOT_FOUND,
                format!(
                    "PersistentVolumeClaim {name} (spec.gateway.storageClaimName) not found in this namespace; the gateways cannot start without it"
                ),
            )),
            Some(claim) if !read_write_many(claim) => problems.push(Problem::new(
                reason::CLAIM_NOT_SHARED,
                format!(
                    "PersistentVolumeClaim {name} (spec.gateway.storageClaimName) is not ReadWriteMany: gateways on different nodes cannot share its mailboxes; use a claim of an RWX storage class"
                ),
            )),
            Some(_) => {}
        }
    }
    for Named { name, found } in &refs.providers {
        match found {
            None => problems.push(Problem::new(
                reason::PROVIDERS_NOT_FOUND,
                format!(
                    "ConfigMap {name} (spec.gateway.providers) not found in this namespace; create it or remove it from the list"
                ),
            )),
            Some(cm) if !cm.data.as_ref().is_some_and(|d| d.contains_key("bundle.crt")) => {
                problems.push(Problem::new(
                    reason::PROVIDERS_INVALID,
                    format!(
                        "ConfigMap {name} (spec.gateway.providers) has no `bundle.crt` key: no provider certificate to trust in it"
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    problems
}

fn check_tls(domain: &str, tls: &Named<Secret>, now: DateTime<Utc>) -> Option<Problem> {
    let name = &tls.name;
    let Some(secret) = &tls.found else {
        return Some(Problem::new(
            reason::TLS_SECRET_NOT_FOUND,
            format!(
                "Secret {name} (spec.gateway.tlsSecretRef) not found in this namespace; create it (kubectl create secret tls) or fix the reference"
            ),
        ));
    };
    let invalid = |what: &str| {
        Some(Problem::new(
            reason::TLS_SECRET_INVALID,
            format!("Secret {name} (spec.gateway.tlsSecretRef): {what}"),
        ))
    };
    if secret_value(secret, TLS_KEY).is_none() {
        return invalid("no `tls.key`");
    }
    let Some(pem) = secret_value(secret, TLS_CRT) else {
        return invalid("no `tls.crt`");
    };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem) else {
        return invalid("`tls.crt` holds no PEM certificate");
    };
    let Ok(cert) = block.parse_x509() else {
        return invalid("`tls.crt` holds no readable X.509 certificate");
    };
    let names = certificate_names(&cert);
    if !names_cover(&names, domain) {
        return Some(Problem::new(
            reason::TLS_NOT_FOR_DOMAIN,
            format!(
                "the certificate in Secret {name} names [{}], not {domain}: clients connecting to {domain} would refuse it; issue one for {domain} or point spec.gateway.tlsSecretRef at one",
                names.join(", ")
            ),
        ));
    }
    let not_after = cert.validity().not_after.timestamp();
    if not_after < now.timestamp() {
        let at = DateTime::from_timestamp(not_after, 0).unwrap_or_default();
        return Some(Problem::new(
            reason::TLS_EXPIRED,
            format!(
                "the certificate in Secret {name} expired at {}; renew it",
                at.to_rfc3339()
            ),
        ));
    }
    None
}

/// The DNS names a TLS client matches: the subjectAltName DNS entries, or
/// the common name when the certificate has none.
fn certificate_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        return san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect()
}

fn secret_value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.as_slice())
        .filter(|v| !v.is_empty())
}

fn read_write_many(claim: &PersistentVolumeClaim) -> bool {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|modes| modes.iter().any(|m| m == "ReadWriteMany"))
}

/// The MailDomain that holds `md`'s domain name before it, if any: among
/// the MailDomains of `md`'s namespace in `domains` (a namespace is one
/// platform, with its own routes and providers; another namespace may run
/// its own copy of a domain, for example for staging) the one created first
/// with the same name (case and a trailing dot ignored), ties broken by
/// name. The platform routes go to that one; `md` gets nothing applied until
/// the conflict is gone.
pub fn domain_holder<'a>(
    md: &MailDomain,
    domains: impl IntoIterator<Item = &'a MailDomain>,
) -> Option<&'a MailDomain> {
    let norm = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
    let key = |m: &MailDomain| (m.creation_timestamp(), m.namespace(), m.name_any());
    let mine = norm(&md.spec.domain);
    domains
        .into_iter()
        .filter(|other| other.metadata.deletion_timestamp.is_none())
        .filter(|other| other.namespace() == md.namespace() && other.name_any() != md.name_any())
        .filter(|other| norm(&other.spec.domain) == mine)
        .filter(|other| key(other) < key(md))
        .min_by_key(|other| key(other))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::mail_domain::build::tests::domain;
    use k8s_openapi::{
        ByteString, api::core::v1::PersistentVolumeClaimSpec,
        apimachinery::pkg::apis::meta::v1::Time,
    };

    /// A fixed "now" inside the validity of the certificates made below.
    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a date")
    }

    fn tls_secret(names: &[&str]) -> Secret {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).expect("certificate");
        Secret {
            data: Some(
                [
                    (
                        "tls.crt".to_string(),
                        ByteString(cert.cert.pem().into_bytes()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(cert.signing_key.serialize_pem().into_bytes()),
                    ),
                ]
                .into(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn the_cached_secret_keeps_the_certificate_and_only_the_presence_of_the_rest() {
        let whole = {
            let mut s = tls_secret(&["pec.acme.it"]);
            let data = s.data.get_or_insert_default();
            data.insert(
                "mailboxes".into(),
                ByteString(b"alice:$argon2id$...".to_vec()),
            );
            data.insert("other".into(), ByteString(b"secret".to_vec()));
            data.insert("empty".into(), ByteString(Vec::new()));
            s.metadata.name = Some("acme-tls".into());
            s.metadata.namespace = Some("mail".into());
            s.metadata.annotations = Some(
                [(
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{... the whole Secret ...}".to_string(),
                )]
                .into(),
            );
            s
        };
        let mut cached = whole.clone();
        keep_what_is_checked(&mut cached);
        let data = cached.data.clone().expect("data");
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["mailboxes", "tls.crt", "tls.key"]
        );
        assert_eq!(
            data["tls.crt"],
            whole.data.as_ref().expect("data")["tls.crt"]
        );
        assert_eq!(data["tls.key"].0, [1], "no private key kept");
        assert_eq!(data["mailboxes"].0, [1], "no password hash kept");
        assert_eq!(cached.metadata.annotations, None);
        assert_eq!(cached.name_any(), "acme-tls");
        assert_eq!(cached.namespace().as_deref(), Some("mail"));
        // The checks find what they found in the whole Secret.
        for domain in ["pec.acme.it", "pec.other.it"] {
            assert_eq!(
                check_tls(
                    domain,
                    &named("acme-tls", Some(cached.clone())).expect("named"),
                    now()
                ),
                check_tls(
                    domain,
                    &named("acme-tls", Some(whole.clone())).expect("named"),
                    now()
                ),
            );
        }
        let mut no_key = whole.clone();
        no_key
            .data
            .get_or_insert_default()
            .insert("tls.key".into(), ByteString(Vec::new()));
        let whole_problem = check_tls(
            "pec.acme.it",
            &named("t", Some(no_key.clone())).expect("named"),
            now(),
        );
        keep_what_is_checked(&mut no_key);
        assert!(whole_problem.is_some());
        assert_eq!(
            check_tls(
                "pec.acme.it",
                &named("t", Some(no_key)).expect("named"),
                now()
            ),
            whole_problem,
            "an empty key is as missing after the cut as before"
        );
    }

    fn named<T>(name: &str, found: Option<T>) -> Option<Named<T>> {
        Some(Named {
            name: name.into(),
            found,
        })
    }

    fn reasons(md: &MailDomain, refs: &Referenced) -> Vec<&'static str> {
        check(md, refs, now()).iter().map(|p| p.reason).collect()
    }

    #[test]
    fn a_certificate_for_the_domain_or_a_wildcard_over_it_resolves() {
        let md = domain(&["dc-it1"]);
        for names in [
            &["pec.acme.it"][..],
            &["*.acme.it"],
            &["other.it", "PEC.acme.it"],
        ] {
            let refs = Referenced {
                tls: named("tls", Some(tls_secret(names))),
                ..Referenced::default()
            };
            assert!(reasons(&md, &refs).is_empty(), "{names:?}");
        }
    }

    #[test]
    fn a_certificate_for_another_name_is_refused_naming_both() {
        let md = domain(&["dc-it1"]);
        let refs = Referenced {
            tls: named(
                "acme-tls",
                Some(tls_secret(&["www.acme.it", "*.pec.acme.it"])),
            ),
            ..Referenced::default()
        };
        let problems = check(&md, &refs, now());
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].reason, reason::TLS_NOT_FOR_DOMAIN);
        for part in ["acme-tls", "www.acme.it", "*.pec.acme.it", "pec.acme.it"] {
            assert!(
                problems[0].message.contains(part),
                "{}",
                problems[0].message
            );
        }
    }

    #[test]
    fn missing_and_incomplete_secrets_say_which_key() {
        let md = domain(&["dc-it1"]);
        let mut keyless = tls_secret(&["pec.acme.it"]);
        keyless.data.as_mut().expect("data").remove("tls.key");
        let mut garbage = tls_secret(&["pec.acme.it"]);
        garbage
            .data
            .as_mut()
            .expect("data")
            .insert("tls.crt".into(), ByteString(b"not a certificate".to_vec()));
        let cases = [
            (None, reason::TLS_SECRET_NOT_FOUND, "not found"),
            (Some(keyless), reason::TLS_SECRET_INVALID, "tls.key"),
            (Some(garbage), reason::TLS_SECRET_INVALID, "tls.crt"),
        ];
        for (secret, want, says) in cases {
            let refs = Referenced {
                tls: named("acme-tls", secret),
                ..Referenced::default()
            };
            let problems = check(&md, &refs, now());
            assert_eq!(problems[0].reason, want);
            assert!(
                problems[0].message.contains(says),
                "{}",
                problems[0].message
            );
        }
    }

    #[test]
    fn an_expired_certificate_is_reported() {
        let md = domain(&["dc-it1"]);
        let refs = Referenced {
            tls: named("tls", Some(tls_secret(&["pec.acme.it"]))),
            ..Referenced::default()
        };
        // rcgen's default validity ends in the year 4096; this is 6089.
        let later = DateTime::from_timestamp(130_000_000_000, 0).expect("a date");
        assert_eq!(
            check(&md, &refs, later).first().map(|p| p.reason),
            Some(reason::TLS_EXPIRED)
        );
    }

    #[test]
    fn mailboxes_claim_and_providers_are_each_checked() {
        let md = domain(&["dc-it1"]);
        let claim = |modes: &[&str]| PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes.iter().map(|m| m.to_string()).collect()),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        };
        let refs = Referenced {
            tls: None,
            mailboxes: named("boxes", Some(Secret::default())),
            claim: named("store", Some(claim(&["ReadWriteOnce"]))),
            providers: vec![
                Named {
                    name: "gone".into(),
                    found: None,
                },
                Named {
                    name: "empty".into(),
                    found: Some(ConfigMap::default()),
                },
            ],
        };
        assert_eq!(
            reasons(&md, &refs),
            [
                reason::MAILBOXES_INVALID,
                reason::CLAIM_NOT_SHARED,
                reason::PROVIDERS_NOT_FOUND,
                reason::PROVIDERS_INVALID
            ]
        );
        let fine = Referenced {
            mailboxes: named(
                "boxes",
                Some(Secret {
                    data: Some([("mailboxes".into(), ByteString(b"mario:!\n".to_vec()))].into()),
                    ..Secret::default()
                }),
            ),
            claim: named("store", Some(claim(&["ReadWriteMany"]))),
            ..Referenced::default()
        };
        assert!(reasons(&md, &fine).is_empty());
        let missing = Referenced {
            mailboxes: named("boxes", None),
            claim: named("store", None),
            ..Referenced::default()
        };
        assert_eq!(
            reasons(&md, &missing),
            [reason::MAILBOXES_NOT_FOUND, reason::CLAIM_NOT_FOUND]
        );
    }

    #[test]
    fn the_first_created_maildomain_holds_a_domain_name() {
        let at = |secs: i64, ns: &str, name: &str, fqdn: &str| {
            let mut md = domain(&["dc-it1"]);
            md.metadata.namespace = Some(ns.into());
            md.metadata.name = Some(name.into());
            md.metadata.creation_timestamp =
                Some(Time(jiff::Timestamp::from_second(secs).expect("time")));
            md.spec.domain = fqdn.into();
            md
        };
        let first = at(100, "mail", "first", "pec.acme.it");
        let second = at(200, "mail", "second", "PEC.acme.it.");
        let unrelated = at(50, "mail", "unrelated", "pec.other.it");
        let staging = at(10, "staging", "first", "pec.acme.it");
        let all = [first.clone(), second.clone(), unrelated, staging];
        assert_eq!(
            domain_holder(&second, &all).map(|m| m.name_any()),
            Some("first".to_string())
        );
        assert!(
            domain_holder(&first, &all).is_none(),
            "the first of its namespace holds it; another namespace is another platform"
        );
        let mut going = first.clone();
        going.metadata.deletion_timestamp = Some(crate::time::to_k8s(now()));
        assert!(
            domain_holder(&second, &[going, second.clone()]).is_none(),
            "a MailDomain being deleted frees the name"
        );
    }
}
