//! The names, labels and annotations every child of a MailDomain carries.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::controllers::MANAGED_BY;

/// Label naming the MailDomain a child belongs to.
pub const DOMAIN_LABEL: &str = "pec.dev/maildomain";

/// Label naming the site a child serves.
pub const SITE_LABEL: &str = "pec.dev/site";

/// Pod template annotation holding the configuration hash; a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "pec.dev/config-hash";

/// The key of the gateway configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "gateway.yaml";

/// The name of the children of `md` in `site`: `<domain>-<site>`, shortened
/// with a stable hash to fit a DNS label (63 characters), starting with a letter.
pub fn child_name(md: &str, site: &str) -> String {
    dns_label(format!("{md}-{site}"))
}

/// The name of the domain-level Service of `md`: the MailDomain's own name,
/// made a DNS label like [`child_name`].
pub fn domain_service_name(md: &str) -> String {
    dns_label(md.to_string())
}

pub(super) fn dns_label(full: String) -> String {
    let prefixed = if full.starts_with(|c: char| c.is_ascii_lowercase()) {
        full
    } else {
        format!("gw-{full}")
    };
    if prefixed.len() <= 63 {
        return prefixed;
    }
    let hash = short_hash(prefixed.as_bytes(), 8);
    let head = prefixed[..54].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// The labels of every child of `md` in `site`.
pub fn labels(md: &str, site: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(md, site);
    labels.insert("app.kubernetes.io/name".into(), "pec-gateway".into());
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    labels.insert(DOMAIN_LABEL.into(), md.into());
    labels
}

/// The labels of the domain-level objects of `md` (no site).
pub fn domain_labels(md: &str) -> BTreeMap<String, String> {
    [
        (
            "app.kubernetes.io/name".to_string(),
            "pec-gateway".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), md.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "gateway".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (DOMAIN_LABEL.to_string(), md.to_string()),
    ]
    .into()
}

/// The labels that select the gateway pods of `md` in `site`.
pub(super) fn selector_labels(md: &str, site: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/instance".to_string(), md.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "gateway".to_string(),
        ),
        (SITE_LABEL.to_string(), site.to_string()),
    ]
    .into()
}

/// The first `hex_chars` hex digits of the SHA-256 of `data`.
pub(crate) fn short_hash(data: &[u8], hex_chars: usize) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..hex_chars].to_string()
}
