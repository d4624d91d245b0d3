//! The MailDomain reconciler on a real cluster: redundant gateways per site,
//! rollouts on configuration changes, pruning, garbage collection and
//! recovery from a missing Site.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Node, Pod, Service},
        events::v1::Event,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{MailDomain, Profile, Site, SiteSpec},
    controllers::mail_domain::{
        build::{CONFIG_HASH_ANNOTATION, DOMAIN_LABEL, SITE_LABEL, child_name},
        gateway::{GatewayDefaults, METRICS_PORT},
    },
};
use serde_json::json;

use crate::harness::{
    client, condition, ensure_example_sites, events_of, eventually, example, example_prerequisites,
    has_condition, namespace, wait_for,
};

const SITES: [&str; 2] = ["dc-it1", "dc-it2"];

async fn create_example(client: &Client, ns: &str, file: &str) -> MailDomain {
    example_prerequisites(client, ns).await;
    let mut md: MailDomain = example(file);
    md.metadata.namespace = Some(ns.to_string());
    Api::<MailDomain>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &md)
        .await
        .expect("create MailDomain")
}

async fn wait_ready(client: &Client, ns: &str, name: &str) -> MailDomain {
    let api = Api::<MailDomain>::namespaced(client.clone(), ns);
    wait_for(
        &api,
        name,
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await
}

fn selector(md: &str, site: &str) -> String {
    format!("{DOMAIN_LABEL}={md},{SITE_LABEL}={site}")
}

async fn pods(client: &Client, ns: &str, md: &str, site: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector(md, site)))
        .await
        .expect("list pods")
        .items
}

/// How many children of each kind carry `labels`.
async fn child_counts(client: &Client, ns: &str, labels: &str) -> [usize; 5] {
    let lp = ListParams::default().labels(labels);
    let c = client.clone();
    [
        Api::<Deployment>::namespaced(c.clone(), ns)
            .list_metadata(&lp)
            .await
            .expect("list")
            .items
            .len(),
        Api::<ConfigMap>::namespaced(c.clone(), ns)
            .list_metadata(&lp)
            .await
            .expect("list")
            .items
            .len(),
        Api::<Service>::namespaced(c.clone(), ns)
            .list_metadata(&lp)
            .await
            .expect("list")
            .items
            .len(),
        Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
            .list_metadata(&lp)
            .await
            .expect("list")
            .items
            .len(),
        Api::<NetworkPolicy>::namespaced(c, ns)
            .list_metadata(&lp)
            .await
            .expect("list")
            .items
            .len(),
    ]
}

