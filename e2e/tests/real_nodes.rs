//! The chart as users meet it: operator containers on real nodes (kubelet,
//! containerd, runc, a CNI bridge, kube-proxy), one per data center, started
//! by `helm install` alone; then real gateway containers carrying PEC mail
//! through their domain Service. Run only in e2e/test.sh's real-node lane
//! (`cluster.sh up --real-nodes`), where `PEC_E2E_REAL_NODES` is set; the
//! kwok lane leaves this module out with `--skip real_nodes::`.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Pod, Service},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{MailDomain, SigningKey, Site, SiteSpec, SlaTarget},
    controllers::mail_domain::build::domain_service_name,
};
use serde_json::json;

use crate::{
    harness::{
        client, eventually, example_docs, example_prerequisites, has_condition, host_path_claim,
        namespace, store_dir, wait_for,
    },
    round_trip::{
        domain_key, domain_secrets, password_hash, password_secret, standard_domain, string_secret,
    },
    signing::{create_key, pin_secret, real_pin, signing_key},
    sla::measure,
};

const OPERATOR_NAMESPACE: &str = "pec-system";

pub fn lane() {
    assert!(
        std::env::var_os("PEC_E2E_REAL_NODES").is_some(),
        "real_nodes:: runs in e2e/test.sh's real-node lane (cluster.sh up --real-nodes)"
    );
}

