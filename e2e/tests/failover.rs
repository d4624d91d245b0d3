//! Data-center failover on a real cluster. Each test makes its own two
//! sites on its own kwok nodes, so failing them disturbs no other test. A
//! failed data center is simulated as kubelets would see it: every node's
//! Ready condition goes False (kwok leaves nodes annotated
//! `kwok.x-k8s.io/status=custom` alone), and on recovery the test, playing
//! the kubelet, marks the node and its pods Ready again.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use pec_operator::{
    api::{FailoverMode, HealthSpec, MailDomain, Site, SitePhase},
    controllers::mail_domain::build::{SITE_LABEL, domain_service_name},
};
use serde_json::json;

use crate::{
    datacenter::{TestSites, endpoints_by_site},
    harness::{client, eventually, example, has_condition, namespace, scrape_all, wait_for},
};

/// What most failover and SLA tests start from: a client, a fresh
/// namespace, two sites on kwok nodes of their own, and a MailDomain served
/// from them (Ready, endpoints in every serving site).
pub struct World {
    pub client: Client,
    pub ns: String,
    pub sites: TestSites,
    pub md: String,
}

/// Builds a [`World`] for `test`; `prefix` names its sites and nodes.
pub async fn world(
    test: &str,
    prefix: &str,
    health: HealthSpec,
    mode: FailoverMode,
    stabilization: i32,
) -> World {
    let client = client().await;
    let ns = namespace(&client, test).await;
    let sites =
        TestSites::create(&client, &format!("{prefix}{}", std::process::id()), health).await;
    let md = create_domain(&client, &ns, &sites, mode, stabilization).await;
    World {
        client,
        ns,
        sites,
        md,
    }
}

pub async fn create_domain(
    client: &Client,
    ns: &str,
    sites: &TestSites,
    mode: FailoverMode,
    stabilization: i32,
) -> String {
    crate::harness::example_prerequisites(client, ns).await;
    let mut md: MailDomain = example("20-maildomain-standard.yaml");
    md.metadata.namespace = Some(ns.to_string());
    md.spec.sites = sites.names.to_vec();
    md.spec.failover.mode = mode;
    md.spec.failover.stabilization_seconds = stabilization;
    let api = Api::<MailDomain>::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &md)
        .await
        .expect("create MailDomain");
    let name = md.name_any();
    wait_for(
        &api,
        &name,
        "Ready=True",
        has_condition("Ready", "True", None),
    )
    .await;
    let expected: Vec<String> = match mode {
        FailoverMode::ActiveActive => sites.names.to_vec(),
        FailoverMode::ActivePassive => sites.names[..1].to_vec(),
    };
    let want = expected.clone();
    wait_for(
        &api,
        &name,
        "the serving sites",
        move |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .is_some_and(|s| s.serving_sites == want)
        },
    )
    .await;
    eventually("endpoints in every serving site", || async {
        let e = endpoints_by_site(client, ns, &name).await;
        (e.keys().cloned().collect::<Vec<_>>() == expected).then_some(())
    })
    .await;
    name
}

async fn pod_fingerprint(client: &Client, ns: &str) -> BTreeSet<(String, i32)> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list pods")
        .items
        .iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
            (p.uid().unwrap_or_default(), restarts)
        })
        .collect()
}

pub fn fast_health() -> HealthSpec {
    HealthSpec {
        period_seconds: 2,
        failure_threshold: 3,
        ..HealthSpec::default()
    }
}

