//! Pure checks of a MailDomain against the cluster state the reconcile fetched.
//!
//! The CRD schema and CEL rules refuse malformed specs at apply time; what is
//! left here is what only the cluster can tell, such as whether the listed
//! Sites exist.

use std::collections::BTreeMap;

use crate::api::{MailDomain, Site};

/// The listed sites, split by whether their Site object exists.
#[derive(Debug, Default, PartialEq)]
pub struct Resolution {
    /// Listed sites that exist, in `spec.sites` order, with their node selectors.
    pub present: Vec<ResolvedSite>,
    /// Listed sites that have no Site object.
    pub missing: Vec<String>,
}

/// A listed site that exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSite {
    /// The Site's name.
    pub name: String,
    /// Labels of the site's nodes.
    pub node_selector: BTreeMap<String, String>,
}

/// Splits `md.spec.sites` into existing and missing sites, given what was fetched.
pub fn resolve_sites(md: &MailDomain, fetched: &BTreeMap<String, Option<Site>>) -> Resolution {
    let mut resolution = Resolution::default();
    for name in &md.spec.sites {
        match fetched.get(name).and_then(Option::as_ref) {
            Some(site) => resolution.present.push(ResolvedSite {
                name: name.clone(),
                node_selector: site.spec.node_selector.clone(),
            }),
            None => resolution.missing.push(name.clone()),
        }
    }
    resolution
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::mail_domain::build::tests::{domain, site};

    #[test]
    fn reports_missing_sites_in_spec_order() {
        let md = domain(&["dc-it1", "dc-it9", "dc-it2"]);
        let fetched = [
            ("dc-it1".to_string(), Some(site("dc-it1"))),
            ("dc-it9".to_string(), None),
            ("dc-it2".to_string(), Some(site("dc-it2"))),
        ]
        .into();
        let r = resolve_sites(&md, &fetched);
        assert_eq!(
            r.present
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["dc-it1", "dc-it2"]
        );
        assert_eq!(r.missing, ["dc-it9"]);
    }
}
