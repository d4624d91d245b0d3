//! SLA measurement on a real cluster: a domain taken fully down (both sites
//! in forced maintenance) is measured as one outage of that length, in
//! status, in /metrics and in `sla report`; bad specs are refused or reported.

use std::time::{Duration, Instant};

use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use pec_operator::api::{FailoverMode, MailDomain, SlaTarget, SlaTargetSpec};
use serde_json::json;

use crate::{
    datacenter::TestSites,
    failover::{World, fast_health, world},
    harness::{client, condition, has_condition, namespace, scrape_all, wait_for},
};

/// Creates an SlaTarget measuring `md` every second.
pub async fn measure(client: &Client, ns: &str, md: &str, extra: serde_json::Value) -> String {
    let mut spec = json!({
        "selector": {"names": [md]},
        "probe": {"intervalSeconds": 1},
        "statusIntervalSeconds": 1,
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let spec: SlaTargetSpec = serde_json::from_value(spec).expect("spec");
    let sla = SlaTarget::new("pec-sla", spec);
    Api::<SlaTarget>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sla)
        .await
        .expect("create SlaTarget");
    "pec-sla".to_string()
}

/// Takes every site of `sites` out (forced maintenance) or brings them back.
pub async fn set_down(client: &Client, sites: &TestSites, down: bool) {
    for site in &sites.names {
        let patch = json!({"spec": {"maintenance": down, "maintenanceForce": down}});
        Api::<pec_operator::api::Site>::all(client.clone())
            .patch(site, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("patch site");
    }
}

fn object_state(s: Option<&SlaTarget>) -> Option<&pec_operator::api::SlaObjectStatus> {
    s.and_then(|s| s.status.as_ref())
        .and_then(|st| st.objects.first())
}

#[tokio::test]
async fn a_fully_down_domain_is_measured_as_one_outage_of_its_length() {
    let World {
        client,
        ns,
        sites,
        md,
    } = world(
        "sla-outage",
        "so",
        fast_health(),
        FailoverMode::ActiveActive,
        1,
    )
    .await;
    let sla = measure(&client, &ns, &md, json!({})).await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    wait_for(
        &slas,
        &sla,
        "a first measurement",
        |s: Option<&SlaTarget>| {
            object_state(s).is_some_and(|o| o.state == "Met" && o.period.measured_seconds > 0.0)
        },
    )
    .await;

    let mds = Api::<MailDomain>::namespaced(client.clone(), &ns);
    set_down(&client, &sites, true).await;
    wait_for(
        &mds,
        &md,
        "NoHealthySite",
        has_condition("NoHealthySite", "True", None),
    )
    .await;
    let down_at = Instant::now();
    wait_for(
        &slas,
        &sla,
        "the outage in status",
        |s: Option<&SlaTarget>| object_state(s).is_some_and(|o| o.ongoing_outage.is_some()),
    )
    .await;
    // The outage being measured: hold the domain down a few seconds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    set_down(&client, &sites, false).await;
    wait_for(
        &mds,
        &md,
        "NoHealthySite cleared",
        has_condition("NoHealthySite", "False", None),
    )
    .await;
    let measured = down_at.elapsed().as_secs_f64();

    let done = wait_for(&slas, &sla, "the closed outage", |s: Option<&SlaTarget>| {
        object_state(s)
            .is_some_and(|o| o.ongoing_outage.is_none() && o.period.latest_outage.is_some())
    })
    .await;
    let object = object_state(Some(&done)).expect("object").clone();
    let outage = object.period.latest_outage.clone().expect("outage");
    println!(
        "outage: measured by the test {measured:.2}s, by the operator {:.2}s",
        outage.seconds
    );
    assert!(
        (outage.seconds - measured).abs() <= 1.5,
        "operator {:.2}s vs test {measured:.2}s",
        outage.seconds
    );
    assert_eq!(object.period.outages, 1);
    assert!(object.period.down_seconds >= outage.seconds - 1.0);
    assert_eq!(outage.cause, "NoHealthySite");

    let metrics = scrape_all().await;
    let series = metrics
        .lines()
        .find(|l| {
            l.starts_with("pec_sla_longest_outage_seconds{")
                && l.contains(&format!("namespace=\"{ns}\""))
        })
        .expect("pec_sla_longest_outage_seconds in /metrics");
    let value: f64 = series
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a value");
    assert!(
        (value - outage.seconds).abs() <= 1.5,
        "metrics say {value}, status {}",
        outage.seconds
    );

    let report = std::process::Command::new(env!("CARGO_BIN_EXE_pec-operator"))
        .args(["sla", "report", "-n", &ns])
        .output()
        .expect("run sla report");
    let text = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains(&md))
        .unwrap_or_else(|| panic!("no line for {md}: {text}"));
    let longest = format!("{:.0}s/", outage.seconds);
    assert!(
        line.contains(&longest),
        "report line {line:?} lacks the outage {longest}"
    );

    // The same report as a kubectl plugin: `kubectl pec`, the namespace
    // taken from the kubeconfig's context, YAML out.
    let dir = std::env::temp_dir().join(format!("pec-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("plugin dir");
    let plugin = dir.join("kubectl-pec");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_pec-operator"), &plugin).expect("link");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(
        std::env::var("KUBECONFIG").expect("e2e/test.sh sets KUBECONFIG"),
        &kubeconfig,
    )
    .expect("copy the kubeconfig");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl = |args: &[&str]| {
        std::process::Command::new("kubectl")
            .args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("kubectl runs")
    };
    let set = kubectl(&["config", "set-context", "--current", "--namespace", &ns]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let report = kubectl(&["pec", "sla", "report", "-o", "yaml"]);
    assert!(
        report.status.success(),
        "kubectl pec: {}",
        String::from_utf8_lossy(&report.stderr)
    );
    let yaml: serde_yaml::Value =
        serde_yaml::from_slice(&report.stdout).expect("kubectl pec -o yaml is YAML");
    let text = serde_yaml::to_string(&yaml).expect("yaml");
    assert!(
        text.contains(&md) && text.contains(&ns),
        "the context's namespace was not reported: {text}"
    );
    sites.remove().await;
}

#[tokio::test]
async fn the_published_targets_are_accepted_and_their_inconsistency_reported() {
    let client = client().await;
    let ns = namespace(&client, "sla-targets").await;
    let sla = measure(&client, &ns, "nothing-yet", json!({})).await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    let s = wait_for(
        &slas,
        &sla,
        "TargetsInconsistent",
        has_condition("TargetsInconsistent", "True", None),
    )
    .await;
    let c = condition(&s, "TargetsInconsistent");
    assert!(c.message.contains("rto 4h"), "{}", c.message);
    wait_for(
        &slas,
        &sla,
        "the missing domain reported",
        has_condition("Ready", "False", Some("MailDomainNotFound")),
    )
    .await;
}

#[tokio::test]
async fn bad_sla_specs_are_refused_or_reported() {
    let client = client().await;
    let ns = namespace(&client, "sla-invalid").await;
    let slas = Api::<SlaTarget>::namespaced(client.clone(), &ns);
    for (extra, field) in [
        (json!({"objective": 100.0}), "spec.objective"),
        (
            json!({"singleOutageBudgetFraction": 0.0}),
            "spec.singleOutageBudgetFraction",
        ),
        (json!({"rto": "4 hours"}), "spec.rto"),
        (json!({"period": "Year"}), "spec.period"),
        (
            json!({"probe": {"kind": "PecRoundTrip"}}),
            "needs probe.pecRoundTrip",
        ),
        (
            json!({"probe": {"kind": "PecRoundTrip", "pecRoundTrip": {
                "mailbox": "Probe@x", "passwordSecretRef": {"name": "p"}}}}),
            "spec.probe.pecRoundTrip.mailbox",
        ),
        (
            json!({"selector": {"names": ["x"], "scope": "Site"},
                "probe": {"kind": "PecRoundTrip", "pecRoundTrip": {"passwordSecretRef": {"name": "p"}}}}),
            "use selector.scope Domain",
        ),
        (
            json!({"selector": {"names": ["x", "y"]},
                "probe": {"kind": "PecRoundTrip", "pecRoundTrip": {
                    "passwordSecretRef": {"name": "p"}, "submissionAddress": "10.0.0.1:465"}}}),
            "select exactly one domain",
        ),
    ] {
        let mut spec = json!({"selector": {"names": ["x"]}});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        let obj = json!({"apiVersion": "pec.dev/v1alpha1", "kind": "SlaTarget", "metadata": {"name": "bad"}, "spec": spec});
        let dynamic: kube::api::DynamicObject = serde_json::from_value(obj).expect("object");
        let ar = kube::core::ApiResource::erase::<SlaTarget>(&());
        let err = Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
            .create(&PostParams::default(), &dynamic)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    measure(&client, &ns, "x", json!({"timeZone": "Europe/Atlantis"})).await;
    let s = wait_for(
        &slas,
        "pec-sla",
        "InvalidSpec",
        has_condition("Ready", "False", Some("InvalidSpec")),
    )
    .await;
    let c = condition(&s, "Ready");
    assert!(c.message.contains("Europe/Atlantis"), "{}", c.message);
}