fn ready_pod(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The status of a pod's (only) container.
fn first_container(pod: &Pod) -> &k8s_openapi::api::core::v1::ContainerStatus {
    &pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .expect("container statuses")[0]
}

/// Whether a pod's container is running.
fn container_running(pod: &Pod) -> bool {
    first_container(pod)
        .state
        .as_ref()
        .and_then(|s| s.running.as_ref())
        .is_some()
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
        (list.len() == 2 && list.iter().all(ready_pod)).then_some(list)
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
        let container = first_container(pod);
        assert!(
            container.image.ends_with("pec/pec-operator:0.1.0"),
            "{}",
            container.image
        );
        assert!(container_running(pod), "{} not running", pod.name_any());
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

    // `helm test`: the chart's test pod (the operator image, restricted)
    // reads /metrics through the Service's DNS name.
    let test = std::process::Command::new("helm")
        .args(["test", "pec-operator", "--namespace", OPERATOR_NAMESPACE])
        .args(["--timeout", "120s"])
        .output()
        .expect("helm runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    assert!(
        test.status.success()
            && said
                .lines()
                .any(|l| l.starts_with("Phase:") && l.trim_end().ends_with("Succeeded")),
        "helm test: {said}"
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

/// Sites whose nodes are the real ones, one per data center.
async fn real_sites(client: &kube::Client) -> [String; 2] {
    let names = ["real-dc-it1".to_string(), "real-dc-it2".to_string()];
    for (i, (site, zone)) in names.iter().zip(["dc-it1", "dc-it2"]).enumerate() {
        let spec = SiteSpec {
            node_selector: [
                ("topology.kubernetes.io/zone".to_string(), zone.to_string()),
                ("pec.dev/node".to_string(), "real".to_string()),
            ]
            .into(),
            priority: i as i32 * 10,
            ..SiteSpec::default()
        };
        Api::<Site>::all(client.clone())
            .patch(
                site,
                &PatchParams::apply("e2e-tests").force(),
                &Patch::Apply(&Site::new(site, spec)),
            )
            .await
            .expect("apply Site");
    }
    names
}

/// `real-mail` in `ns`: the domain's ReadWriteMany store (one directory on
/// this host, which every real node shares, standing in for network storage).
async fn mail_claim(client: &kube::Client, ns: &str) {
    host_path_claim(client, ns, "real-mail", &store_dir(ns, "real-mail")).await;
}

/// The claim the operator's `--gateway-hsm-token-claim` names, in `ns`: the
/// same token directory as the operator pods', through a PV of its own.
async fn token_claim(client: &kube::Client, ns: &str) {
    let tokens =
        std::env::var("PEC_E2E_REAL_TOKENS").expect("e2e/test.sh sets PEC_E2E_REAL_TOKENS");
    host_path_claim(client, ns, "hsm-tokens", &tokens).await;
}

/// A Standard domain `real.pec.example.it` in a fresh namespace for `test`,
/// served active-active by real gateway pods, two in each real site, all Ready by their
/// own probes; returns the client, the namespace and the domain Service's
/// ClusterIP.
pub async fn real_domain(test: &str) -> (kube::Client, String, String) {
    real_domain_with_key(test, json!({})).await
}

/// [`real_domain`], with `key` (SigningKey spec fields) on top of the key's
/// defaults, such as a short certificate.
pub async fn real_domain_with_key(
    test: &str,
    key: serde_json::Value,
) -> (kube::Client, String, String) {
    const DOMAIN: &str = "real.pec.example.it";
    let client = client().await;
    let ns = namespace(&client, test).await;
    let sites = real_sites(&client).await;
    token_claim(&client, &ns).await;
    pin_secret(&client, &ns, &real_pin()).await;
    domain_key(&client, &ns, "real-key", DOMAIN, key).await;
    let password = format!("probe-{}", std::process::id());
    domain_secrets(&client, &ns, "real", DOMAIN, &password).await;
    password_secret(&client, &ns, "probe-password", &password).await;

    mail_claim(&client, &ns).await;
    let mut md = standard_domain("real", &ns, DOMAIN, &sites, "real-key");
    md.spec.gateway.storage_claim_name = Some("real-mail".into());
    md.spec.failover.mode = pec_operator::api::FailoverMode::ActiveActive;
    // A site healthy for 2 s joins (the example's 300 s is for production).
    md.spec.failover.stabilization_seconds = 2;
    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    mds.create(&PostParams::default(), &md)
        .await
        .expect("create MailDomain");

    // Real gateway containers, one per data center, ready by their own
    // /readyz: a session in the token with the named key, clamd answering,
    // the store writable.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let gateways = eventually("two Ready gateway pods in each real site", || async {
        let list = pods
            .list(&ListParams::default().labels("pec.dev/maildomain=real"))
            .await
            .ok()?
            .items;
        (list.len() == 4 && list.iter().all(ready_pod)).then_some(list)
    })
    .await;
    for pod in &gateways {
        let container = first_container(pod);
        assert!(
            container.image.ends_with("pec/pec-gateway:0.1.0"),
            "{}",
            container.image
        );
    }
    wait_for(
        &mds,
        "real",
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await;

    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get(&domain_service_name("real"))
        .await
        .expect("the domain Service");
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    (client, ns, ip)
}

/// Removes `ns` (and its gateway pods) once a test is done with it.
async fn remove(client: &kube::Client, ns: &str) {
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .delete(ns, &Default::default())
        .await;
}

/// The first measured object of `s`.
fn measured_object(s: Option<&SlaTarget>) -> Option<&pec_operator::api::SlaObjectStatus> {
    s.and_then(|s| s.status.as_ref())
        .and_then(|st| st.objects.first())
}

#[tokio::test]
async fn gateway_pods_on_real_nodes_carry_pec_mail_through_the_domain_service() {
    lane();
    let (client, ns, ip) = real_domain("real-gateway").await;
    // A PEC message through the domain Service's ClusterIP, sent and read
    // back by the operator pods' PecRoundTrip probe.
    let sla = measure(
        &client,
        &ns,
        "real",
        json!({"probe": {
            "kind": "PecRoundTrip",
            "intervalSeconds": 2,
            "timeoutSeconds": 20,
            "pecRoundTrip": {
                "passwordSecretRef": {"name": "probe-password"},
                "submissionAddress": format!("{ip}:465"),
                "apiAddress": format!("{ip}:443"),
            },
        }}),
    )
    .await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    let measured = wait_for(
        &slas,
        &sla,
        "round trips that succeed",
        |s: Option<&SlaTarget>| {
            measured_object(s)
                .is_some_and(|o| o.period.measured_seconds >= 4.0 && o.ongoing_outage.is_none())
        },
    )
    .await;
    let object = measured_object(Some(&measured)).expect("the domain");
    assert_eq!(
        object.period.outages, 0,
        "{:?}",
        object.period.latest_outage
    );
    assert_eq!(object.state, "Met");
    remove(&client, &ns).await;
}

#[tokio::test]
async fn deleting_the_leader_pod_hands_over_and_the_sla_ledger_keeps_its_history() {
    lane();
    let (client, ns, _) = real_domain("real-leader-loss").await;
    let sla = measure(&client, &ns, "real", json!({})).await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    let before = wait_for(
        &slas,
        &sla,
        "a few seconds measured",
        |s: Option<&SlaTarget>| {
            measured_object(s).is_some_and(|o| o.period.measured_seconds >= 5.0)
        },
    )
    .await;
    let measured_before = measured_object(Some(&before))
        .expect("object")
        .period
        .measured_seconds;

    let leases = Api::<Lease>::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let leader = leases
        .get("pec-operator")
        .await
        .expect("Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a leader");
    Api::<Pod>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .delete(&leader, &Default::default())
        .await
        .expect("delete the leader pod");
    let deleted = std::time::Instant::now();
    let successor = eventually("another pod leads", || async {
        let holder = leases
            .get("pec-operator")
            .await
            .ok()?
            .spec?
            .holder_identity?;
        (holder != leader).then_some(holder)
    })
    .await;
    println!(
        "leader {leader} deleted; {successor} leads after {:.1}s",
        deleted.elapsed().as_secs_f64()
    );
    // The new leader resumes the ledger from status: what was measured
    // stays, and the measurement goes on.
    let after = wait_for(
        &slas,
        &sla,
        "measurement resumed",
        move |s: Option<&SlaTarget>| {
            measured_object(s).is_some_and(|o| o.period.measured_seconds > measured_before + 3.0)
        },
    )
    .await;
    let object = measured_object(Some(&after)).expect("object");
    assert_eq!(
        object.period.outages, 0,
        "{:?}",
        object.period.latest_outage
    );
    assert!(object.period.measured_seconds > measured_before);
    remove(&client, &ns).await;
}

/// The acceptance receipts in the probe mailbox of the `real-mail` store of
/// `ns`, oldest first.
fn acceptance_receipts(ns: &str) -> Vec<Vec<u8>> {
    let root = std::path::Path::new(&store_dir(ns, "real-mail"))
        .join("mailboxes")
        .join("sla-probe");
    let mut files: Vec<(std::time::SystemTime, Vec<u8>)> = ["new", "cur"]
        .iter()
        .filter_map(|d| std::fs::read_dir(root.join(d)).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, std::fs::read(e.path()).ok()?))
        })
        .filter(|(_, m)| m.windows(24).any(|w| w == b"X-Ricevuta: accettazione"))
        .collect();
    files.sort_by_key(|(at, _)| *at);
    files.into_iter().map(|(_, m)| m).collect()
}