#[tokio::test]
async fn a_failed_site_leaves_within_the_bound_and_rejoins_after_stabilization() {
    let stabilization = 12;
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-active-active",
        "aa",
        fast_health(),
        FailoverMode::ActiveActive,
        stabilization,
    )
    .await;
    let [a, b] = sites.names.clone();
    let both = eventually("endpoints in both sites", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        (e.len() == 2).then_some(e)
    })
    .await;
    assert_eq!(both.get(&a), Some(&2));
    let pods_before = pod_fingerprint(&client, &ns).await;
    // Both sites joined the new domain: each has served, and neither
    // joining was a switch.
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    let joined = wait_for(
        &api,
        &md,
        "both sites first served",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref()).is_some_and(|s| {
                s.sites.len() == 2 && s.sites.iter().all(|g| g.first_served_time.is_some())
            })
        },
    )
    .await;
    assert_eq!(
        joined.status.and_then(|s| s.last_failover),
        None,
        "a new domain's sites joining is no failover"
    );

    let failed_at = Instant::now();
    sites.fail(&a).await;
    let detected = eventually("site a to leave the domain Service", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        assert!(
            e.get(&b).is_some_and(|n| *n > 0),
            "site b lost its endpoints during the failover: {e:?}"
        );
        (!e.contains_key(&a)).then(|| failed_at.elapsed())
    })
    .await;
    let bound = Duration::from_secs(2 * 3 + 1);
    println!("detection to switch: {detected:?} (bound {bound:?})");
    assert!(
        detected <= bound + Duration::from_millis(300),
        "took {detected:?}, bound {bound:?}"
    );

    // The switch is counted right after the EndpointSlices are written, so
    // a scrape can fall between the two: wait for this domain's count (the
    // detection-to-switch histogram is shared with other tests' failovers).
    // The site leaves when it is declared down, or earlier if the node
    // controller marked its gateways unready first: both are the failure.
    let ours = |line: &&str| {
        line.starts_with("pec_failovers_total{")
            && line.contains(&format!("namespace=\"{ns}\""))
            && line.contains(&format!("maildomain=\"{md}\""))
            && ["SiteDown", "NoReadyGateway"]
                .iter()
                .any(|r| line.contains(&format!("reason=\"{r}\"")))
    };
    eventually("this domain's failover counted and timed", || async {
        let metrics = scrape_all().await;
        let timed = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("pec_failover_detection_to_switch_seconds_count "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>();
        (timed >= 1.0 && metrics.lines().any(|l| ours(&l))).then_some(())
    })
    .await;

    // Sites are cluster-scoped: their Events are in `default`.
    let site_event = |reason: &'static str, type_: &'static str| {
        let client = client.clone();
        let a = a.clone();
        async move {
            eventually(&format!("a {reason} Event for {a}"), || async {
                crate::harness::events_of(&client, "default", &a)
                    .await
                    .contains(&(type_.to_string(), reason.to_string()))
                    .then_some(())
            })
            .await
        }
    };
    site_event("SiteDown", "Warning").await;

    let recovered_at = Instant::now();
    sites.recover(&a).await;
    sites.wait_phase(&a, SitePhase::Serving).await;
    site_event("SiteRecovered", "Normal").await;
    let rejoined = eventually("site a to rejoin", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        assert!(
            e.get(&b).is_some_and(|n| *n > 0),
            "site b lost its endpoints: {e:?}"
        );
        e.contains_key(&a).then(|| recovered_at.elapsed())
    })
    .await;
    println!("rejoined after {rejoined:?} (stabilization {stabilization}s)");
    assert!(
        rejoined >= Duration::from_secs(stabilization.unsigned_abs().into()),
        "rejoined after {rejoined:?}"
    );

    assert_eq!(
        pod_fingerprint(&client, &ns).await,
        pods_before,
        "a switch restarted or replaced pods"
    );
    // Endpoints are applied before status is written: wait for the record.
    wait_for(
        &api,
        &md,
        "lastFailover SiteRejoined",
        |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.last_failover.as_ref())
                .is_some_and(|f| f.reason == "SiteRejoined")
        },
    )
    .await;
    sites.remove().await;
}

#[tokio::test]
async fn active_passive_serves_the_preferred_site_and_fails_back() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-active-passive",
        "ap",
        fast_health(),
        FailoverMode::ActivePassive,
        8,
    )
    .await;
    let [a, b] = sites.names.clone();
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    let serving_only = |site: String| {
        let client = client.clone();
        let ns = ns.clone();
        let md = md.clone();
        async move {
            eventually(&format!("only {site} serving"), || async {
                let e = endpoints_by_site(&client, &ns, &md).await;
                (e.keys().collect::<Vec<_>>() == [&site]).then_some(())
            })
            .await
        }
    };
    serving_only(a.clone()).await;
    let preferred = a.clone();
    wait_for(
        &api,
        &md,
        "the preferred site active",
        move |m: Option<&MailDomain>| {
            m.and_then(|m| m.status.as_ref())
                .and_then(|s| s.active_site.as_deref())
                == Some(preferred.as_str())
        },
    )
    .await;

    sites.fail(&a).await;
    serving_only(b.clone()).await;
    let back = Instant::now();
    sites.recover(&a).await;
    serving_only(a.clone()).await;
    assert!(
        back.elapsed() >= Duration::from_secs(8),
        "failed back before stabilization"
    );
    sites.remove().await;
}

