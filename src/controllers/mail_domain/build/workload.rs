//! The gateway Deployment of one (domain, site) pair: pod template, probes,
//! security context, rollout strategy and resources.

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            Affinity, Capabilities, Container, ContainerPort, HTTPGetAction, LocalObjectReference,
            PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, SeccompProfile, SecurityContext, Sysctl,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::api::{GatewayPort, MailDomain};
use crate::controllers::mail_domain::{
    gateway::{self, GatewayDefaults, GatewaySigning, METRICS_PORT},
    observe::ResolvedSite,
};

use super::{CONFIG_HASH_ANNOTATION, short_hash};

/// Gateways run as this unprivileged user (restricted Pod Security): the
/// images' own user, the operator's too, so the files the operator writes
/// into a shared SoftHSM2 token directory are the gateways' as well.
pub(super) const GATEWAY_UID: i64 = 65_532;

pub(super) fn deployment(
    md: &MailDomain,
    signing: Option<&GatewaySigning>,
    defaults: &GatewayDefaults,
    site: &ResolvedSite,
    meta: ObjectMeta,
    selector: LabelSelector,
    config: &str,
) -> Deployment {
    let mut annotations = md.spec.gateway.pod_annotations.clone();
    annotations.insert(
        CONFIG_HASH_ANNOTATION.into(),
        short_hash(config.as_bytes(), 16),
    );
    let name = meta.name.clone().unwrap_or_default();
    let pod_labels = meta.labels.clone();
    let (volumes, volume_mounts, env) = gateway::volumes(md, signing, defaults, &name);
    let image = if md.spec.gateway.image.is_empty() {
        defaults.image.clone()
    } else {
        md.spec.gateway.image.clone()
    };
    let mut container_ports: Vec<ContainerPort> =
        md.spec.profile.ports().iter().map(container_port).collect();
    container_ports.push(ContainerPort {
        name: Some("metrics".into()),
        container_port: METRICS_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    Deployment {
        metadata: meta,
        spec: DeploymentSpec {
            replicas: Some(md.spec.gateway.replicas_per_site),
            selector: selector.clone(),
            strategy: Some(rollout(site.nodes, md.spec.gateway.replicas_per_site)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: pod_labels,
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some(site.node_selector.clone()),
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(PodAntiAffinity {
                            required_during_scheduling_ignored_during_execution: Some(vec![
                                PodAffinityTerm {
                                    label_selector: Some(selector),
                                    topology_key: "kubernetes.io/hostname".into(),
                                    ..PodAffinityTerm::default()
                                },
                            ]),
                            ..PodAntiAffinity::default()
                        }),
                        ..Affinity::default()
                    }),
                    image_pull_secrets: (!defaults.image_pull_secrets.is_empty()).then(|| {
                        defaults
                            .image_pull_secrets
                            .iter()
                            .map(|name| LocalObjectReference { name: name.clone() })
                            .collect()
                    }),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(GATEWAY_UID),
                        run_as_group: Some(GATEWAY_UID),
                        fs_group: Some(GATEWAY_UID),
                        // Ports 25 and 465 without root: a capability added to
                        // a non-root container is dropped at exec, so the pod
                        // lowers the privileged port range instead (a sysctl
                        // restricted Pod Security allows, scoped to the pod's
                        // network namespace).
                        sysctls: Some(vec![Sysctl {
                            name: "net.ipv4.ip_unprivileged_port_start".into(),
                            value: "0".into(),
                        }]),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "gateway".into(),
                        image: Some(image),
                        // The gateway binary serves only when told to; it
                        // reads gateway.yaml where the ConfigMap is mounted.
                        args: Some(vec!["serve".into()]),
                        ports: Some(container_ports),
                        env: Some(env),
                        resources: Some(
                            md.spec
                                .gateway
                                .resources
                                .clone()
                                .unwrap_or_else(default_resources),
                        ),
                        // Ready only with an HSM session, clamd answering and
                        // a writable store; alive while the process answers.
                        readiness_probe: Some(http_probe("/readyz", 5, 2)),
                        liveness_probe: Some(http_probe("/healthz", 10, 3)),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                add: None,
                            }),
                            ..SecurityContext::default()
                        }),
                        volume_mounts: Some(volume_mounts),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

pub(super) fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// How a site's gateways roll: never below full strength (a surge pod
/// first) when the site has a machine to spare (ready and not cordoned);
/// otherwise, since no two gateways share a machine, one pod at a time makes
/// room for its successor (it drains first; the site's other gateways and
/// the other sites carry the traffic). Surging without a spare machine would leave the new pod
/// Pending and the rollout stuck, with the old certificate in use.
pub fn rollout(nodes: i32, replicas: i32) -> DeploymentStrategy {
    let (surge, unavailable) = if nodes > replicas { (1, 0) } else { (0, 1) };
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(surge)),
            max_unavailable: Some(IntOrString::Int(unavailable)),
        }),
    }
}

pub(super) fn container_port(p: &GatewayPort) -> ContainerPort {
    ContainerPort {
        name: Some(p.name.into()),
        container_port: p.port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

pub(super) fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some([("cpu".into(), q("100m")), ("memory".into(), q("128Mi"))].into()),
        limits: Some([("cpu".into(), q("1")), ("memory".into(), q("512Mi"))].into()),
        ..ResourceRequirements::default()
    }
}
