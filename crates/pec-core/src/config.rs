//! `gateway.yaml`: what the operator tells a gateway, and the only thing a
//! gateway reads at start-up besides the files it names (PIN, certificates,
//! TLS key, mailbox credentials).
//!
//! The operator builds a [`GatewayConfig`] per MailDomain and site and
//! renders it into the gateway's ConfigMap; the gateway parses the same type,
//! so the two cannot drift apart. Paths default to where the operator mounts
//! things in the gateway pod; a gateway run by hand (tests, a developer)
//! names its own.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The name of the file in the gateway's ConfigMap.
pub const FILE_NAME: &str = "gateway.yaml";

/// The gateway configuration of one MailDomain in one site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// The PEC domain.
    pub domain: String,
    /// The profile: a `ReceiveOnly` domain has no access point.
    pub profile: Profile,
    /// The site this gateway runs in.
    pub site: String,
    /// Maximum message size in bytes, size x recipients.
    pub max_message_bytes: i64,
    /// Most recipients one message may have.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Antivirus, always on.
    pub antivirus: AntivirusConfig,
    /// Enabled protocols, by port name (`smtp`, `submissions`, ...).
    pub protocols: Vec<String>,
    /// The SigningKey that signs receipts and envelopes, if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_ref: Option<String>,
    /// Its active generation, once it has one: changing generation changes
    /// the configuration hash, so the gateways roll to the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningConfig>,
    /// The PKCS#11 module and where its PIN is.
    #[serde(default)]
    pub hsm: HsmConfig,
    /// Where the gateway listens.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Where the gateway keeps mail, queue, quarantine and the legal log.
    #[serde(default)]
    pub paths: PathsConfig,
    /// Certificate and key for STARTTLS on port 25 and implicit TLS on 465.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Where mail for other domains goes.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Timeouts and limits of the SMTP dialogue.
    #[serde(default)]
    pub smtp: SmtpLimits,
}

/// The domain profile.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Profile {
    /// Mailboxes that send and receive: the access point listens on 465.
    Standard,
    /// PEC d'ufficio: receive only, no access point.
    ReceiveOnly,
}

/// Antivirus settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AntivirusConfig {
    /// Always on.
    pub enabled: bool,
    /// Infected messages are never delivered.
    pub infected_action: String,
    /// How long quarantined messages are kept.
    pub quarantine_retention: String,
    /// The clamd to ask: `tcp:HOST:PORT` or `unix:PATH`.
    #[serde(default = "default_clamd")]
    pub clamd: String,
}

/// The active key and certificate the gateways sign with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningConfig {
    /// The SigningKey.
    pub key: String,
    /// The PKCS#11 token holding it (by label).
    pub token_label: String,
    /// The key's `CKA_ID`, hex.
    pub key_id: String,
    /// The generation.
    pub generation: i64,
    /// The Secret with the published certificates.
    pub certificate_secret: String,
    /// The key of this generation's certificate in that Secret (the file
    /// name under [`PathsConfig::certificates`]).
    pub certificate_key: String,
    /// SHA-256 of the certificate, hex: the gateway refuses to sign with a
    /// certificate file that does not match.
    pub certificate_sha256: String,
}

/// The PKCS#11 module and PIN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HsmConfig {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// A file holding the token's user PIN (the mounted Secret).
    pub pin_file: PathBuf,
}

impl Default for HsmConfig {
    fn default() -> Self {
        Self {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            pin_file: "/etc/pec/hsm/pin".into(),
        }
    }
}

/// Listening addresses. Ports not enabled by the profile are never opened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// SMTP reception from other providers (incoming point).
    pub smtp: String,
    /// Submission over implicit TLS (access point; Standard only).
    pub submissions: String,
    /// `/healthz`, `/readyz` and `/metrics`.
    pub http: String,
    /// The message API over TLS (the `https` protocol), where mailbox
    /// owners read their mail.
    #[serde(default = "default_https")]
    pub https: String,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            smtp: "0.0.0.0:25".into(),
            submissions: "0.0.0.0:465".into(),
            http: "0.0.0.0:8080".into(),
            https: default_https(),
        }
    }
}

fn default_https() -> String {
    "0.0.0.0:443".into()
}

/// Files and directories.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathsConfig {
    /// Mailboxes, one Maildir per mailbox.
    pub mailboxes: PathBuf,
    /// The outbound queue and the spool of accepted messages.
    pub queue: PathBuf,
    /// Infected messages, kept.
    pub quarantine: PathBuf,
    /// The legal log.
    pub log: PathBuf,
    /// The published certificates of the signing key (`g<N>.crt`).
    pub certificates: PathBuf,
    /// Trusted provider certificates, PEM files: the providers' index.
    pub providers: Vec<PathBuf>,
    /// Mailbox credentials: one `local-part:PHC hash` line per mailbox.
    pub credentials: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            mailboxes: "/var/lib/pec/mailboxes".into(),
            queue: "/var/lib/pec/queue".into(),
            quarantine: "/var/lib/pec/quarantine".into(),
            log: "/var/lib/pec/log".into(),
            certificates: "/etc/pec/certificates".into(),
            providers: vec!["/etc/pec/providers".into()],
            credentials: "/etc/pec/credentials/mailboxes".into(),
        }
    }
}

