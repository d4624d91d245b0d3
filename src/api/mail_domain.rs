//! `MailDomain`: a PEC domain, the sites that serve it and its gateway settings.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::ResourceRequirements,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The legal maximum size of a PEC message (recipients x size): 100 MB.
pub const MAX_MESSAGE_BYTES: i64 = 104_857_600;
/// The legal retention of logs and quarantined messages: 30 months.
pub const LEGAL_RETENTION_MONTHS: u32 = 30;
/// Every PEC service runs on at least this many machines.
pub const MIN_REPLICAS_PER_SITE: i32 = 2;

/// A PEC domain served by redundant gateways in one or more data centers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pec.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    namespaced,
    status = "MailDomainStatus",
    shortname = "md",
    shortname = "pecdomain",
    category = "pec",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domain"}"#,
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".spec.profile"}"#,
    printcolumn = r#"{"name":"Gateways","type":"string","jsonPath":".status.gateways"}"#,
    printcolumn = r#"{"name":"Serving","type":"string","jsonPath":".status.servingSites"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.profile == 'ReceiveOnly' || has(self.gateway.tlsSecretRef)").message(
    "a Standard domain needs gateway.tlsSecretRef (a kubernetes.io/tls Secret): its submission port takes passwords only over TLS"
))]
pub struct MailDomainSpec {
    /// The PEC domain, a fully qualified domain name such as `pec.example.it`:
    /// lowercase letters, digits and hyphens, at least two labels of 1-63
    /// characters that neither start nor end with a hyphen, at most 253
    /// characters, no trailing dot.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(
        r"self.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\.)+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')"
    ).message(
        "domain must be a lowercase FQDN with at least two labels (for example pec.example.it): letters a-z, digits and hyphens, labels of 1-63 characters not starting or ending with a hyphen, no trailing dot"
    ))]
    pub domain: String,

    /// `Standard` (mailboxes with IMAPS, POP3S, submission and webmail) or
    /// `ReceiveOnly` (PEC d'ufficio: reception and the HTTPS message API only).
    pub profile: Profile,

    /// Names of the Sites (data centers) that serve this domain. At least one,
    /// no duplicates; PEC requires two, so fewer is reported as a warning
    /// condition (`SiteRedundancy=False`).
    #[schemars(length(min = 1, max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub sites: Vec<String>,

    /// The gateway pods that run in every site.
    pub gateway: GatewaySpec,

    /// Maximum message size in bytes (recipients x size). Default and legal
    /// maximum: 104857600 (100 MB).
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1, max = 104_857_600))]
    pub max_message_bytes: i64,

    /// Antivirus settings. Antivirus is mandatory for every PEC mailbox and
    /// cannot be turned off: infected messages are refused with a notice to
    /// the sender and kept in quarantine.
    #[serde(default)]
    pub antivirus: AntivirusSpec,

    /// How traffic follows the healthy sites.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// Name of a SigningKey in the same namespace whose key signs this
    /// domain's receipts and envelopes. Carried into the gateway configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub signing_key_ref: Option<String>,
}

/// The domain profile, which decides the protocols and ports the gateways expose.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Ordinary PEC mailboxes: SMTP reception (25), submission (465), IMAPS
    /// (993), POP3S (995) and HTTPS (443).
    Standard,
    /// PEC d'ufficio: receive only; SMTP reception (25) and the HTTPS message
    /// API (443); never IMAP, POP3 or submission.
    ReceiveOnly,
}

/// How the domain's traffic moves between sites.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// `ActiveActive` (every healthy listed site serves; default) or
    /// `ActivePassive` (only the healthy site with the lowest priority serves;
    /// the others stay warm).
    #[serde(default)]
    pub mode: FailoverMode,
    /// A recovered site rejoins only after it has been healthy without
    /// interruption this long, so a flapping site causes at most one switch
    /// per window. Default 300.
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 86400))]
    pub stabilization_seconds: i32,
    /// TTL of the DNS records written for clients outside the cluster. Default 30.
    #[serde(default = "default_dns_ttl")]
    #[schemars(range(min = 1, max = 86400))]
    pub dns_ttl_seconds: i32,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            mode: FailoverMode::default(),
            stabilization_seconds: default_stabilization(),
            dns_ttl_seconds: default_dns_ttl(),
        }
    }
}