#[tokio::test]
async fn a_key_rotates_under_traffic_and_no_session_fails() {
    lane();
    let (client, ns, ip) = real_domain_with_key(
        "real-rotation",
        json!({
            "certificate": {"duration": "75s", "renewBefore": "50s"},
            "publication": {"delay": "8s"},
        }),
    )
    .await;
    let password = format!("probe-{}", std::process::id());
    let traffic = crate::real_loss::Traffic::start(&ip, &password);
    traffic.steady().await;
    let from = std::time::Instant::now();

    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &mds,
        "real",
        "gateways on generation 2",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.signing_key_generation)
                == Some(2)
        },
    )
    .await;
    let switched = from.elapsed();
    wait_for(
        &mds,
        "real",
        "the rollout complete",
        has_condition("Progressing", "False", None),
    )
    .await;
    println!(
        "rotation: gateways on generation 2 at +{:.1}s, rollout complete at +{:.1}s",
        switched.as_secs_f64(),
        from.elapsed().as_secs_f64()
    );
    // And a few seconds on the new generation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sessions = traffic.stop().await;
    let during: Vec<_> = sessions.iter().filter(|s| s.started >= from).collect();
    // Each failure with when its session started, from the start of the
    // rotation.
    let failed: Vec<String> = during
        .iter()
        .filter_map(|s| {
            let error = s.result.as_ref().err()?;
            Some(format!(
                "+{:.1}s: {error}",
                s.started.duration_since(from).as_secs_f64()
            ))
        })
        .collect();
    let mut took: Vec<Duration> = during.iter().map(|s| s.took).collect();
    took.sort();
    println!(
        "rotation under traffic: {} sessions over {:.0}s, {} failed; session time p50 {:?}, p99 {:?}, max {:?}",
        during.len(),
        from.elapsed().as_secs_f64(),
        failed.len(),
        crate::stats::percentile(&took, 50.0),
        crate::stats::percentile(&took, 99.0),
        crate::stats::percentile(&took, 100.0),
    );
    assert!(
        failed.is_empty(),
        "sessions failed during the rotation: {failed:?}"
    );

    // Receipts signed before the switch verify with generation 1, after it
    // with generation 2.
    let published = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .get("real-key-certificates")
        .await
        .expect("the publication Secret")
        .data
        .expect("data");
    let mut trusted = pec_core::smime::TrustedSigners::default();
    let mut generation_of = std::collections::BTreeMap::new();
    for (generation, key) in [(1, "g1.crt"), (2, "g2.crt")] {
        let pem = String::from_utf8(published[key].0.clone()).expect("PEM");
        trusted.add_pem(&pem);
        let sha = pec_core::smime::SignerCertificate::from_pem(&pem)
            .map(|c| c.sha256())
            .expect("a certificate");
        generation_of.insert(sha, generation);
    }
    let generations: Vec<i32> = acceptance_receipts(&ns)
        .iter()
        .map(|receipt| {
            let parts = pec_core::smime::split_signed(receipt).expect("a signed receipt");
            let verified =
                pec_core::smime::verify_detached(parts.entity, &parts.signature, &trusted)
                    .expect("every receipt verifies");
            generation_of[&verified.signer_sha256]
        })
        .collect();
    println!(
        "receipts: {} by generation 1, {} by generation 2",
        generations.iter().filter(|g| **g == 1).count(),
        generations.iter().filter(|g| **g == 2).count()
    );
    assert_eq!(
        generations.first(),
        Some(&1),
        "the first receipts are generation 1's"
    );
    assert_eq!(
        generations.last(),
        Some(&2),
        "the last receipts are generation 2's"
    );
    remove(&client, &ns).await;
}

