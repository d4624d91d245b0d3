//! Publication of certificates before use, and the CRL of the `ca` issuer.
//!
//! `<key>-certificates` (Secret) and `<key>-index` (ConfigMap, labelled
//! `pec.dev/certificate-index: "true"` for the providers' index) hold every
//! published, active or last-retired certificate that is not revoked, as
//! `g<N>.crt` and together as `bundle.crt`; the ConfigMap adds `index.yaml`.
//! The gateways read the certificate their configuration names from the
//! Secret. `<key>-crl` holds `ca.crl`, the CRL of the `ca` issuer.
//!
//! `pec-platform-providers` (ConfigMap, one per namespace) gathers the
//! `bundle.crt` of every index there: the certificates of every SigningKey
//! of the platform, which every gateway of the namespace trusts. It is
//! rewritten whenever an index changes; gateways mount it as a volume and
//! re-read it, so a new domain's key is trusted without a restart.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{Error, apply_json, labels, owner_reference};
use crate::{
    api::{KeyGeneration, RevokedCertificate, SigningKey},
    signing::lifecycle::{KeyState, Phase},
};

pub use crate::controllers::names::{PLATFORM_PROVIDERS, certificate_key, index_name_of};

/// Name of the publication Secret.
pub fn secret_name(sk: &SigningKey) -> String {
    crate::controllers::names::certificates_secret_name(&sk.name_any())
}

/// Name of the index ConfigMap.
pub fn index_name(sk: &SigningKey) -> String {
    index_name_of(&sk.name_any())
}

/// The label every index ConfigMap carries.
const INDEX_LABEL: &str = "pec.dev/certificate-index";

/// Name of the CRL Secret.
pub fn crl_name(sk: &SigningKey) -> String {
    format!("{}-crl", sk.name_any())
}

/// The published generations: issued certificates of `state` that reached
/// publication, not revoked, oldest first.
pub fn published(
    state: &KeyState,
    details: &BTreeMap<u32, KeyGeneration>,
) -> Vec<(u32, Phase, String)> {
    [&state.previous, &state.current, &state.next]
        .into_iter()
        .flatten()
        .filter(|g| matches!(g.phase, Phase::Published | Phase::Active | Phase::Retired))
        .filter(|g| !state.revoked.contains(&g.number))
        .filter_map(|g| {
            let pem = details.get(&g.number)?.certificate.clone()?;
            Some((g.number, g.phase, pem))
        })
        .collect()
}

/// Applies the publication Secret and index ConfigMap for `state`.
pub async fn apply(
    client: &Client,
    sk: &SigningKey,
    ns: &str,
    state: &KeyState,
    details: &BTreeMap<u32, KeyGeneration>,
) -> Result<(), kube::Error> {
    let certs = published(state, details);
    let bundle: String = certs.iter().map(|(_, _, pem)| pem.as_str()).collect();
    let mut secret_data: BTreeMap<String, ByteString> = certs
        .iter()
        .map(|(n, _, pem)| {
            (
                certificate_key(i64::from(*n)),
                ByteString(pem.clone().into_bytes()),
            )
        })
        .collect();
    secret_data.insert("bundle.crt".into(), ByteString(bundle.clone().into_bytes()));
    let index: Vec<serde_json::Value> = certs
        .iter()
        .map(|(n, phase, _)| {
            let d = details.get(n).cloned().unwrap_or_default();
            json!({
                "generation": n,
                "phase": format!("{phase:?}"),
                "serial": d.serial,
                "fingerprintSha256": d.fingerprint,
                "notBefore": d.not_before,
                "notAfter": d.not_after,
                "certificate": certificate_key(i64::from(*n)),
            })
        })
        .collect();
    let index_yaml =
        serde_yaml::to_string(&json!({"domains": sk.spec.dns_names, "certificates": index}))
            .unwrap_or_default();
    let mut index_labels = labels(sk);
    index_labels.insert(INDEX_LABEL.into(), "true".into());
    let meta = |name: String, labels| json!({"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner_reference(sk)]});
    apply_json::<Secret>(
        client,
        ns,
        &secret_name(sk),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(secret_name(sk), labels(sk)),
            "type": "Opaque",
            "data": secret_data,
        }),
    )
    .await?;
    apply_json::<ConfigMap>(
        client,
        ns,
        &index_name(sk),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(index_name(sk), index_labels),
            "data": {"bundle.crt": bundle, "index.yaml": index_yaml},
        }),
    )
    .await?;
    platform(client, ns, None).await
}

