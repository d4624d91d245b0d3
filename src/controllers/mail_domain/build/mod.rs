//! Pure builders of the objects a MailDomain owns in each of its sites.
//!
//! For every (domain, site) pair: a ConfigMap with the gateway configuration,
//! a Deployment, a Service, a PodDisruptionBudget and a NetworkPolicy. Names
//! are deterministic, every object carries the standard labels and a
//! controller owner reference, so the garbage collector removes them with the
//! MailDomain. `mod.rs` assembles them per site and builds the domain
//! Service and its EndpointSlices; `names` holds the names and labels,
//! `workload` the Deployment, `network` the ports of the Services and the
//! NetworkPolicy. The gateway's own configuration is built in `gateway`.

mod names;
mod network;
mod workload;

pub use names::*;
use network::{metrics_policy_port, policy_port, service_port, service_port_numbered};
use workload::deployment;
pub use workload::rollout;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, ObjectReference, Service, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
        networking::v1::{NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicySpec},
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};

use super::{
    gateway::{self, GatewayDefaults, GatewaySigning},
    observe::ResolvedSite,
};
use crate::{api::MailDomain, controllers::MANAGED_BY};

/// Everything one MailDomain owns.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The children of each present site, in `spec.sites` order.
    pub sites: Vec<SiteChildren>,
    /// The domain-level Service (no selector): its endpoints are the ready
    /// gateways of the serving sites only.
    pub domain_service: Service,
    /// One EndpointSlice of the domain Service per serving site; `None`
    /// leaves the existing slices as they are (no site can serve: never blackhole).
    pub endpoint_slices: Option<Vec<EndpointSlice>>,
}

/// A ready gateway pod, as an endpoint of the domain Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyGateway {
    /// The site the pod runs in.
    pub site: String,
    /// Pod name.
    pub pod: String,
    /// Pod IP.
    pub ip: String,
    /// The node it runs on.
    pub node: Option<String>,
}

/// The objects of one (domain, site) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteChildren {
    /// The site these objects serve.
    pub site: String,
    /// The gateway configuration.
    pub config_map: ConfigMap,
    /// The gateway pods.
    pub deployment: Deployment,
    /// The site's Service in front of the gateways.
    pub service: Service,
    /// Keeps all but one gateway available during voluntary disruption.
    pub pdb: PodDisruptionBudget,
    /// Admits ingress only on the profile's ports.
    pub network_policy: NetworkPolicy,
}

/// The label that says who manages an EndpointSlice: the EndpointSlice
/// controller leaves slices it does not manage alone.
const SLICE_MANAGER_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// The manager the operator's EndpointSlices name.
fn slice_manager() -> String {
    format!("{MANAGED_BY}.pec.dev")
}

/// The label selector of the EndpointSlices the operator made.
pub fn own_endpoint_slice_selector() -> String {
    format!("{SLICE_MANAGER_LABEL}={}", slice_manager())
}