/// Every object of `examples/` (namespace, Sites, SigningKeys, MailDomains,
/// SlaTargets), applied as they are with what their comments ask the
/// platform engineer to make first: the PIN, TLS, mailboxes and probe
/// password Secrets, the token and store claims. The chart's
/// `gateway.clamd` and `gateway.hsmTokenClaim` do the rest.
#[tokio::test]
async fn the_examples_applied_become_ready_with_gateways_running_as_containers() {
    use k8s_openapi::api::core::v1::{Namespace, Node};
    lane();
    const NS: &str = "pec-mail";
    let client = client().await;
    // The example Sites select by zone alone, and this cluster's zones also
    // hold simulated nodes, which run nothing: cordoned, they take no pod.
    let nodes = Api::<Node>::all(client.clone());
    let fake = ListParams::default().labels("type=kwok");
    let cordon = |unschedulable: bool| {
        let nodes = nodes.clone();
        let fake = fake.clone();
        async move {
            for node in nodes.list(&fake).await.expect("nodes").items {
                nodes
                    .patch(
                        &node.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})),
                    )
                    .await
                    .expect("cordon");
            }
        }
    };
    cordon(true).await;

    let ssa = PatchParams::apply("e2e-tests").force();
    for namespace in example_docs::<Namespace>("00-namespace.yaml") {
        Api::<Namespace>::all(client.clone())
            .patch(&namespace.name_any(), &ssa, &Patch::Apply(&namespace))
            .await
            .expect("apply the example namespace");
    }
    token_claim(&client, NS).await;
    pin_secret(&client, NS, &real_pin()).await;
    let password = format!("probe-{}", std::process::id());
    let hash = password_hash(&password);
    for (secret, mailboxes) in [
        (
            "example-standard-mailboxes",
            format!("mario:{hash}\nsla-probe:{hash}\n"),
        ),
        ("example-ufficio-mailboxes", format!("protocollo:{hash}\n")),
    ] {
        string_secret(&client, NS, secret, json!({"mailboxes": mailboxes})).await;
    }
    // The claims and the TLS Secret (the mailboxes above are kept).
    example_prerequisites(&client, NS).await;
    password_secret(&client, NS, "sla-probe-password", &password).await;

    async fn apply_all<K>(api: &Api<K>, file: &str) -> Vec<String>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let ssa = PatchParams::apply("e2e-tests").force();
        let mut names = Vec::new();
        for object in example_docs::<K>(file) {
            api.patch(&object.name_any(), &ssa, &Patch::Apply(&object))
                .await
                .unwrap_or_else(|e| panic!("apply {file}: {e}"));
            names.push(object.name_any());
        }
        names
    }
    let site_api = Api::<Site>::all(client.clone());
    let key_api = Api::<SigningKey>::namespaced(client.clone(), NS);
    let domain_api = Api::<MailDomain>::namespaced(client.clone(), NS);
    let sla_api = Api::<SlaTarget>::namespaced(client.clone(), NS);
    let sites = apply_all(&site_api, "10-sites.yaml").await;
    let keys = apply_all(&key_api, "15-signingkeys.yaml").await;
    let mut domains = apply_all(&domain_api, "20-maildomain-standard.yaml").await;
    domains.extend(apply_all(&domain_api, "30-maildomain-receive-only.yaml").await);
    let mut slas = apply_all(&sla_api, "40-slatarget.yaml").await;
    slas.extend(apply_all(&sla_api, "45-slatarget-round-trip.yaml").await);

    async fn all_ready<K>(api: &Api<K>, names: &[String])
    where
        K: kube::Resource
            + crate::harness::StatusConditions
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
    {
        for name in names {
            wait_for(
                api,
                name,
                "Ready=True",
                has_condition("Ready", "True", None),
            )
            .await;
        }
    }
    all_ready(&site_api, &sites).await;
    all_ready(&key_api, &keys).await;
    all_ready(&domain_api, &domains).await;
    all_ready(&sla_api, &slas).await;

    // Every gateway is a running container on a real node, Ready by its own
    // /readyz: two per domain and data center.
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let gateways = eventually("eight Ready gateway pods", || async {
        let list = pods.list(&ListParams::default()).await.ok()?.items;
        (list.len() == 8 && list.iter().all(ready_pod)).then_some(list)
    })
    .await;
    for pod in &gateways {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("scheduled");
        let labels = nodes.get(&node).await.expect("node").labels().clone();
        assert_eq!(
            labels.get("pec.dev/node").map(String::as_str),
            Some("real"),
            "{} runs on {node}",
            pod.name_any()
        );
        assert!(container_running(pod), "{} not running", pod.name_any());
    }

    // The round-trip probe carried a PEC message through the example
    // domain's gateways and its signed receipts verified.
    let probed = wait_for(
        &sla_api,
        "pec-round-trip",
        "a round trip observed up",
        |s: Option<&SlaTarget>| {
            measured_object(s)
                .and_then(|o| o.last_observation.as_deref())
                .is_some_and(|o| o.ends_with(" up"))
        },
    )
    .await;
    let object = measured_object(Some(&probed)).expect("object");
    assert_eq!(
        object.period.outages, 0,
        "{:?}",
        object.period.latest_outage
    );

    // One domain of the namespace writes to the other with no route in
    // either spec: the platform routes take the envelope to the ufficio
    // domain's Service, its signature is trusted there, and the delivery
    // receipt comes back the same way.
    let service = Api::<Service>::namespaced(client.clone(), NS)
        .get(&domain_service_name("example-standard"))
        .await
        .expect("the example-standard Service");
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    crate::real_loss::submit_as(
        &ip,
        "mario@pec.example.it",
        "protocollo@ufficio.pec.example.it",
        &password,
    )
    .await
    .expect("mario submits to the other domain");
    let messages = |claim: &str, mailbox: &str| -> Vec<String> {
        let dir = std::path::Path::new(&store_dir(NS, claim))
            .join("mailboxes")
            .join(mailbox)
            .join("new");
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually("the envelope in protocollo's mailbox", || async {
        messages("example-ufficio-mail", "protocollo")
            .iter()
            .any(|m| m.contains("X-Trasporto: posta-certificata"))
            .then_some(())
    })
    .await;
    eventually("the delivery receipt in mario's mailbox", || async {
        messages("example-standard-mail", "mario")
            .iter()
            .any(|m| m.contains("X-Ricevuta: avvenuta-consegna"))
            .then_some(())
    })
    .await;

    remove(&client, NS).await;
    cordon(false).await;
}