#[tokio::test]
async fn examples_get_redundant_gateways_in_each_site() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "examples-ready").await;
    let nodes = Api::<Node>::all(client.clone());
    for (file, profile) in [
        ("20-maildomain-standard.yaml", Profile::Standard),
        ("30-maildomain-receive-only.yaml", Profile::ReceiveOnly),
    ] {
        let md = create_example(&client, &ns, file).await;
        let name = md.name_any();
        let md = wait_ready(&client, &ns, &name).await;
        let status = md.status.clone().expect("status");
        for site in SITES {
            let counts = status
                .sites
                .iter()
                .find(|s| s.site == site)
                .expect("site in status");
            assert_eq!((counts.desired, counts.ready), (2, 2), "{name}/{site}");

            let pods = pods(&client, &ns, &name, site).await;
            assert_eq!(pods.len(), 2, "{name}/{site}: two gateway pods");
            let mut machines = BTreeSet::new();
            for pod in &pods {
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                assert_eq!(phase.as_deref(), Some("Running"), "{}", pod.name_any());
                let node_name = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .expect("scheduled");
                let node = nodes.get(&node_name).await.expect("node");
                assert_eq!(
                    node.labels()
                        .get("topology.kubernetes.io/zone")
                        .map(String::as_str),
                    Some(site),
                    "{} runs outside {site}",
                    pod.name_any()
                );
                machines.insert(node_name);
            }
            assert_eq!(machines.len(), 2, "{name}/{site}: replicas share a machine");

            let child = child_name(&name, site);
            let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
                .get(&child)
                .await
                .expect("PDB");
            assert_eq!(
                pdb.spec.and_then(|s| s.max_unavailable),
                Some(IntOrString::Int(1))
            );

            let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
                .get(&child)
                .await
                .expect("NetworkPolicy");
            let ports: BTreeSet<i32> = policy
                .spec
                .and_then(|s| s.ingress)
                .unwrap_or_default()
                .iter()
                .flat_map(|rule| rule.ports.clone().unwrap_or_default())
                .filter_map(|p| match p.port {
                    Some(IntOrString::Int(n)) => Some(n),
                    _ => None,
                })
                .collect();
            let expected: BTreeSet<i32> = profile
                .ports()
                .iter()
                .map(|p| p.port)
                .chain([METRICS_PORT])
                .collect();
            assert_eq!(ports, expected, "{name}/{site}: NetworkPolicy ports");

            // The gateway reads what the operator rendered, and every file it
            // names is mounted.
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get(&child)
                .await
                .expect("ConfigMap");
            let yaml = cm
                .data
                .as_ref()
                .and_then(|d| d.get("gateway.yaml"))
                .expect("gateway.yaml");
            let config = pec_core::config::GatewayConfig::from_yaml(yaml).unwrap_or_else(|e| {
                panic!("{name}/{site}: the gateway refuses its configuration: {e}")
            });
            assert_eq!(config.site, site);
            assert!(config.tls.is_some(), "{name}: TLS configured");
            assert_eq!(config.has_access_point(), profile == Profile::Standard);
            let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
                .get(&child)
                .await
                .expect("Deployment");
            let pod = deployment.spec.template.spec.expect("pod spec");
            let container = &pod.containers[0];
            assert_eq!(
                container.image.as_deref(),
                Some(GatewayDefaults::default().image.as_str()),
                "the reference gateway image by default"
            );
            let mounts: Vec<String> = container
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.clone())
                .collect();
            for path in [
                config.paths.credentials.clone(),
                config.paths.providers[0].clone(),
                config.paths.queue.clone(),
                config.tls.clone().expect("tls").key_file,
            ] {
                assert!(
                    mounts.iter().any(|m| path.starts_with(m)),
                    "{name}/{site}: {} is not mounted ({mounts:?})",
                    path.display()
                );
            }
            let probe = container
                .readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .expect("HTTP readiness probe");
            assert_eq!(probe.path.as_deref(), Some("/readyz"));
            if profile == Profile::ReceiveOnly {
                for forbidden in [465, 993, 995] {
                    assert!(!ports.contains(&forbidden), "{name}: port {forbidden} open");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_changed_gateway_setting_rolls_the_pods() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "config-rollout").await;
    let md = create_example(&client, &ns, "20-maildomain-standard.yaml").await;
    let name = md.name_any();
    wait_ready(&client, &ns, &name).await;
    let before: BTreeSet<String> = pods(&client, &ns, &name, "dc-it1")
        .await
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let hash = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    };
    let old_hash = hash(
        &deployments
            .get(&child_name(&name, "dc-it1"))
            .await
            .expect("deployment"),
    );

    Api::<MailDomain>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxMessageBytes": 50_000_000}})),
        )
        .await
        .expect("patch maxMessageBytes");

    let config = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let child = child_name(&name, "dc-it1");
    eventually("the new size in the gateway configuration", || async {
        let cm = config.get(&child).await.ok()?;
        cm.data?
            .values()
            .any(|v| v.contains("maxMessageBytes: 50000000"))
            .then_some(())
    })
    .await;
    eventually(
        "the pod template to carry the new configuration hash",
        || async {
            let now = hash(&deployments.get(&child).await.ok()?);
            (now != old_hash).then_some(())
        },
    )
    .await;
    eventually("pods replaced by the rollout", || async {
        let now = pods(&client, &ns, &name, "dc-it1").await;
        // Never below full strength: a gateway goes only once its
        // successor is ready (maxUnavailable 0 while the site has spare nodes).
        let serving = now
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        assert!(
            serving >= 2,
            "the rollout went below full strength: {serving} ready gateways"
        );
        let ready_new = now
            .iter()
            .filter(|p| !before.contains(&p.uid().unwrap_or_default()))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        let old_left = now
            .iter()
            .filter(|p| before.contains(&p.uid().unwrap_or_default()))
            .count();
        (ready_new == 2 && old_left == 0).then_some(())
    })
    .await;
    wait_ready(&client, &ns, &name).await;
    eventually("a ConfigChanged Event", || async {
        events_of(&client, &ns, &name)
            .await
            .contains(&("Normal".into(), "ConfigChanged".into()))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn removing_a_site_removes_its_children() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "remove-site").await;
    let md = create_example(&client, &ns, "30-maildomain-receive-only.yaml").await;
    let name = md.name_any();
    wait_ready(&client, &ns, &name).await;
    assert_eq!(
        child_counts(&client, &ns, &selector(&name, "dc-it2")).await,
        [1; 5]
    );

    Api::<MailDomain>::namespaced(client.clone(), &ns)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sites": ["dc-it1"]}})),
        )
        .await
        .expect("patch sites");
    eventually("dc-it2's children to go", || async {
        (child_counts(&client, &ns, &selector(&name, "dc-it2")).await == [0; 5]).then_some(())
    })
    .await;
    assert_eq!(
        child_counts(&client, &ns, &selector(&name, "dc-it1")).await,
        [1; 5]
    );
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &api,
        &name,
        "a single-site warning",
        has_condition("SiteRedundancy", "False", Some("SingleSite")),
    )
    .await;
    wait_ready(&client, &ns, &name).await;
    eventually("a SiteRemoved Event", || async {
        events_of(&client, &ns, &name)
            .await
            .contains(&("Normal".into(), "SiteRemoved".into()))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_domain_removes_everything() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "delete-domain").await;
    let md = create_example(&client, &ns, "20-maildomain-standard.yaml").await;
    let name = md.name_any();
    wait_ready(&client, &ns, &name).await;
    let labels = format!("{DOMAIN_LABEL}={name}");
    // Per site a Deployment, ConfigMap, Service, PDB and NetworkPolicy, plus the domain Service.
    assert_eq!(child_counts(&client, &ns, &labels).await, [2, 2, 3, 2, 2]);
    // The domain's own series, as the leader exports them.
    let ours = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| {
                l.contains(&format!("namespace=\"{ns}\""))
                    && l.contains(&format!("maildomain=\"{name}\""))
            })
            .count()
    };
    eventually("the domain's series", || async {
        (ours(&crate::harness::scrape_all().await) > 0).then_some(())
    })
    .await;

    Api::<MailDomain>::namespaced(client.clone(), &ns)
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete MailDomain");
    let pods_api = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually(
        "the garbage collector to remove every child and pod",
        || async {
            let pods = pods_api
                .list_metadata(&ListParams::default().labels(&labels))
                .await
                .ok()?
                .items
                .len();
            (child_counts(&client, &ns, &labels).await == [0; 5] && pods == 0).then_some(())
        },
    )
    .await;
    eventually("no series left for the deleted domain", || async {
        (ours(&crate::harness::scrape_all().await) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_missing_site_is_reported_and_recovers_when_it_appears() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "missing-site").await;
    let late = format!("dc-late-{}", std::process::id());
    example_prerequisites(&client, &ns).await;
    let mut md: MailDomain = example("20-maildomain-standard.yaml");
    md.metadata.namespace = Some(ns.clone());
    md.spec.sites = vec!["dc-it1".into(), late.clone()];
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &md)
        .await
        .expect("create");
    let name = md.name_any();

    let reported = wait_for(
        &api,
        &name,
        "Ready=False SiteNotFound",
        has_condition("Ready", "False", Some("SiteNotFound")),
    )
    .await;
    let ready = condition(&reported, "Ready");
    assert!(
        ready.message.contains(&late),
        "message names the missing site: {}",
        ready.message
    );
    // The site that exists is served meanwhile.
    eventually(
        "dc-it1 gateways while the other site is missing",
        || async { (pods(&client, &ns, &name, "dc-it1").await.len() == 2).then_some(()) },
    )
    .await;
    let events = Api::<Event>::namespaced(client.clone(), &ns);
    eventually("a SiteNotFound event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("SiteNotFound"))
            .then_some(())
    })
    .await;

    let site = Site::new(
        &late,
        SiteSpec {
            node_selector: [(
                "topology.kubernetes.io/zone".to_string(),
                "dc-it2".to_string(),
            )]
            .into(),
            priority: 5,
            ..SiteSpec::default()
        },
    );
    let sites = Api::<Site>::all(client.clone());
    sites
        .create(&PostParams::default(), &site)
        .await
        .expect("create the late Site");
    wait_ready(&client, &ns, &name).await;
    assert_eq!(pods(&client, &ns, &name, &late).await.len(), 2);

    // Deleting the Site while the domain lists it is refused: the Site
    // stays, says which domain holds it, and its gateways keep running.
    sites
        .delete(&late, &DeleteParams::default())
        .await
        .expect("delete request accepted");
    let held = wait_for(
        &sites,
        &late,
        "DeletionRefused=True InUse",
        has_condition("DeletionRefused", "True", Some("InUse")),
    )
    .await;
    let refused = condition(&held, "DeletionRefused");
    assert!(
        refused.message.contains(&format!("{ns}/{name}")),
        "names the domain: {}",
        refused.message
    );
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(pods(&client, &ns, &name, &late).await.len(), 2);
    assert!(
        condition(&api.get(&name).await.expect("get"), "Ready").status == "True",
        "the domain is untouched"
    );
    // Once no domain lists it, the deletion completes.
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"sites": ["dc-it1", "dc-it2"]}})),
    )
    .await
    .expect("drop the late site");
    eventually("the late Site deleted", || async {
        sites
            .get_opt(&late)
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
}

/// A MailDomain whose TLS certificate names another domain and whose
/// mailboxes Secret is missing is not Ready, says both, keeps its gateways,
/// and becomes Ready once both are fixed, without being edited.
#[tokio::test]
async fn a_tls_certificate_for_another_name_and_a_missing_secret_are_reported() {
    use k8s_openapi::api::core::v1::Secret;
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "bad-references").await;
    let md: MailDomain = example("20-maildomain-standard.yaml");
    let tls = md
        .spec
        .gateway
        .tls_secret_ref
        .clone()
        .expect("a TLS Secret");
    let mailboxes = md
        .spec
        .gateway
        .mailboxes_secret_ref
        .clone()
        .expect("a mailboxes Secret");
    crate::round_trip::tls_secret(&client, &ns, &tls, &["www.other.example"]).await;
    example_prerequisites(&client, &ns).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    secrets
        .delete(&mailboxes, &DeleteParams::default())
        .await
        .expect("delete the mailboxes Secret");
    let mut created = md.clone();
    created.metadata.namespace = Some(ns.clone());
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &created)
        .await
        .expect("create MailDomain");
    let name = created.name_any();

    let reported = wait_for(
        &api,
        &name,
        "Ready=False TlsCertificateDoesNotCoverDomain",
        has_condition("Ready", "False", Some("TlsCertificateDoesNotCoverDomain")),
    )
    .await;
    let ready = condition(&reported, "Ready");
    for part in [
        tls.as_str(),
        "www.other.example",
        &md.spec.domain,
        &mailboxes,
    ] {
        assert!(
            ready.message.contains(part),
            "names {part}: {}",
            ready.message
        );
    }
    assert_eq!(
        condition(&reported, "ReferencesResolved").status,
        "False",
        "the references condition says it too"
    );
    // Nothing is held back: the gateways are there for when the Secrets are.
    for site in SITES {
        eventually("gateways despite the bad references", || async {
            (pods(&client, &ns, &name, site).await.len() == 2).then_some(())
        })
        .await;
    }

    secrets
        .delete(&tls, &DeleteParams::default())
        .await
        .expect("delete the wrong certificate");
    example_prerequisites(&client, &ns).await;
    let fixed = wait_ready(&client, &ns, &name).await;
    assert_eq!(condition(&fixed, "ReferencesResolved").status, "True");
}