/// The aggregate bundle of `indexes` (name, `bundle.crt`): every distinct
/// certificate once, in the order of the index names, so the same set of
/// keys always gives the same bytes.
pub fn platform_bundle(indexes: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = indexes.iter().collect();
    sorted.sort();
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for (_, bundle) in sorted {
        for der in pec_core::smime::pem_certificates(bundle) {
            if seen.insert(der.clone()) {
                out.push_str(&crate::hsm::der::pem("CERTIFICATE", &der));
            }
        }
    }
    out
}

/// Rewrites [`PLATFORM_PROVIDERS`] in `ns` from the index ConfigMaps there,
/// leaving out `without` (an index about to go with its key).
pub async fn platform(client: &Client, ns: &str, without: Option<&str>) -> Result<(), kube::Error> {
    let indexes: Vec<(String, String)> = kube::Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default().labels(&format!("{INDEX_LABEL}=true")))
        .await?
        .items
        .into_iter()
        .filter(|c| {
            Some(c.name_any().as_str()) != without && c.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|c| {
            let name = c.name_any();
            Some((name, c.data?.get("bundle.crt")?.clone()))
        })
        .collect();
    apply_json::<ConfigMap>(
        client,
        ns,
        PLATFORM_PROVIDERS,
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": PLATFORM_PROVIDERS,
                "namespace": ns,
                "labels": {"app.kubernetes.io/managed-by": super::super::MANAGED_BY},
            },
            "data": {"bundle.crt": platform_bundle(&indexes)},
        }),
    )
    .await?;
    Ok(())
}

/// Signs and applies the `ca` issuer's CRL listing `revoked`.
pub async fn crl(
    client: &Client,
    sk: &SigningKey,
    ns: &str,
    revoked: &[RevokedCertificate],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    if sk.spec.issuer.ca.is_none() {
        return Ok(());
    }
    let ca = super::issue::read_ca(client, sk).await.map_err(Error::Ca)?;
    let entries: Vec<_> = revoked
        .iter()
        .filter_map(|r| {
            Some((
                r.serial.clone()?,
                crate::time::from_k8s(&r.revoked_at),
                r.reason,
            ))
        })
        .collect();
    let pem = ca
        .crl(&entries, entries.len() as u64, now, now + Duration::days(7))
        .map_err(Error::Crl)?;
    apply_json::<Secret>(
        client,
        ns,
        &crl_name(sk),
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": crl_name(sk), "namespace": ns, "labels": labels(sk), "ownerReferences": [owner_reference(sk)]},
            "type": "Opaque",
            "data": {"ca.crl": ByteString(pem.into_bytes())},
        }),
    )
    .await
    .map_err(|source| Error::Api {
        what: "writing the CRL",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(vec![cn.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .pem()
    }

    #[test]
    fn the_platform_bundle_holds_every_certificate_once_in_a_stable_order() {
        let (a, b, c) = (cert("a.it"), cert("b.it"), cert("c.it"));
        let indexes = vec![
            ("k2-index".to_string(), format!("{c}{a}")),
            ("k1-index".to_string(), format!("{a}{b}")),
        ];
        let bundle = platform_bundle(&indexes);
        let ders = pec_core::smime::pem_certificates(&bundle);
        let expected: Vec<Vec<u8>> = [&a, &b, &c]
            .iter()
            .flat_map(|p| pec_core::smime::pem_certificates(p))
            .collect();
        assert_eq!(ders, expected, "k1's certificates first, a only once");
        let reversed: Vec<(String, String)> = indexes.into_iter().rev().collect();
        assert_eq!(platform_bundle(&reversed), bundle);
        assert_eq!(platform_bundle(&[]), "");
    }
}