#[tokio::test]
async fn a_flapping_site_is_fenced_until_a_person_clears_it() {
    let health = HealthSpec {
        fence_after_flaps: 2,
        ..fast_health()
    };
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-fencing",
        "fe",
        health,
        FailoverMode::ActiveActive,
        3,
    )
    .await;
    let [a, _] = sites.names.clone();

    sites.fail(&a).await;
    sites.wait_phase(&a, SitePhase::Down).await;
    sites.recover(&a).await;
    sites.wait_phase(&a, SitePhase::Serving).await;
    sites.fail(&a).await;
    let fenced = sites.wait_phase(&a, SitePhase::Fenced).await;
    assert!(fenced.spec.fenced, "the operator sets spec.fenced");
    eventually("a SiteFenced Event", || async {
        crate::harness::events_of(&client, "default", &a)
            .await
            .contains(&("Warning".to_string(), "SiteFenced".to_string()))
            .then_some(())
    })
    .await;
    eventually("the fenced site to leave the domain Service", || async {
        (!endpoints_by_site(&client, &ns, &md).await.contains_key(&a)).then_some(())
    })
    .await;
    sites.recover(&a).await;

    // Healthy again, yet it stays out: watch it for longer than the stabilization window.
    let watch_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < watch_until {
        let site = Api::<Site>::all(client.clone())
            .get(&a)
            .await
            .expect("site");
        assert_eq!(site.status.and_then(|s| s.phase), Some(SitePhase::Fenced));
        assert!(
            !endpoints_by_site(&client, &ns, &md).await.contains_key(&a),
            "a fenced site serves"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    Api::<Site>::all(client.clone())
        .patch(
            &a,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"fenced": false}})),
        )
        .await
        .expect("clear the fence");
    sites.wait_phase(&a, SitePhase::Serving).await;
    eventually("the cleared site to rejoin", || async {
        endpoints_by_site(&client, &ns, &md)
            .await
            .contains_key(&a)
            .then_some(())
    })
    .await;
    sites.remove().await;
}

#[tokio::test]
async fn with_every_site_down_the_domain_keeps_its_last_endpoints() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-no-healthy-site",
        "nh",
        fast_health(),
        FailoverMode::ActiveActive,
        5,
    )
    .await;
    let [a, b] = sites.names.clone();
    sites.fail(&a).await;
    eventually("site a to leave", || async {
        let e = endpoints_by_site(&client, &ns, &md).await;
        (!e.contains_key(&a)).then_some(())
    })
    .await;
    sites.fail(&b).await;
    let api = Api::<MailDomain>::namespaced(client.clone(), &ns);
    wait_for(
        &api,
        &md,
        "NoHealthySite",
        has_condition("NoHealthySite", "True", None),
    )
    .await;
    let e = endpoints_by_site(&client, &ns, &md).await;
    assert_eq!(
        e.get(&b),
        Some(&2),
        "the last serving endpoints were kept: {e:?}"
    );
    let gauge = format!("namespace=\"{ns}\"");
    eventually("pec_domain_no_healthy_site raised in /metrics", || async {
        let metrics = scrape_all().await;
        metrics
            .lines()
            .any(|l| {
                l.starts_with("pec_domain_no_healthy_site{")
                    && l.contains(&gauge)
                    && l.ends_with(" 1")
            })
            .then_some(())
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    eventually("a NoHealthySite warning", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("NoHealthySite")
                    && e.type_.as_deref() == Some("Warning")
            })
            .then_some(())
    })
    .await;
    sites.remove().await;
}

