//! The chart as users meet it: operator containers on real nodes (kubelet,
//! containerd, runc, a CNI bridge, kube-proxy), one per data center, started
//! by `helm install` alone. Run only in e2e/test.sh's real-node lane
//! (`cluster.sh up --real-nodes`), where `PEC_E2E_REAL_NODES` is set; the
//! kwok lane leaves this module out with `--skip real_nodes::`.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Pod, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use pec_operator::api::SigningKey;
use serde_json::json;

use crate::{
    harness::{client, eventually, has_condition, namespace, wait_for},
    signing::{create_key, pin_secret, real_pin, signing_key},
};

const OPERATOR_NAMESPACE: &str = "pec-system";

fn lane() {
    assert!(
        std::env::var_os("PEC_E2E_REAL_NODES").is_some(),
        "real_nodes:: runs in e2e/test.sh's real-node lane (cluster.sh up --real-nodes)"
    );
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A plain HTTP/1.0 GET of `path` on `ip:port`: the status line and headers
/// and the body.
async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("connect {address}: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: metrics\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test]
async fn helm_install_alone_runs_one_operator_per_data_center_with_one_leader() {
    lane();
    let client = client().await;
    let pods = Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let selector = ListParams::default().labels("app.kubernetes.io/name=pec-operator");
    let running = eventually("two operator pods Running and Ready", || async {
        let list = pods.list(&selector).await.ok()?.items;
        (list.len() == 2 && list.iter().all(ready)).then_some(list)
    })
    .await;

    // One per data center, on the real nodes.
    let mut zones = BTreeSet::new();
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    for pod in &running {
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("scheduled");
        let node = nodes.get(&node_name).await.expect("node");
        let labels = node.labels();
        assert_eq!(
            labels.get("pec.dev/node").map(String::as_str),
            Some("real"),
            "{} runs on {node_name}, not a real node",
            pod.name_any()
        );
        zones.insert(labels["topology.kubernetes.io/zone"].clone());
        let status = pod.status.as_ref().expect("status");
        let container = &status.container_statuses.as_ref().expect("containers")[0];
        assert!(
            container.image.ends_with("pec/pec-operator:0.1.0"),
            "{}",
            container.image
        );
        assert!(
            container
                .state
                .as_ref()
                .and_then(|s| s.running.as_ref())
                .is_some(),
            "{} not running",
            pod.name_any()
        );
    }
    assert_eq!(
        zones,
        BTreeSet::from(["dc-it1".to_string(), "dc-it2".to_string()])
    );

    // Exactly one leader, and it is one of the two pods.
    let names: BTreeSet<String> = running.iter().map(|p| p.name_any()).collect();
    let leases = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let holder = eventually("a leader", || async {
        leases.get("pec-operator").await.ok()?.spec?.holder_identity
    })
    .await;
    assert!(
        names.contains(&holder),
        "leader {holder} is not one of {names:?}"
    );

    // The CRDs are served.
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in [
        "sites.pec.dev",
        "maildomains.pec.dev",
        "signingkeys.pec.dev",
        "slatargets.pec.dev",
    ] {
        let established = crds
            .get(crd)
            .await
            .expect("CRD")
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        assert!(established, "{crd} not Established");
    }

    // /metrics through the chart's Service: its ClusterIP, through kube-proxy.
    let services = Api::<Service>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let service = services
        .list(&ListParams::default().labels("app.kubernetes.io/name=pec-operator"))
        .await
        .expect("services")
        .items
        .into_iter()
        .next()
        .expect("the chart's metrics Service");
    let spec = service.spec.expect("spec");
    let address = format!(
        "{}:{}",
        spec.cluster_ip.expect("ClusterIP"),
        spec.ports.expect("ports")[0].port
    );
    let answer = eventually("/metrics through the Service", || async {
        let a = http_get(&address, "/metrics").await;
        a.lines()
            .next()
            .is_some_and(|status| status.contains(" 200 "))
            .then_some(a)
    })
    .await;
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: text/plain; version=0.0.4"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(
        answer.contains("pec_"),
        "no pec_ metrics through the Service"
    );
}

#[tokio::test]
async fn restricted_pod_security_is_enforced_where_the_operator_runs() {
    lane();
    let client = client().await;
    // What any baseline pod may do, and restricted forbids: root allowed,
    // capabilities kept, no seccomp profile.
    let unrestricted: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unrestricted"},
        "spec": {
            "nodeSelector": {"pec.dev/node": "real"},
            "containers": [{
                "name": "c",
                "image": "docker.io/pec/pec-operator:0.1.0",
                "imagePullPolicy": "Never",
            }],
        },
    }))
    .expect("pod");
    let err = Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .create(&PostParams::default(), &unrestricted)
        .await
        .expect_err("a pod outside the restricted profile is refused");
    assert!(
        err.to_string()
            .contains("violates PodSecurity \"restricted"),
        "refused, but not by Pod Security: {err}"
    );
}

#[tokio::test]
async fn the_operator_pods_reach_the_token_on_their_volume_and_make_a_signing_key() {
    lane();
    let client = client().await;
    let ns = namespace(&client, "real-signing-key").await;
    pin_secret(&client, &ns, &real_pin()).await;
    let sk: SigningKey = signing_key("real", json!({"selfSigned": {}}), json!({}));
    let keys = create_key(&client, &ns, &sk).await;
    let made = wait_for(
        &keys,
        "real",
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await;
    let current = made
        .status
        .and_then(|s| s.current)
        .expect("a current generation");
    assert_eq!(current.generation, 1);
    assert!(
        current
            .certificate
            .is_some_and(|c| c.contains("BEGIN CERTIFICATE"))
    );
}
