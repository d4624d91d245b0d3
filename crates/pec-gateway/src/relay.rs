//! Handing messages to other providers over SMTP.
//!
//! Where mail for a domain goes, in order (as Postfix does with its
//! transport map, `relayhost` and DNS):
//! 1. a domain on this platform has a route in `gateway.yaml` (its incoming
//!    point, the domain Service);
//! 2. else the smarthost, when one is configured;
//! 3. else the domain's MX hosts (RFC 5321 section 5.1): lowest preference
//!    first, the domain itself when it has no MX record (the implicit MX),
//!    no delivery at all for a null MX (RFC 7505) or a domain that does not
//!    exist. Each host's addresses are tried in turn until one answers.
//!
//! A DNS failure, or every host refusing for now, is temporary (the queue
//! retries); a null MX, a missing domain or a 5xx reply is permanent (the
//! sender gets a non-delivery notice). The client is lettre's, with STARTTLS
//! whenever the peer offers it and one pooled connection set per peer.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Mutex, RwLock},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::RData,
};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Tokio1Executor,
    address::Envelope,
    transport::smtp::{
        PoolConfig,
        client::{Tls, TlsParameters},
        extension::ClientId,
    },
};
use pec_core::config::RelayConfig;

/// At most this many addresses are tried for one message (Postfix's
/// `smtp_mx_address_limit`).
const MAX_ADDRESSES: usize = 5;

/// Why a message could not be handed over.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    /// The domain takes no mail: a null MX, or it does not exist.
    #[error("no route to domain {0}")]
    NoRoute(String),
    /// Try again later (4xx, connection refused, timeout, DNS failure).
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// The peer refused for good (5xx) or the addresses are unusable.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// One place to try: the address to connect to and the name its TLS
/// certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// `host:port` or `ip:port`.
    pub connect: String,
    /// The host name for TLS.
    pub name: String,
    /// Whether the peer's certificate is checked when it offers STARTTLS.
    /// Not for a domain of the platform reached through its Service: that is
    /// a cluster-internal name no certificate carries, and what either side
    /// sends is trusted by its S/MIME signature, not by the channel.
    pub verify: bool,
}

impl Hop {
    /// The key of this hop's connection pool.
    fn pool_key(&self) -> String {
        format!("{}|{}|{}", self.connect, self.name, self.verify)
    }
}

/// The SMTP client side of the gateway.
pub struct Relay {
    config: RelayConfig,
    /// The routes of `config.routes_file`, as last read.
    file_routes: RwLock<BTreeMap<String, String>>,
    helo: String,
    resolver: Result<TokioResolver, String>,
    transports: Mutex<HashMap<String, AsyncSmtpTransport<Tokio1Executor>>>,
}

impl Relay {
    /// A relay that greets peers as `helo`.
    pub fn new(config: RelayConfig, helo: &str) -> Self {
        let resolver = resolver(&config.nameservers);
        if let Err(e) = &resolver {
            tracing::warn!(error = %e, "no DNS resolver: mail for domains without a route waits in the queue");
        }
        let relay = Self {
            config,
            file_routes: RwLock::new(BTreeMap::new()),
            helo: helo.to_string(),
            resolver,
            transports: Mutex::new(HashMap::new()),
        };
        relay.reload_routes();
        relay
    }

