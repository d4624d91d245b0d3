//! Handing messages to other providers over SMTP.
//!
//! A domain on this platform has a route in `gateway.yaml` (its incoming
//! point, the domain Service); any other domain goes through the smarthost.
//! With neither, the domain cannot be reached and the sender gets a
//! non-delivery notice. The client is lettre's, with STARTTLS whenever the
//! peer offers it and one pooled connection set per peer.

use std::{collections::HashMap, sync::Mutex, time::Duration};

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

/// Why a message could not be handed over.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    /// No route and no smarthost for the domain.
    #[error("no route to domain {0}")]
    NoRoute(String),
    /// Try again later (4xx, connection refused, timeout).
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// The peer refused for good (5xx) or the addresses are unusable.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// The SMTP client side of the gateway.
pub struct Relay {
    config: RelayConfig,
    helo: String,
    transports: Mutex<HashMap<String, AsyncSmtpTransport<Tokio1Executor>>>,
}

impl Relay {
    /// A relay that greets peers as `helo`.
    pub fn new(config: RelayConfig, helo: &str) -> Self {
        Self {
            config,
            helo: helo.to_string(),
            transports: Mutex::new(HashMap::new()),
        }
    }

    /// The `host:port` mail for `domain` goes to.
    pub fn route(&self, domain: &str) -> Option<&str> {
        self.config
            .routes
            .get(domain)
            .or(self.config.smarthost.as_ref())
            .map(String::as_str)
    }

    fn transport(&self, target: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, RelayError> {
        let mut transports = self.transports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = transports.get(target) {
            return Ok(t.clone());
        }
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| RelayError::Permanent(format!("route {target:?} is not host:port")))?;
        let tls = TlsParameters::builder(host.to_string())
            .dangerous_accept_invalid_certs(self.config.insecure_tls)
            .dangerous_accept_invalid_hostnames(self.config.insecure_tls)
            .build_rustls()
            .map_err(|e| RelayError::Permanent(format!("TLS settings for {host}: {e}")))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .tls(Tls::Opportunistic(tls))
            .hello_name(ClientId::Domain(self.helo.clone()))
            .timeout(Some(Duration::from_secs(60)))
            .pool_config(PoolConfig::new().max_size(8))
            .build();
        transports.insert(target.to_string(), transport.clone());
        Ok(transport)
    }

    /// Hands `message` from `from` to `to` (all in `domain`).
    pub async fn send(
        &self,
        domain: &str,
        from: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<(), RelayError> {
        let target = self
            .route(domain)
            .ok_or_else(|| RelayError::NoRoute(domain.to_string()))?
            .to_string();
        let transport = self.transport(&target)?;
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
        let mut result = transport.send_raw(&envelope, message).await;
        if let Err(e) = &result
            && !e.is_response()
        {
            // No SMTP reply at all: most likely a pooled connection the peer
            // closed (it restarted). Drop the pool and try once more on a
            // fresh connection before counting it as a failure.
            self.transports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&target);
            result = self.transport(&target)?.send_raw(&envelope, message).await;
        }
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(RelayError::Permanent(e.to_string())),
            Err(e) => Err(RelayError::Temporary(e.to_string())),
        }
    }
}
