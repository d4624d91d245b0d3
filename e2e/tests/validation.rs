//! Bad input is refused by the API server itself (CRD schema and CEL rules),
//! with a message that names the field to fix.

use kube::{
    Api,
    api::{DynamicObject, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::{Value, json};

use crate::harness::{client, namespace};

fn maildomain(spec: Value) -> Value {
    json!({
        "apiVersion": "pec.dev/v1alpha1",
        "kind": "MailDomain",
        "metadata": {"name": "candidate"},
        "spec": spec,
    })
}

fn valid_spec() -> Value {
    json!({
        "domain": "pec.example.it",
        "profile": "Standard",
        "sites": ["dc-it1", "dc-it2"],
        "gateway": {"image": "pec-gateway:1.0.0", "tlsSecretRef": "pec-tls"},
    })
}

/// `valid_spec()` with `path` (dot-separated) set to `value`.
fn with(path: &str, value: Value) -> Value {
    let mut spec = valid_spec();
    let mut at = &mut spec;
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        at = at
            .as_object_mut()
            .expect("object")
            .entry(part.to_string())
            .or_insert_with(|| json!({}));
    }
    at[parts[parts.len() - 1]] = value;
    spec
}

async fn create(api: &Api<DynamicObject>, obj: Value) -> Result<(), String> {
    let obj: DynamicObject = serde_json::from_value(obj).expect("dynamic object");
    api.create(&PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn invalid_maildomains_are_refused_with_the_field_named() {
    let client = client().await;
    let ns = namespace(&client, "invalid-maildomains").await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("pec.dev", "v1alpha1", "MailDomain"));
    let api = Api::<DynamicObject>::namespaced_with(client, &ns, &ar);

    let long_label = format!("{}.example.it", "a".repeat(64));
    let too_long = format!("{}.it", vec!["abcdefghi"; 26].join("."));
    assert!(too_long.len() > 253);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "uppercase FQDN",
            with("domain", json!("PEC.Example.IT")),
            "spec.domain",
        ),
        (
            "single-label FQDN",
            with("domain", json!("localhost")),
            "spec.domain",
        ),
        (
            "label starting with a hyphen",
            with("domain", json!("-pec.example.it")),
            "spec.domain",
        ),
        (
            "trailing dot",
            with("domain", json!("pec.example.it.")),
            "spec.domain",
        ),
        (
            "label over 63 characters",
            with("domain", json!(long_label)),
            "spec.domain",
        ),
        (
            "FQDN over 253 characters",
            with("domain", json!(too_long)),
            "spec.domain",
        ),
        (
            "one replica",
            with("gateway.replicasPerSite", json!(1)),
            "spec.gateway.replicasPerSite",
        ),
        (
            "replicas of the wrong type",
            with("gateway.replicasPerSite", json!("two")),
            "spec.gateway.replicasPerSite",
        ),
        (
            "a message size over 100 MB",
            with("maxMessageBytes", json!(104_857_601)),
            "spec.maxMessageBytes",
        ),
        (
            "an unknown profile",
            with("profile", json!("Premium")),
            "spec.profile",
        ),
        ("an empty site list", with("sites", json!([])), "spec.sites"),
        (
            "a duplicated site",
            with("sites", json!(["dc-it1", "dc-it1"])),
            "spec.sites",
        ),
        (
            "antivirus disabled",
            with("antivirus.enabled", json!(false)),
            "spec.antivirus.enabled",
        ),
        (
            "quarantine under 30 months",
            with("antivirus.quarantineRetention", json!("12mo")),
            "spec.antivirus.quarantineRetention",
        ),
        (
            "a Standard domain without TLS",
            with("gateway.tlsSecretRef", json!(null)),
            "gateway.tlsSecretRef",
        ),
        (
            "a clamd address of another scheme",
            with("antivirus.clamd", json!("http://clamd:3310")),
            "spec.antivirus.clamd",
        ),
    ];
    for (what, spec, field) in cases {
        match create(&api, maildomain(spec)).await {
            Ok(()) => panic!("{what}: was accepted"),
            Err(message) => assert!(
                message.contains(field),
                "{what}: message does not name {field}: {message}"
            ),
        }
    }
    // The control: the valid spec the cases were derived from is accepted.
    create(&api, maildomain(valid_spec()))
        .await
        .expect("the valid MailDomain is accepted");
}

#[tokio::test]
async fn antivirus_refusal_says_it_is_mandatory() {
    let client = client().await;
    let ns = namespace(&client, "antivirus-mandatory").await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("pec.dev", "v1alpha1", "MailDomain"));
    let api = Api::<DynamicObject>::namespaced_with(client, &ns, &ar);
    let err = create(&api, maildomain(with("antivirus.enabled", json!(false))))
        .await
        .expect_err("refused");
    assert!(err.contains("mandatory"), "{err}");
}

#[tokio::test]
async fn a_site_without_node_selector_is_refused() {
    let client = client().await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("pec.dev", "v1alpha1", "Site"));
    let api = Api::<DynamicObject>::all_with(client, &ar);
    let site = json!({
        "apiVersion": "pec.dev/v1alpha1",
        "kind": "Site",
        "metadata": {"name": "no-selector"},
        "spec": {"nodeSelector": {}},
    });
    let err = create(&api, site).await.expect_err("refused");
    assert!(err.contains("spec.nodeSelector"), "{err}");
}