/// A TLS certificate chain and key, PEM files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain.
    pub cert_file: PathBuf,
    /// The private key.
    pub key_file: PathBuf,
}

/// Where mail leaves for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Domains on this platform and the `host:port` of their incoming point
    /// (the domain Service): mail for them goes straight there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, String>,
    /// A YAML file of more routes (`domain: host:port`), read at start and
    /// again every few seconds, so domains can join without a restart: the
    /// operator keeps every domain of the namespace there. `routes` wins
    /// over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_file: Option<PathBuf>,
    /// Every other domain goes through this `host:port`. Without one, mail
    /// for other domains goes where their MX records say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<String>,
    /// Name servers for MX lookups, `ip` or `ip:port`; empty (the default):
    /// the system's (`/etc/resolv.conf`, the cluster DNS in a pod).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// The port MX hosts are reached on: 25, unless a test bed says otherwise.
    #[serde(
        default = "default_mx_port",
        skip_serializing_if = "is_default_mx_port"
    )]
    pub mx_port: u16,
    /// Accept the relay peer's TLS certificate without checking it (tests).
    #[serde(default)]
    pub insecure_tls: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            routes: BTreeMap::new(),
            routes_file: None,
            smarthost: None,
            nameservers: Vec::new(),
            mx_port: default_mx_port(),
            insecure_tls: false,
        }
    }
}

fn default_shutdown_delay() -> u64 {
    5
}

fn default_mx_port() -> u16 {
    25
}

fn is_default_mx_port(port: &u16) -> bool {
    *port == default_mx_port()
}

/// Limits of the SMTP dialogue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmtpLimits {
    /// Seconds a client may stay silent before the gateway hangs up.
    pub idle_timeout_seconds: u64,
    /// Seconds a whole DATA transfer may take.
    pub data_timeout_seconds: u64,
    /// Failed AUTH attempts per client address before it must wait.
    pub auth_failures_allowed: u32,
    /// Seconds a client that failed too often waits.
    pub auth_lockout_seconds: u64,
    /// Seconds after SIGTERM that sessions in flight may take to finish.
    pub shutdown_grace_seconds: u64,
    /// Seconds after SIGTERM during which the gateway, already not ready,
    /// still takes new sessions: the time its endpoint takes to leave every
    /// node's Service rules, so a rolling update refuses no connection.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay_seconds: u64,
    /// Seconds without a taking-charge or delivery receipt before the
    /// sender is warned (preavviso). Default 43200 (12 hours, the rule).
    pub warn_after_seconds: u64,
    /// Seconds before the relay gives up and sends the final notice.
    /// Default 86400 (24 hours, the rule).
    pub give_up_after_seconds: u64,
}

impl Default for SmtpLimits {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: 300,
            data_timeout_seconds: 600,
            auth_failures_allowed: 5,
            auth_lockout_seconds: 60,
            shutdown_grace_seconds: 50,
            shutdown_delay_seconds: default_shutdown_delay(),
            warn_after_seconds: 12 * 3600,
            give_up_after_seconds: 24 * 3600,
        }
    }
}

fn default_max_recipients() -> usize {
    100
}

fn default_clamd() -> String {
    "tcp:127.0.0.1:3310".into()
}

impl GatewayConfig {
    /// Parses `gateway.yaml`, naming what is wrong.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let config: Self = serde_yaml::from_str(text).map_err(|e| format!("gateway.yaml: {e}"))?;
        config.check()?;
        Ok(config)
    }

    /// Whether the access point (465) runs.
    pub fn has_access_point(&self) -> bool {
        self.profile == Profile::Standard
    }

    /// Checks that need more than one field.
    pub fn check(&self) -> Result<(), String> {
        if self.domain.is_empty() || !self.domain.contains('.') {
            return Err(format!("domain {:?} is not a domain name", self.domain));
        }
        if self.max_message_bytes <= 0 {
            return Err("maxMessageBytes must be positive".into());
        }
        if self.max_recipients == 0 {
            return Err("maxRecipients must be at least 1".into());
        }
        if !self.antivirus.enabled {
            return Err("antivirus cannot be disabled".into());
        }
        if let Some(s) = &self.signing
            && (s.key_id.is_empty() || s.token_label.is_empty())
        {
            return Err("signing needs tokenLabel and keyId".into());
        }
        Ok(())
    }
}