/// All children of `md`: per-site objects for the present sites, and the
/// domain Service with one EndpointSlice per serving site listing its ready
/// gateways (`serving: None` keeps the slices there are).
pub fn children(
    md: &MailDomain,
    signing: Option<&GatewaySigning>,
    defaults: &GatewayDefaults,
    sites: &[ResolvedSite],
    serving: Option<&[String]>,
    gateways: &[ReadyGateway],
) -> Result<Children, serde_yaml::Error> {
    let per_site = sites
        .iter()
        .map(|site| site_children(md, signing, defaults, site))
        .collect::<Result<_, _>>()?;
    let md_name = md.name_any();
    let service_name = domain_service_name(&md_name);
    let ports = md.spec.profile.ports();
    let domain_service = Service {
        metadata: ObjectMeta {
            name: Some(service_name.clone()),
            namespace: md.namespace(),
            labels: Some(domain_labels(&md_name)),
            owner_references: owner(md).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            // No selector: the operator writes the endpoints, site by site.
            ports: Some(ports.iter().map(service_port_numbered).collect()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let endpoint_slices = serving.map(|serving| {
        serving
            .iter()
            .map(|site| {
                let mut labels = labels(&md_name, site);
                labels.insert("kubernetes.io/service-name".into(), service_name.clone());
                labels.insert(SLICE_MANAGER_LABEL.into(), slice_manager());
                EndpointSlice {
                    metadata: ObjectMeta {
                        name: Some(child_name(&md_name, site)),
                        namespace: md.namespace(),
                        labels: Some(labels),
                        owner_references: owner(md).map(|o| vec![o]),
                        ..ObjectMeta::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Some(
                        gateways
                            .iter()
                            .filter(|g| g.site == *site)
                            .map(|g| Endpoint {
                                addresses: vec![g.ip.clone()],
                                conditions: Some(EndpointConditions {
                                    ready: Some(true),
                                    serving: Some(true),
                                    terminating: Some(false),
                                }),
                                node_name: g.node.clone(),
                                target_ref: Some(ObjectReference {
                                    kind: Some("Pod".into()),
                                    name: Some(g.pod.clone()),
                                    namespace: md.namespace(),
                                    ..ObjectReference::default()
                                }),
                                ..Endpoint::default()
                            })
                            .collect(),
                    ),
                    ports: Some(
                        ports
                            .iter()
                            .map(|p| EndpointPort {
                                name: Some(p.name.into()),
                                port: Some(p.port),
                                protocol: Some("TCP".into()),
                                ..EndpointPort::default()
                            })
                            .collect(),
                    ),
                }
            })
            .collect()
    });
    Ok(Children {
        sites: per_site,
        domain_service,
        endpoint_slices,
    })
}

fn site_children(
    md: &MailDomain,
    signing: Option<&GatewaySigning>,
    defaults: &GatewayDefaults,
    site: &ResolvedSite,
) -> Result<SiteChildren, serde_yaml::Error> {
    let md_name = md.name_any();
    let name = child_name(&md_name, &site.name);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: md.namespace(),
        labels: Some(labels(&md_name, &site.name)),
        owner_references: owner(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let config =
        serde_yaml::to_string(&gateway::gateway_config(md, &site.name, signing, defaults))?;
    let mut data: BTreeMap<String, String> = [(CONFIG_KEY.to_string(), config.clone())].into();
    data.extend(gateway::softhsm_conf(defaults));
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&md_name, &site.name)),
        ..LabelSelector::default()
    };
    let ports = md.spec.profile.ports();
    Ok(SiteChildren {
        site: site.name.clone(),
        config_map: ConfigMap {
            metadata: meta.clone(),
            data: Some(data),
            ..ConfigMap::default()
        },
        deployment: deployment(
            md,
            signing,
            defaults,
            site,
            meta.clone(),
            selector.clone(),
            &config,
        ),
        service: Service {
            metadata: meta.clone(),
            spec: Some(ServiceSpec {
                selector: selector.match_labels.clone(),
                ports: Some(ports.iter().map(service_port).collect()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
        pdb: PodDisruptionBudget {
            metadata: meta.clone(),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(selector.clone()),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        },
        network_policy: NetworkPolicy {
            metadata: meta,
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    ports: Some(
                        ports
                            .iter()
                            .map(policy_port)
                            .chain([metrics_policy_port()])
                            .collect(),
                    ),
                    ..NetworkPolicyIngressRule::default()
                }]),
                ..NetworkPolicySpec::default()
            }),
        },
    })
}

fn owner(md: &MailDomain) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::{
        AntivirusSpec, FailoverSpec, GatewaySpec, MailDomainSpec, Profile, Site, SiteSpec,
    };
    use crate::controllers::mail_domain::gateway::METRICS_PORT;
    use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec};

    pub(crate) fn domain(sites: &[&str]) -> MailDomain {
        let mut md = MailDomain::new(
            "acme",
            MailDomainSpec {
                domain: "pec.acme.it".into(),
                profile: Profile::Standard,
                sites: sites.iter().map(|s| s.to_string()).collect(),
                gateway: GatewaySpec {
                    image: "registry.local/pec-gateway:1.0".into(),
                    replicas_per_site: 2,
                    resources: None,
                    pod_annotations: BTreeMap::new(),
                    tls_secret_ref: None,
                    mailboxes_secret_ref: None,
                    providers: Vec::new(),
                    relay: Default::default(),
                    storage_claim_name: None,
                },
                max_message_bytes: 104_857_600,
                antivirus: AntivirusSpec::default(),
                failover: FailoverSpec::default(),
                signing_key_ref: Some("acme-key".into()),
            },
        );
        md.metadata.namespace = Some("mail".into());
        md.metadata.uid = Some("0b7c-uid".into());
        md
    }

    pub(crate) fn site(name: &str) -> Site {
        Site::new(
            name,
            SiteSpec {
                node_selector: [("topology.kubernetes.io/zone".into(), name.into())].into(),
                ..SiteSpec::default()
            },
        )
    }

    fn resolved(name: &str) -> ResolvedSite {
        ResolvedSite {
            name: name.into(),
            node_selector: site(name).spec.node_selector,
            nodes: 3,
        }
    }

    fn build(md: &MailDomain) -> SiteChildren {
        children(
            md,
            None,
            &GatewayDefaults::default(),
            &[resolved("dc-it1")],
            Some(&[]),
            &[],
        )
        .expect("builds")
        .sites
        .remove(0)
    }

    fn gateway(site: &str, pod: &str, ip: &str) -> ReadyGateway {
        ReadyGateway {
            site: site.into(),
            pod: pod.into(),
            ip: ip.into(),
            node: Some(format!("{site}-node-1")),
        }
    }

    #[test]
    fn endpoint_slices_list_only_the_serving_sites_gateways() {
        let md = domain(&["dc-it1", "dc-it2"]);
        let gateways = [
            gateway("dc-it1", "p1", "10.0.0.1"),
            gateway("dc-it2", "p2", "10.0.0.2"),
            gateway("dc-it2", "p3", "10.0.0.3"),
        ];
        let sites = [resolved("dc-it1"), resolved("dc-it2")];
        let c = children(
            &md,
            None,
            &GatewayDefaults::default(),
            &sites,
            Some(&["dc-it2".to_string()]),
            &gateways,
        )
        .expect("builds");
        let slices = c.endpoint_slices.expect("slices");
        assert_eq!(slices.len(), 1);
        let ips: Vec<&str> = slices[0]
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.addresses[0].as_str())
            .collect();
        assert_eq!(ips, ["10.0.0.2", "10.0.0.3"]);
        let labels = slices[0].metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["kubernetes.io/service-name"], "acme");
        let (key, value) = own_endpoint_slice_selector()
            .split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .expect("key=value");
        assert_eq!(
            labels.get(&key),
            Some(&value),
            "the caches' watch of the operator's slices selects this one"
        );
        assert_ne!(
            value, "endpointslice-controller.k8s.io",
            "the EndpointSlice controller must leave it alone"
        );
        let svc = c.domain_service.spec.expect("spec");
        assert!(
            svc.selector.is_none(),
            "the domain Service must not select pods itself"
        );
    }

    #[test]
    fn gateway_pods_pull_with_the_platforms_secrets() {
        let md = domain(&["dc-it1"]);
        let pull_secrets = |defaults: &GatewayDefaults| {
            let c =
                children(&md, None, defaults, &[resolved("dc-it1")], None, &[]).expect("builds");
            c.sites[0]
                .deployment
                .spec
                .clone()
                .template
                .spec
                .and_then(|s| s.image_pull_secrets)
        };
        assert_eq!(pull_secrets(&GatewayDefaults::default()), None);
        let defaults = GatewayDefaults {
            image_pull_secrets: vec!["registry-credentials".into()],
            ..GatewayDefaults::default()
        };
        assert_eq!(
            pull_secrets(&defaults),
            Some(vec![LocalObjectReference {
                name: "registry-credentials".into()
            }])
        );
    }

    #[test]
    fn no_serving_plan_leaves_the_slices_alone() {
        let md = domain(&["dc-it1"]);
        let c = children(
            &md,
            None,
            &GatewayDefaults::default(),
            &[resolved("dc-it1")],
            None,
            &[],
        )
        .expect("builds");
        assert!(c.endpoint_slices.is_none());
    }

    fn pod_spec(c: &SiteChildren) -> PodSpec {
        c.deployment.spec.template.spec.clone().expect("pod spec")
    }

    fn policy_ports(c: &SiteChildren) -> Vec<i32> {
        let ingress = c
            .network_policy
            .spec
            .clone()
            .and_then(|s| s.ingress)
            .expect("ingress");
        ingress[0]
            .ports
            .clone()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| match p.port {
                Some(IntOrString::Int(n)) => Some(n),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_children_after_domain_and_site() {
        assert_eq!(child_name("acme", "dc-it1"), "acme-dc-it1");
    }

    #[test]
    fn shortens_long_names_to_a_dns_label_stably() {
        let long = "a".repeat(80);
        let name = child_name(&long, "dc-it1");
        assert!(name.len() <= 63, "{name}");
        assert_eq!(name, child_name(&long, "dc-it1"));
        assert_ne!(name, child_name(&long, "dc-it2"));
    }

    #[test]
    fn names_start_with_a_letter() {
        assert_eq!(child_name("1pec", "dc-it1"), "gw-1pec-dc-it1");
    }

    #[test]
    fn standard_profile_exposes_all_mailbox_ports() {
        assert_eq!(
            policy_ports(&build(&domain(&["dc-it1"]))),
            [25, 465, 993, 995, 443, METRICS_PORT],
            "the profile's ports and the metrics and probe port"
        );
    }

    #[test]
    fn receive_only_profile_exposes_only_reception_and_api() {
        let mut md = domain(&["dc-it1"]);
        md.spec.profile = Profile::ReceiveOnly;
        let c = build(&md);
        assert_eq!(policy_ports(&c), [25, 443, METRICS_PORT]);
        let service_ports: Vec<i32> = c
            .service
            .spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(service_ports, [25, 443]);
        let container_ports: Vec<i32> = pod_spec(&build(&md)).containers[0]
            .ports
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(container_ports, [25, 443, METRICS_PORT]);
    }

    #[test]
    fn the_gateway_container_serves_as_the_image_user() {
        let spec = pod_spec(&build(&domain(&["dc-it1"])));
        assert_eq!(spec.containers[0].args, Some(vec!["serve".to_string()]));
        let user = spec.security_context.and_then(|s| s.run_as_user);
        assert_eq!(
            user,
            Some(65_532),
            "the images' user, who owns the token files"
        );
    }

    #[test]
    fn pins_pods_to_the_site_and_spreads_them_over_machines() {
        let spec = pod_spec(&build(&domain(&["dc-it1"])));
        assert_eq!(spec.node_selector, Some(site("dc-it1").spec.node_selector));
        let terms = spec
            .affinity
            .and_then(|a| a.pod_anti_affinity)
            .and_then(|p| p.required_during_scheduling_ignored_during_execution)
            .expect("required anti-affinity");
        assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
    }

    #[test]
    fn pod_passes_restricted_pod_security() {
        let spec = pod_spec(&build(&domain(&["dc-it1"])));
        let pod = spec.security_context.expect("pod security context");
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_eq!(
            pod.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let c = spec.containers[0]
            .security_context
            .clone()
            .expect("container security context");
        assert_eq!(c.allow_privilege_escalation, Some(false));
        let caps = c.capabilities.expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(caps.add, None, "no capability is added");
        let sysctls = pod.sysctls.expect("sysctls");
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
    }

    #[test]
    fn config_change_changes_the_pod_template_hash() {
        let hash = |md: &MailDomain| {
            build(md)
                .deployment
                .spec
                .template
                .metadata
                .and_then(|m| m.annotations)
                .expect("annotations")[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        let md = domain(&["dc-it1"]);
        let mut smaller = md.clone();
        smaller.spec.max_message_bytes = 50_000_000;
        assert_eq!(hash(&md), hash(&md.clone()));
        assert_ne!(hash(&md), hash(&smaller));
    }

    #[test]
    fn config_carries_limits_antivirus_and_signing_key() {
        let config = gateway::gateway_config(
            &domain(&["dc-it1"]),
            "dc-it1",
            None,
            &GatewayDefaults::default(),
        );
        assert_eq!(config.max_message_bytes, 104_857_600);
        assert!(config.antivirus.enabled);
        assert_eq!(config.antivirus.quarantine_retention, "30mo");
        assert_eq!(config.signing_key_ref.as_deref(), Some("acme-key"));
        assert_eq!(
            config.protocols,
            ["smtp", "submissions", "imaps", "pop3s", "https"]
        );
    }

    #[test]
    fn children_are_owned_and_labelled() {
        let c = build(&domain(&["dc-it1"]));
        let owners = c
            .config_map
            .metadata
            .owner_references
            .clone()
            .expect("owner");
        assert_eq!(owners[0].kind, "MailDomain");
        assert_eq!(owners[0].controller, Some(true));
        let labels = c.service.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "pec-operator");
        assert_eq!(labels[SITE_LABEL], "dc-it1");
        assert_eq!(labels[DOMAIN_LABEL], "acme");
    }

    #[test]
    fn a_rollout_surges_only_when_the_site_has_a_machine_to_spare() {
        let step = |nodes| {
            let r = rollout(nodes, 2).rolling_update.expect("rolling update");
            (r.max_surge, r.max_unavailable)
        };
        assert_eq!(
            step(3),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        assert_eq!(
            step(2),
            (Some(IntOrString::Int(0)), Some(IntOrString::Int(1)))
        );
        assert_eq!(
            step(0),
            (Some(IntOrString::Int(0)), Some(IntOrString::Int(1)))
        );
    }

    #[test]
    fn pdb_keeps_all_but_one_gateway() {
        let pdb = build(&domain(&["dc-it1"])).pdb.spec.expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    }
}