    /// Reads the routes file again; keeps the routes it had when the file
    /// cannot be read or parsed (a ConfigMap volume being swapped, a typo),
    /// and says so. Returns how many routes the file holds.
    pub fn reload_routes(&self) -> usize {
        let Some(path) = &self.config.routes_file else {
            return 0;
        };
        let read = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                if text.trim().is_empty() {
                    return Ok(BTreeMap::new());
                }
                serde_yaml::from_str::<BTreeMap<String, String>>(&text).map_err(|e| e.to_string())
            });
        let mut routes = self.file_routes.write().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(new) => {
                if *routes != new {
                    tracing::info!(routes = new.len(), file = %path.display(), "platform routes changed");
                    *routes = new;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "the routes file could not be read; keeping the routes it had")
            }
        }
        routes.len()
    }

    /// The configured `host:port` mail for `domain` goes to (route or
    /// smarthost), if any.
    fn configured(&self, domain: &str) -> Option<Hop> {
        let from_file = self
            .file_routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(domain)
            .cloned();
        let (target, verify) = match (self.config.routes.get(domain), from_file) {
            (Some(route), _) => (route.clone(), true),
            (None, Some(platform)) => (platform, false),
            (None, None) => (self.config.smarthost.clone()?, true),
        };
        let name = target
            .rsplit_once(':')
            .map_or(target.as_str(), |(host, _)| host);
        Some(Hop {
            connect: target.clone(),
            name: name.to_string(),
            verify,
        })
    }

    /// Where mail for `domain` goes, in the order to try.
    pub async fn hops(&self, domain: &str) -> Result<Vec<Hop>, RelayError> {
        if let Some(hop) = self.configured(domain) {
            return Ok(vec![hop]);
        }
        let resolver = self
            .resolver
            .as_ref()
            .map_err(|e| RelayError::Temporary(format!("no DNS resolver: {e}")))?;
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let hosts = match resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                mx.sort();
                exchanges(domain, mx)?
            }
            Err(e) if e.is_nx_domain() => {
                return Err(RelayError::NoRoute(format!(
                    "{domain} (the domain does not exist)"
                )));
            }
            Err(e) if e.is_no_records_found() => vec![domain.to_string()],
            Err(e) => {
                return Err(RelayError::Temporary(format!(
                    "MX lookup for {domain}: {e}"
                )));
            }
        };
        let mut hops = Vec::new();
        let mut last_error = None;
        for host in hosts {
            match resolver.lookup_ip(format!("{host}.").as_str()).await {
                Ok(ips) => hops.extend(ips.iter().map(|ip| Hop {
                    connect: SocketAddr::new(ip, self.config.mx_port).to_string(),
                    name: host.clone(),
                    verify: true,
                })),
                Err(e) => last_error = Some(format!("addresses of {host}: {e}")),
            }
            if hops.len() >= MAX_ADDRESSES {
                break;
            }
        }
        hops.truncate(MAX_ADDRESSES);
        if hops.is_empty() {
            return Err(RelayError::Temporary(last_error.unwrap_or_else(|| {
                format!("no address for the mail hosts of {domain}")
            })));
        }
        Ok(hops)
    }

    fn transport(&self, hop: &Hop) -> Result<AsyncSmtpTransport<Tokio1Executor>, RelayError> {
        let key = hop.pool_key();
        let mut transports = self.transports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = transports.get(&key) {
            return Ok(t.clone());
        }
        let (host, port) = hop
            .connect
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                RelayError::Permanent(format!("route {:?} is not host:port", hop.connect))
            })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let check = hop.verify && !self.config.insecure_tls;
        let tls = TlsParameters::builder(hop.name.clone())
            .dangerous_accept_invalid_certs(!check)
            .dangerous_accept_invalid_hostnames(!check)
            .build_rustls()
            .map_err(|e| RelayError::Permanent(format!("TLS settings for {}: {e}", hop.name)))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(Tls::Opportunistic(tls))
            .hello_name(ClientId::Domain(self.helo.clone()))
            .timeout(Some(Duration::from_secs(60)))
            .pool_config(PoolConfig::new().max_size(8))
            .build();
        transports.insert(key, transport.clone());
        Ok(transport)
    }

    /// Hands `message` from `from` to `to` (all in `domain`), trying each
    /// hop in turn while the failure is temporary.
    pub async fn send(
        &self,
        domain: &str,
        from: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<(), RelayError> {
        let from = from
            .parse()
            .map_err(|e| RelayError::Permanent(format!("sender {from:?}: {e}")))?;
        let to = to
            .iter()
            .map(|t| {
                t.parse()
                    .map_err(|e| RelayError::Permanent(format!("recipient {t:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let envelope =
            Envelope::new(Some(from), to).map_err(|e| RelayError::Permanent(e.to_string()))?;
        let mut result = Err(RelayError::NoRoute(domain.to_string()));
        for hop in self.hops(domain).await? {
            result = self.send_to(&hop, &envelope, message).await;
            if !matches!(result, Err(RelayError::Temporary(_))) {
                break;
            }
        }
        result
    }

    async fn send_to(
        &self,
        hop: &Hop,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<(), RelayError> {
        let mut result = self.transport(hop)?.send_raw(envelope, message).await;
        if let Err(e) = &result
            && !e.is_response()
        {
            // No SMTP reply at all: most likely a pooled connection the peer
            // closed (it restarted). Drop the pool and try once more on a
            // fresh connection before counting it as a failure.
            self.transports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&hop.pool_key());
            result = self.transport(hop)?.send_raw(envelope, message).await;
        }
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(RelayError::Permanent(e.to_string())),
            Err(e) => Err(RelayError::Temporary(format!("{}: {e}", hop.name))),
        }
    }
}

/// The mail hosts of `domain` from its MX records (sorted by preference):
/// the domain itself when there are none, `NoRoute` for a null MX.
fn exchanges(domain: &str, mx: Vec<(u16, String)>) -> Result<Vec<String>, RelayError> {
    if mx.is_empty() {
        return Ok(vec![domain.to_string()]);
    }
    let hosts: Vec<String> = mx
        .into_iter()
        .map(|(_, host)| host.trim_end_matches('.').to_string())
        .collect();
    if hosts.iter().all(String::is_empty) {
        return Err(RelayError::NoRoute(format!(
            "{domain} (it publishes a null MX: it accepts no mail)"
        )));
    }
    Ok(hosts.into_iter().filter(|h| !h.is_empty()).collect())
}

/// A resolver for `nameservers` (`ip` or `ip:port`), or the system's.
fn resolver(nameservers: &[String]) -> Result<TokioResolver, String> {
    if nameservers.is_empty() {
        return TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| e.to_string());
    }
    let mut servers = Vec::with_capacity(nameservers.len());
    for entry in nameservers {
        let address = entry
            .parse::<SocketAddr>()
            .or_else(|_| entry.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| format!("name server {entry:?} is not ip or ip:port"))?;
        let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()].map(|mut c| {
            c.port = address.port();
            c
        });
        servers.push(NameServerConfig::new(
            address.ip(),
            true,
            connections.into(),
        ));
    }
    TokioResolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], servers),
        TokioRuntimeProvider::default(),
    )
    .build()
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_hosts_follow_preference_and_the_rfc_fallbacks() {
        let hosts = exchanges(
            "b.it",
            vec![(10, "mx1.b.it.".into()), (20, "mx2.b.it.".into())],
        )
        .expect("hosts");
        assert_eq!(hosts, ["mx1.b.it", "mx2.b.it"]);
        assert_eq!(exchanges("b.it", vec![]).expect("implicit"), ["b.it"]);
        assert!(matches!(
            exchanges("b.it", vec![(0, ".".into())]),
            Err(RelayError::NoRoute(_))
        ));
    }

    #[test]
    fn a_route_or_the_smarthost_wins_over_dns() {
        let config = RelayConfig {
            routes: [("a.it".to_string(), "gw-a:25".to_string())].into(),
            smarthost: Some("smart:2525".into()),
            ..RelayConfig::default()
        };
        let relay = Relay::new(config, "me.it");
        assert_eq!(
            relay.configured("a.it"),
            Some(Hop {
                connect: "gw-a:25".into(),
                name: "gw-a".into(),
                verify: true,
            })
        );
        assert_eq!(
            relay.configured("z.it").map(|h| h.name),
            Some("smart".into())
        );
    }

    #[test]
    fn routes_from_the_file_follow_its_changes_and_yield_to_configured_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("routes.yaml");
        std::fs::write(&file, "b.it: gw-b.ns.svc:25\na.it: elsewhere:25\n").expect("write");
        let config = RelayConfig {
            routes: [("a.it".to_string(), "gw-a:25".to_string())].into(),
            routes_file: Some(file.clone()),
            ..RelayConfig::default()
        };
        let relay = Relay::new(config, "me.it");
        let target = |d: &str| relay.configured(d).map(|h| h.connect);
        assert_eq!(target("b.it").as_deref(), Some("gw-b.ns.svc:25"));
        assert_eq!(relay.configured("b.it").map(|h| h.verify), Some(false));
        assert_eq!(target("a.it").as_deref(), Some("gw-a:25"));
        assert_eq!(target("c.it"), None);

        std::fs::write(&file, "c.it: gw-c.ns.svc:25\n").expect("rewrite");
        assert_eq!(relay.reload_routes(), 1);
        assert_eq!(target("c.it").as_deref(), Some("gw-c.ns.svc:25"));
        assert_eq!(target("b.it"), None);

        // A file that does not parse keeps what was read last.
        std::fs::write(&file, "c.it: [not, a, route").expect("break");
        assert_eq!(relay.reload_routes(), 1);
        assert_eq!(target("c.it").as_deref(), Some("gw-c.ns.svc:25"));
        std::fs::write(&file, "").expect("empty");
        assert_eq!(relay.reload_routes(), 0);
    }

    #[test]
    fn name_servers_must_be_addresses() {
        assert!(resolver(&["127.0.0.1:5353".into(), "::1".into()]).is_ok());
        let Err(err) = resolver(&["dns.example".into()]) else {
            panic!("a host name was taken for a name server address");
        };
        assert!(err.contains("dns.example"), "{err}");
    }
}
