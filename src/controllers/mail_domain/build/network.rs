//! The ports of the per-site Services, the domain Service and the
//! NetworkPolicy: only those a domain's profile needs.

use k8s_openapi::{
    api::{core::v1::ServicePort, networking::v1::NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::api::GatewayPort;
use crate::controllers::mail_domain::gateway::METRICS_PORT;

pub(super) fn service_port(p: &GatewayPort) -> ServicePort {
    ServicePort {
        name: Some(p.name.into()),
        port: p.port,
        target_port: Some(IntOrString::String(p.name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

pub(super) fn service_port_numbered(p: &GatewayPort) -> ServicePort {
    ServicePort {
        name: Some(p.name.into()),
        port: p.port,
        target_port: Some(IntOrString::Int(p.port)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

pub(super) fn policy_port(p: &GatewayPort) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(p.port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

pub(super) fn metrics_policy_port() -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(METRICS_PORT)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}