/// Which healthy sites serve.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailoverMode {
    /// Every healthy listed site serves.
    #[default]
    ActiveActive,
    /// Only the healthy listed site with the lowest priority serves.
    ActivePassive,
}

fn default_stabilization() -> i32 {
    300
}

fn default_dns_ttl() -> i32 {
    30
}

/// The gateway Deployment run in every site of the domain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Container image of the PEC gateway. Default: the reference gateway
    /// image of this operator's version (the operator's `--gateway-image`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    pub image: String,

    /// A `kubernetes.io/tls` Secret (same namespace) with the certificate
    /// the gateways present: STARTTLS on port 25 and implicit TLS on port
    /// 465. A `Standard` domain needs it (passwords never cross in clear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret_ref: Option<String>,

    /// A Secret (same namespace) whose key `mailboxes` lists the domain's
    /// mailboxes, one `local-part:hash` line each (argon2id PHC hashes from
    /// `pec-gateway passwd`; `!` for a mailbox that receives but never logs
    /// in). Mail for an unlisted mailbox gets a non-delivery notice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub mailboxes_secret_ref: Option<String>,

    /// ConfigMaps (same namespace) whose `bundle.crt` holds certificates of
    /// other providers to trust: the providers' index. The certificates the
    /// domain's own SigningKey publishes are always trusted; list the
    /// `<key>-index` ConfigMaps of the platform's other domains here too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub providers: Vec<String>,

    /// Where mail for other domains goes.
    #[serde(default, skip_serializing_if = "RelaySpec::is_empty")]
    pub relay: RelaySpec,

    /// A PersistentVolumeClaim (same namespace, ReadWriteMany network
    /// storage) for mailboxes, queue, quarantine and the legal log: the
    /// mailboxes (`mailboxes/`) are the domain's, shared by all its pods;
    /// the rest each pod writes under its own name. Without it each gateway
    /// has an emptyDir, which a deleted pod takes with it and no other pod
    /// sees: for tests with one pod only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_claim_name: Option<String>,

    /// Gateway replicas in each site, each on a distinct node. At least 2
    /// (every PEC service runs on at least two machines); default 2.
    #[serde(default = "default_replicas_per_site")]
    #[schemars(range(max = 100))]
    #[x_kube(validation = Rule::new("self >= 2").message(
        "replicasPerSite must be at least 2: every PEC service runs on at least two machines"
    ))]
    pub replicas_per_site: i32,

    /// CPU and memory requests and limits of the gateway container. Defaults:
    /// requests 100m CPU and 128Mi memory, limits 1 CPU and 512Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra annotations on the gateway pods (for example for a log collector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
}

/// Where a gateway hands mail for other domains.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// `host:port` of the incoming point of other domains on this platform
    /// (their domain Service), by domain.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, String>,
    /// `host:port` every other domain goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    pub smarthost: Option<String>,
}

impl RelaySpec {
    fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.smarthost.is_none()
    }
}

/// Antivirus settings. There is deliberately no way to disable scanning.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AntivirusSpec {
    /// Always `true`: antivirus is mandatory for PEC by law. The field exists
    /// only so that an attempt to set it to `false` is refused with a clear message.
    #[serde(default = "always_true")]
    #[x_kube(validation = Rule::new("self == true").message(
        "antivirus is mandatory for every PEC mailbox and cannot be disabled; remove antivirus.enabled"
    ))]
    pub enabled: bool,

    /// How long infected messages stay in quarantine: a whole number of months
    /// (`30mo`) or years (`3y`), at least the legal 30 months. Default `30mo`.
    #[serde(default = "default_quarantine_retention")]
    #[schemars(length(min = 2, max = 6))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[0-9]{1,4}(mo|y)$') && (self.endsWith('y') ? int(self.substring(0, size(self) - 1)) * 12 : int(self.substring(0, size(self) - 2))) >= 30"
    ).message(
        "quarantineRetention must be a whole number of months or years (30mo, 3y) and at least the legal 30 months"
    ))]
    pub quarantine_retention: String,

    /// The clamd the gateways ask: `tcp:HOST:PORT` or `unix:PATH`. Left out,
    /// the platform's clamd: the operator's `--gateway-clamd` (the chart's
    /// `gateway.clamd`), by default `tcp:127.0.0.1:3310`. When clamd does not
    /// answer, the gateways refuse mail temporarily and report not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 6, max = 512))]
    #[x_kube(validation = Rule::new("self.startsWith('tcp:') || self.startsWith('unix:/')").message(
        "antivirus.clamd must be tcp:HOST:PORT or unix:/absolute/path"
    ))]
    pub clamd: Option<String>,
}

