//! The names, labels and condition types more than one controller uses, in
//! one place: a controller reads another's objects by these, never by
//! reaching into its modules.

use sha2::{Digest, Sha256};

/// The label every object this operator makes carries, as its manager.
pub const MANAGED_BY: &str = "pec-operator";

/// Label naming the MailDomain a child belongs to.
pub const DOMAIN_LABEL: &str = "pec.dev/maildomain";
/// Label naming the site a child serves.
pub const SITE_LABEL: &str = "pec.dev/site";

/// The MailDomain condition that is true while no listed site can serve
/// (the SLA probe counts such a domain as down).
pub const NO_HEALTHY_SITE: &str = "NoHealthySite";

/// The name of the domain-level Service of `md`: the MailDomain's own name,
/// made a DNS label.
pub fn domain_service_name(md: &str) -> String {
    dns_label(md.to_string())
}

/// `full` as a DNS label: starting with a letter (`gw-` is put in front
/// otherwise), and shortened with a stable hash to 63 characters.
pub fn dns_label(full: String) -> String {
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

/// Name of a SigningKey's publication Secret.
pub fn certificates_secret_name(key: &str) -> String {
    format!("{key}-certificates")
}

/// Name of the index ConfigMap of the SigningKey named `key`.
pub fn index_name_of(key: &str) -> String {
    format!("{key}-index")
}

/// The key under which generation `n`'s certificate is published.
pub fn certificate_key(n: i64) -> String {
    format!("g{n}.crt")
}

/// Name of a namespace's aggregate of every SigningKey index: the providers
/// every gateway there trusts.
pub const PLATFORM_PROVIDERS: &str = "pec-platform-providers";

/// The first `hex_chars` hex digits of the SHA-256 of `data`.
pub fn short_hash(data: &[u8], hex_chars: usize) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex[..hex_chars].to_string()
}