/// A second MailDomain of the namespace (one platform) for a domain name
/// another already has gets nothing applied and says who has the name; the
/// first keeps serving and keeps the route. When the first goes, the second
/// takes over.
#[tokio::test]
async fn a_domain_name_already_taken_is_refused_naming_the_holder() {
    let client = client().await;
    ensure_example_sites(&client).await;
    let ns = namespace(&client, "domain-taken").await;
    let first = create_example(&client, &ns, "20-maildomain-standard.yaml").await;
    let name = first.name_any();
    wait_ready(&client, &ns, &name).await;
    let mut copy = first.clone();
    copy.metadata = kube::api::ObjectMeta {
        name: Some(format!("{name}-copy")),
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    copy.status = None;
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &copy)
        .await
        .expect("create the copy");
    let copy_name = copy.name_any();

    let refused = wait_for(
        &api,
        &copy_name,
        "Ready=False DomainConflict",
        has_condition("Ready", "False", Some("DomainConflict")),
    )
    .await;
    let message = condition(&refused, "Ready").message;
    assert!(
        message.contains(&format!("{ns}/{name}")) && message.contains(&first.spec.domain),
        "names the holder and the domain: {message}"
    );
    assert_eq!(
        child_counts(&client, &ns, &format!("{DOMAIN_LABEL}={copy_name}")).await,
        [0; 5],
        "nothing applied for the duplicate"
    );
    wait_ready(&client, &ns, &name).await;
    let routes = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("pec-platform-routes")
        .await
        .expect("the platform routes");
    let routes = routes
        .data
        .unwrap_or_default()
        .remove("routes.yaml")
        .unwrap_or_default();
    assert!(
        routes.contains(&format!("{}.{ns}.svc:25", first.name_any()))
            && !routes.contains(&copy_name),
        "the route stays with the first: {routes}"
    );

    api.delete(&name, &DeleteParams::default())
        .await
        .expect("delete the first");
    wait_ready(&client, &ns, &copy_name).await;
}