impl Default for AntivirusSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            quarantine_retention: default_quarantine_retention(),
            clamd: None,
        }
    }
}

/// Observed state of a MailDomain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready over desired gateways across all sites, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateways: Option<String>,
    /// Desired and ready gateways in each listed site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteGatewayStatus>,
    /// Sites whose gateways are the endpoints of the domain Service now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serving_sites: Vec<String>,
    /// The serving site, in ActivePassive mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_site: Option<String>,
    /// The SigningKey generation every gateway of the domain runs (set once a
    /// rollout to it is complete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_generation: Option<i64>,
    /// The last change of the serving sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<Failover>,
    /// `Ready` (every listed site at full strength), `Degraded` (some site
    /// below), `Progressing` (a rollout is under way), `SiteRedundancy` (at
    /// least two sites), `SigningKeyResolved`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A change of the serving sites.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Sites serving before.
    #[serde(default)]
    pub from: Vec<String>,
    /// Sites serving after.
    #[serde(default)]
    pub to: Vec<String>,
    /// When the switch happened.
    pub at: Time,
    /// Why: `SiteDown`, `SiteRecovered`, `Maintenance`, `Fenced`, ...
    pub reason: String,
}

/// Gateway counts of one site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SiteGatewayStatus {
    /// Site name.
    pub site: String,
    /// Gateways the site should run.
    pub desired: i32,
    /// Gateways that are ready.
    pub ready: i32,
    /// When the site's gateways first served the domain. A site that serves
    /// again after it left rejoins (a switch, counted and told); one that
    /// serves for the first time joins, which moves no traffic away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_served_time: Option<Time>,
}

impl Profile {
    /// The ports gateways of this profile listen on; nothing else is exposed.
    pub fn ports(self) -> &'static [GatewayPort] {
        match self {
            Profile::Standard => &[
                GatewayPort::SMTP,
                GatewayPort::SUBMISSION,
                GatewayPort::IMAPS,
                GatewayPort::POP3S,
                GatewayPort::HTTPS,
            ],
            Profile::ReceiveOnly => &[GatewayPort::SMTP, GatewayPort::HTTPS],
        }
    }
}

/// A named port of the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GatewayPort {
    /// The port name (IANA service name).
    pub name: &'static str,
    /// The port number.
    pub port: i32,
}

impl GatewayPort {
    /// SMTP reception from other providers.
    pub const SMTP: Self = Self {
        name: "smtp",
        port: 25,
    };
    /// Message submission over implicit TLS.
    pub const SUBMISSION: Self = Self {
        name: "submissions",
        port: 465,
    };
    /// IMAP over TLS.
    pub const IMAPS: Self = Self {
        name: "imaps",
        port: 993,
    };
    /// POP3 over TLS.
    pub const POP3S: Self = Self {
        name: "pop3s",
        port: 995,
    };
    /// Webmail and the message API.
    pub const HTTPS: Self = Self {
        name: "https",
        port: 443,
    };
}

fn default_max_message_bytes() -> i64 {
    MAX_MESSAGE_BYTES
}

fn default_replicas_per_site() -> i32 {
    MIN_REPLICAS_PER_SITE
}

fn always_true() -> bool {
    true
}

fn default_quarantine_retention() -> String {
    format!("{LEGAL_RETENTION_MONTHS}mo")
}
