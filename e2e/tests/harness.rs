//! Shared helpers: the client, per-test namespaces, waiting on conditions.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::{
    Api, Client, Resource,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::wait::{Condition, await_condition},
};
use pec_operator::api::{Site, SiteSpec};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::datacenter::{WAIT, eventually};

/// A client for the cluster in `KUBECONFIG` (admin).
pub async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG must point at the cluster e2e/test.sh started")
}

/// A fresh namespace named after the test (test names are unique in a run;
/// the process id keeps reruns against one cluster apart).
pub async fn namespace(client: &Client, test: &str) -> String {
    let head: String = test.replace('_', "-").chars().take(50).collect();
    let name = format!("{}-{}", head.trim_end_matches('-'), std::process::id());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create test namespace");
    name
}

/// Applies the Sites dc-it1 and dc-it2 (cluster-scoped, shared by all tests).
pub async fn ensure_example_sites(client: &Client) {
    for (name, priority) in [("dc-it1", 0), ("dc-it2", 10)] {
        let site = Site::new(
            name,
            SiteSpec {
                node_selector: [("topology.kubernetes.io/zone".to_string(), name.to_string())]
                    .into(),
                priority,
                ..SiteSpec::default()
            },
        );
        Api::<Site>::all(client.clone())
            .patch(
                name,
                &PatchParams::apply("e2e-tests").force(),
                &Patch::Apply(&site),
            )
            .await
            .expect("apply example site");
    }
}

/// The example MailDomains (`examples/20-*` and `30-*`).
pub fn example_domains() -> Vec<pec_operator::api::MailDomain> {
    [
        "20-maildomain-standard.yaml",
        "30-maildomain-receive-only.yaml",
    ]
    .into_iter()
    .map(example)
    .collect()
}

/// Creates in `ns` what the example MailDomains name and a platform engineer
/// must make before applying them (see the examples' comments): the
/// ReadWriteMany store claims, the TLS Secret (one certificate naming every
/// example domain that uses it) and the mailboxes Secrets (mailboxes that
/// receive but never log in). What exists already is left as it is.
pub async fn example_prerequisites(client: &Client, ns: &str) {
    use k8s_openapi::api::core::v1::Secret;
    let domains = example_domains();
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let absent = |name: String| {
        let secrets = secrets.clone();
        async move { secrets.get_opt(&name).await.expect("read Secret").is_none() }
    };
    let mut tls: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for md in &domains {
        let gateway = &md.spec.gateway;
        if let Some(claim) = &gateway.storage_claim_name {
            host_path_claim(client, ns, claim, &store_dir(ns, claim)).await;
        }
        if let Some(secret) = &gateway.tls_secret_ref {
            tls.entry(secret.clone())
                .or_default()
                .push(md.spec.domain.clone());
        }
        if let Some(secret) = gateway.mailboxes_secret_ref.clone()
            && absent(secret.clone()).await
        {
            crate::round_trip::string_secret(
                client,
                ns,
                &secret,
                serde_json::json!({"mailboxes": "postmaster:!\n"}),
            )
            .await;
        }
    }
    for (secret, names) in tls {
        if absent(secret.clone()).await {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            crate::round_trip::tls_secret(client, ns, &secret, &names).await;
        }
    }
}

/// A directory on this host for the store `name` of `ns`, with a
/// `mailboxes/` inside, that any pod user may write (hostPath volumes get
/// no fsGroup ownership). Every real node shares this host, so it stands in
/// for network storage.
pub fn store_dir(ns: &str, name: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pec-e2e-store-{ns}-{name}"));
    std::fs::create_dir_all(dir.join("mailboxes")).expect("store dir");
    for d in [dir.clone(), dir.join("mailboxes")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    }
    dir.to_string_lossy().into_owned()
}

/// A hostPath PersistentVolume for `path`, bound to the ReadWriteMany claim
/// `name` in `ns`; both are left as they are when they exist already.
pub async fn host_path_claim(client: &Client, ns: &str, name: &str, path: &str) {
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{name}-{ns}")},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": path, "type": "Directory"},
            "claimRef": {"namespace": ns, "name": name},
        },
    }))
    .expect("pv");
    let created = Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await;
    created_or_present(created, "PV");
    let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "volumeName": format!("{name}-{ns}"),
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))
    .expect("pvc");
    let created = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pvc)
        .await;
    created_or_present(created, "PVC");
}

fn created_or_present<K>(result: kube::Result<K>, what: &str) {
    match result {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create {what}: {e}"),
    }
}

/// Waits until `cond` holds for the object `name`, or fails the test after [`WAIT`].
pub async fn wait_for<K, C>(api: &Api<K>, name: &str, what: &str, cond: C) -> K
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    C: Condition<K>,
{
    match tokio::time::timeout(WAIT, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => obj,
        Ok(Ok(None)) => panic!("{name}: deleted while waiting for {what}"),
        Ok(Err(e)) => panic!("{name}: watch failed while waiting for {what}: {e}"),
        Err(_) => {
            let now = api.get_opt(name).await.ok().flatten();
            panic!("{name}: timed out after {WAIT:?} waiting for {what}; last seen: {now:#?}")
        }
    }
}

/// A condition: the object's status condition `type_` has `status` (and `reason`, if given).
pub fn has_condition<K>(
    type_: &'static str,
    status: &'static str,
    reason: Option<&'static str>,
) -> impl Condition<K>
where
    K: StatusConditions,
{
    move |obj: Option<&K>| {
        obj.and_then(|o| o.conditions().iter().find(|c| c.type_ == type_).cloned())
            .is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r))
    }
}

/// The condition `type_` of `obj`, which the test already waited for.
pub fn condition<K: StatusConditions>(
    obj: &K,
    type_: &str,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    obj.conditions()
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

/// Kinds whose status carries conditions.
pub trait StatusConditions {
    /// The status conditions, empty without a status.
    fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition];
}

macro_rules! status_conditions {
    ($($kind:ty),*) => {$(
        impl StatusConditions for $kind {
            fn conditions(&self) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
                self.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default()
            }
        }
    )*};
}

status_conditions!(
    pec_operator::api::MailDomain,
    pec_operator::api::SigningKey,
    Site,
    pec_operator::api::SlaTarget
);

/// Reads a YAML file of the repository's `examples/` as objects of kind `K`.
pub fn example<K: DeserializeOwned>(file: &str) -> K {
    let mut docs = example_docs(file);
    assert_eq!(docs.len(), 1, "{file} holds {} objects", docs.len());
    docs.remove(0)
}

/// Every object of a YAML file of `examples/` that holds several, as `K`.
pub fn example_docs<K: DeserializeOwned>(file: &str) -> Vec<K> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

/// The body of an HTTP/1.0 GET of `path` on `127.0.0.1:port` (headers included).
pub async fn http_get(port: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("read response");
    body
}

/// The `/metrics` text of the operator replica listening on `port`.
pub async fn scrape(port: &str) -> String {
    http_get(port, "/metrics").await
}

/// The `/metrics` text of every operator replica e2e/test.sh started.
pub async fn scrape_all() -> String {
    let ports =
        std::env::var("PEC_E2E_METRICS_PORTS").expect("e2e/test.sh sets PEC_E2E_METRICS_PORTS");
    let mut all = String::new();
    for port in ports.split(',') {
        all.push_str(&scrape(port).await);
    }
    all
}

/// The (type, reason) of every Event in `ns` about the object `name`.
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default()))
        .collect()
}

/// The (reason, note) of every Event in `ns`.
pub async fn events_text(client: &Client, ns: &str) -> Vec<(String, String)> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}
