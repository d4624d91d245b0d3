//! Publication of certificates before use, and the CRL of the `ca` issuer.
//!
//! `<key>-certificates` (Secret) and `<key>-index` (ConfigMap, labelled
//! `pec.dev/certificate-index: "true"` for the providers' index) hold every
//! published, active or last-retired certificate that is not revoked, as
//! `g<N>.crt` and together as `bundle.crt`; the ConfigMap adds `index.yaml`.
//! The gateways read the certificate their configuration names from the
//! Secret. `<key>-crl` holds `ca.crl`, the CRL of the `ca` issuer.

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

/// Name of the publication Secret.
pub fn secret_name(sk: &SigningKey) -> String {
    format!("{}-certificates", sk.name_any())
}

/// Name of the index ConfigMap.
pub fn index_name(sk: &SigningKey) -> String {
    index_name_of(&sk.name_any())
}

/// Name of the index ConfigMap of the SigningKey named `key`.
pub fn index_name_of(key: &str) -> String {
    format!("{key}-index")
}

/// Name of the CRL Secret.
pub fn crl_name(sk: &SigningKey) -> String {
    format!("{}-crl", sk.name_any())
}

/// The key under which generation `n`'s certificate is published.
pub fn certificate_key(n: i64) -> String {
    format!("g{n}.crt")
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
    index_labels.insert("pec.dev/certificate-index".into(), "true".into());
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
