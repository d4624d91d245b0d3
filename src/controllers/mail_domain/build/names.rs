//! The names, labels and annotations every child of a MailDomain carries.

use std::collections::BTreeMap;

pub use crate::controllers::names::{DOMAIN_LABEL, SITE_LABEL, domain_service_name, short_hash};
use crate::controllers::{MANAGED_BY, names::dns_label};

/// Pod template annotation holding the configuration hash; a change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "pec.dev/config-hash";

/// The key of the gateway configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "gateway.yaml";

/// The name of the children of `md` in `site`: `<domain>-<site>`, shortened
/// with a stable hash to fit a DNS label (63 characters), starting with a letter.
pub fn child_name(md: &str, site: &str) -> String {
    dns_label(format!("{md}-{site}"))
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