#[tokio::test]
async fn maintenance_drains_a_site_and_is_refused_when_it_would_strand_a_domain() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-maintenance",
        "mt",
        fast_health(),
        FailoverMode::ActiveActive,
        5,
    )
    .await;
    let [a, b] = sites.names.clone();
    eventually("both sites serving", || async {
        (endpoints_by_site(&client, &ns, &md).await.len() == 2).then_some(())
    })
    .await;
    let site_api = Api::<Site>::all(client.clone());
    let set = |site: String, patch: serde_json::Value| {
        let api = site_api.clone();
        async move {
            api.patch(&site, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .expect("patch site")
        }
    };

    set(a.clone(), json!({"spec": {"maintenance": true}})).await;
    sites.wait_phase(&a, SitePhase::Maintenance).await;
    eventually("site a drained", || async {
        (!endpoints_by_site(&client, &ns, &md).await.contains_key(&a)).then_some(())
    })
    .await;
    let running_in_a = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{SITE_LABEL}={a}")))
        .await
        .expect("pods")
        .items
        .len();
    assert_eq!(running_in_a, 2, "maintenance keeps the site's pods");

    set(b.clone(), json!({"spec": {"maintenance": true}})).await;
    let refused = wait_for(
        &site_api,
        &b,
        "MaintenanceRefused",
        has_condition("MaintenanceRefused", "True", None),
    )
    .await;
    assert_eq!(
        refused.status.and_then(|s| s.phase),
        Some(SitePhase::Serving),
        "refused maintenance changed nothing"
    );
    assert!(endpoints_by_site(&client, &ns, &md).await.contains_key(&b));

    set(a.clone(), json!({"spec": {"maintenance": false}})).await;
    sites.wait_phase(&a, SitePhase::Serving).await;
    sites.remove().await;
}

#[tokio::test]
async fn dns_endpoints_are_written_only_when_their_crd_exists() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{
        api::DynamicObject,
        core::{ApiResource, GroupVersionKind},
    };

    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "failover-dns",
        "dn",
        fast_health(),
        FailoverMode::ActiveActive,
        5,
    )
    .await;
    let [a, _] = sites.names.clone();

    // Absent CRD: the operator says so once and writes nothing.
    let logs = std::env::var("PEC_E2E_LOGS").expect("e2e/test.sh sets PEC_E2E_LOGS");
    let said: usize = ["operator-a.log", "operator-b.log"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{logs}/{f}")).unwrap_or_default())
        .map(|text| text.matches("DNSEndpoint CRD is not installed").count())
        .sum();
    assert_eq!(
        said, 1,
        "the absence of the DNSEndpoint CRD is said exactly once"
    );

    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "dnsendpoints.externaldns.k8s.io",
            "annotations": {"api-approved.kubernetes.io": "unapproved, a test CRD of external-dns's shape"},
        },
        "spec": {
            "group": "externaldns.k8s.io",
            "scope": "Namespaced",
            "names": {"kind": "DNSEndpoint", "plural": "dnsendpoints", "singular": "dnsendpoint", "listKind": "DNSEndpointList"},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                }}},
            }],
        },
    }))
    .expect("crd");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("install the DNSEndpoint CRD");
    wait_for(
        &crds,
        "dnsendpoints.externaldns.k8s.io",
        "Established",
        |c: Option<&CustomResourceDefinition>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "externaldns.k8s.io",
        "v1alpha1",
        "DNSEndpoint",
    ));
    let dns = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource);
    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    let mut touch = 0;
    let targets = |obj: &DynamicObject| obj.data["spec"]["endpoints"][0]["targets"].clone();
    let written = eventually("a DNSEndpoint for the domain", || {
        // Each touch is a change the operator reconciles; the CRD is seen within seconds.
        touch += 1;
        let (mds, dns, md) = (mds.clone(), dns.clone(), md.clone());
        async move {
            let patch = json!({"metadata": {"annotations": {"e2e/touch": touch.to_string()}}});
            mds.patch(&md, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .ok()?;
            dns.get_opt(&domain_service_name(&md)).await.ok().flatten()
        }
    })
    .await;
    assert_eq!(targets(&written), json!(["192.0.2.10", "192.0.2.11"]));
    assert_eq!(written.data["spec"]["endpoints"][0]["recordTTL"], json!(30));

    sites.fail(&a).await;
    eventually("the failed site's address to leave DNS", || async {
        let obj = dns.get(&domain_service_name(&md)).await.ok()?;
        (targets(&obj) == json!(["192.0.2.11"])).then_some(())
    })
    .await;
    sites.remove().await;
}
