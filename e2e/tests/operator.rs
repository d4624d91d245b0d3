//! The operator process as deployed: CRDs established, two replicas with one
//! leader, running under the chart's ServiceAccount with least privilege.

use k8s_openapi::{
    api::{
        authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
        coordination::v1::Lease,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, api::PostParams};

use crate::harness::{client, eventually, scrape};

const SERVICE_ACCOUNT: &str = "system:serviceaccount:pec-system:pec-operator";

#[tokio::test]
async fn crds_are_established() {
    let crds = Api::<CustomResourceDefinition>::all(client().await);
    for name in [
        "sites.pec.dev",
        "maildomains.pec.dev",
        "signingkeys.pec.dev",
        "slatargets.pec.dev",
    ] {
        let crd = crds.get(name).await.expect("CRD installed");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
}

#[tokio::test]
async fn exactly_one_of_two_replicas_leads() {
    let ports =
        std::env::var("PEC_E2E_METRICS_PORTS").expect("e2e/test.sh sets PEC_E2E_METRICS_PORTS");
    let ports: Vec<&str> = ports.split(',').collect();
    assert_eq!(ports.len(), 2, "two operator replicas");
    let mut leaders = 0;
    for port in &ports {
        let metrics = scrape(port).await;
        assert!(
            metrics.contains("pec_leader "),
            "replica on {port} serves metrics"
        );
        if metrics.lines().any(|l| l == "pec_leader 1") {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1, "exactly one leader");
    let leases = Api::<Lease>::namespaced(client().await, "pec-system");
    let holder = eventually("a lease holder", || async {
        leases.get("pec-operator").await.ok()?.spec?.holder_identity
    })
    .await;
    assert!(holder.starts_with("replica-"), "lease held by {holder}");
}

async fn allowed(
    verb: &str,
    group: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(SERVICE_ACCOUNT.into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:pec-system".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: subresource.map(Into::into),
                namespace: namespace.map(Into::into),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client().await)
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn the_operator_service_account_has_least_privilege() {
    let needed = [
        ("patch", "apps", "deployments", None, Some("any-ns")),
        (
            "delete",
            "networking.k8s.io",
            "networkpolicies",
            None,
            Some("any-ns"),
        ),
        ("watch", "", "nodes", None, None),
        (
            "patch",
            "pec.dev",
            "maildomains",
            Some("status"),
            Some("any-ns"),
        ),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            Some("pec-system"),
        ),
        ("create", "events.k8s.io", "events", None, Some("any-ns")),
        (
            "patch",
            "discovery.k8s.io",
            "endpointslices",
            None,
            Some("any-ns"),
        ),
        ("watch", "", "pods", None, Some("any-ns")),
        ("patch", "pec.dev", "sites", None, None),
        ("get", "", "secrets", None, Some("any-ns")),
        ("list", "", "secrets", None, Some("any-ns")),
        ("watch", "", "secrets", None, Some("any-ns")),
        ("get", "", "persistentvolumeclaims", None, Some("any-ns")),
        (
            "patch",
            "pec.dev",
            "signingkeys",
            Some("status"),
            Some("any-ns"),
        ),
        (
            "create",
            "cert-manager.io",
            "certificaterequests",
            None,
            Some("any-ns"),
        ),
    ];
    for (verb, group, resource, sub, ns) in needed {
        assert!(
            allowed(verb, group, resource, sub, ns).await,
            "needs {verb} {group}/{resource}"
        );
    }
    let forbidden = [
        ("create", "", "pods", None, Some("any-ns")),
        ("delete", "", "pods", None, Some("any-ns")),
        ("delete", "", "secrets", None, Some("any-ns")),
        ("list", "", "persistentvolumeclaims", None, Some("any-ns")),
        ("patch", "", "persistentvolumeclaims", None, Some("any-ns")),
        ("update", "pec.dev", "signingkeys", None, Some("any-ns")),
        ("delete", "", "nodes", None, None),
        ("update", "pec.dev", "maildomains", None, Some("any-ns")),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            None,
            Some("kube-system"),
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            None,
        ),
        ("delete", "", "namespaces", None, None),
    ];
    for (verb, group, resource, sub, ns) in forbidden {
        assert!(
            !allowed(verb, group, resource, sub, ns).await,
            "must not {verb} {group}/{resource}"
        );
    }
}
