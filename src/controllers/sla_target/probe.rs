//! Availability probes: pure reading of EndpointSlices (as the MailDomain
//! controller's cache keeps them), and real TCP/HTTP connections for the
//! `Tcp` and `Http` kinds.

use std::time::Duration;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::controllers::mail_domain::cached::{CachedSlice, Child};

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Whether the object was available.
    pub available: bool,
    /// Why not, when it was not.
    pub cause: &'static str,
}

impl Seen {
    pub(crate) fn up() -> Self {
        Self {
            available: true,
            cause: "",
        }
    }
    pub(crate) fn down(cause: &'static str) -> Self {
        Self {
            available: false,
            cause,
        }
    }
}

/// `Endpoints` probe: available when the domain Service (`service`) has a
/// ready endpoint in a serving site (in `site`, when measuring per site), and
/// the domain is not running on kept endpoints of sites that are all down
/// (`no_healthy_site`).
pub fn endpoints(
    slices: &[CachedSlice],
    service: &str,
    site: Option<&str>,
    no_healthy_site: bool,
) -> Seen {
    if no_healthy_site {
        return Seen::down("NoHealthySite");
    }
    let ready = slices
        .iter()
        .filter(|s| s.service() == Some(service))
        .filter(|s| site.is_none_or(|site| s.site() == Some(site)))
        .any(CachedSlice::ready);
    if ready {
        Seen::up()
    } else {
        Seen::down("NoReadyEndpoint")
    }
}

/// `Tcp` probe: a TCP connection to `addr` opens within `timeout`.
pub async fn tcp(addr: &str, timeout: Duration) -> Seen {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Seen::up(),
        Ok(Err(_)) => Seen::down("ConnectionRefused"),
        Err(_) => Seen::down("ConnectTimeout"),
    }
}

/// `Http` probe: a TCP connection to `addr` opens and accepts a request
/// within `timeout` (TLS is the gateway's concern; reaching it is ours).
pub async fn http(addr: &str, timeout: Duration) -> Seen {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"HEAD / HTTP/1.0\r\n\r\n").await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Seen::up(),
        Ok(Err(_)) => Seen::down("ConnectionRefused"),
        Err(_) => Seen::down("ConnectTimeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::names::SITE_LABEL;
    use k8s_openapi::{
        api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    fn slice(service: &str, site: &str, ready: &[bool]) -> CachedSlice {
        CachedSlice::from(EndpointSlice {
            metadata: ObjectMeta {
                labels: Some(
                    [
                        (
                            "kubernetes.io/service-name".to_string(),
                            service.to_string(),
                        ),
                        (SITE_LABEL.to_string(), site.to_string()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                ready
                    .iter()
                    .map(|r| Endpoint {
                        addresses: vec!["10.0.0.1".into()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*r),
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: None,
        })
    }

    #[test]
    fn available_with_a_ready_endpoint_of_the_domain_service() {
        let slices = [
            slice("acme", "dc-it1", &[false, true]),
            slice("other", "dc-it2", &[true]),
        ];
        assert!(endpoints(&slices, "acme", None, false).available);
        assert!(!endpoints(&slices, "acme", Some("dc-it2"), false).available);
        assert_eq!(
            endpoints(&slices, "acme", None, true).cause,
            "NoHealthySite"
        );
        assert_eq!(endpoints(&[], "acme", None, false).cause, "NoReadyEndpoint");
    }

    #[tokio::test]
    async fn tcp_probe_connects_for_real() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        assert!(tcp(&addr, Duration::from_secs(1)).await.available);
        assert!(http(&addr, Duration::from_secs(1)).await.available);
        drop(listener);
        assert!(!tcp(&addr, Duration::from_secs(1)).await.available);
    }
}
