//! `SlaTarget`: an availability objective over calendar periods, with a
//! single-outage cap, RTO and RPO, and the measurement against it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An availability objective for some MailDomains over calendar periods.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pec.dev",
    version = "v1alpha1",
    kind = "SlaTarget",
    namespaced,
    status = "SlaTargetStatus",
    shortname = "sla",
    category = "pec",
    printcolumn = r#"{"name":"Objective","type":"number","jsonPath":".spec.objective"}"#,
    printcolumn = r#"{"name":"Availability","type":"string","jsonPath":".status.worstAvailability"}"#,
    printcolumn = r#"{"name":"Budget-Left","type":"string","jsonPath":".status.leastBudgetLeft"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.probe) || self.probe.kind != 'PecRoundTrip' || !has(self.selector.scope) || self.selector.scope == 'Domain'"
).message(
    "a PecRoundTrip probe measures each domain as its clients reach it: use selector.scope Domain"
))]
#[x_kube(validation = Rule::new(
    "!has(self.probe) || !has(self.probe.pecRoundTrip) || (!has(self.probe.pecRoundTrip.submissionAddress) && !has(self.probe.pecRoundTrip.apiAddress)) || (has(self.selector.names) && size(self.selector.names) == 1 && (!has(self.selector.matchLabels) || size(self.selector.matchLabels) == 0))"
).message(
    "probe.pecRoundTrip.submissionAddress and apiAddress point at one domain's gateways: select exactly one domain with selector.names"
))]
pub struct SlaTargetSpec {
    /// Availability objective in percent, strictly between 0 and 100. Default
    /// 99.8 (the legal PEC minimum per four-month period).
    #[serde(default = "default_objective")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 100.0").message("objective must be a percentage strictly between 0 and 100, such as 99.8"))]
    pub objective: f64,

    /// The calendar period measured: `Quadrimester` (January-April,
    /// May-August, September-December; default), `Quarter` or `Month`.
    #[serde(default)]
    pub period: PeriodKind,

    /// IANA time zone in which periods start at local midnight. Default `Europe/Rome`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,

    /// The share of the period's allowed unavailability a single outage may
    /// use. Default 0.5 (so one outage may use 0.1% of the period at 99.8%).
    #[serde(default = "default_fraction")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("singleOutageBudgetFraction must be in (0, 1], such as 0.5"))]
    pub single_outage_budget_fraction: f64,

    /// Recovery Time Objective, as a duration such as `4h` or `90m`. Default `4h`.
    #[serde(default = "default_rto")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,6}(s|m|h)$')").message("rto must be a whole number of seconds, minutes or hours, such as 4h"))]
    #[schemars(length(max = 8))]
    pub rto: String,

    /// Recovery Point Objective, as a duration such as `0s`. Default `0s`.
    #[serde(default = "default_rpo")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,6}(s|m|h)$')").message("rpo must be a whole number of seconds, minutes or hours, such as 0s"))]
    #[schemars(length(max = 8))]
    pub rpo: String,

    /// Which MailDomains of this namespace are measured, and how.
    pub selector: SlaSelector,

    /// How availability is observed.
    #[serde(default)]
    pub probe: ProbeSpec,

    /// Declared maintenance windows. Never subtracted silently: time in them
    /// is still measured, and reported separately.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub exclusions: Vec<Exclusion>,

    /// Status is written on a state change, otherwise at most this often. Default 30.
    #[serde(default = "default_status_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub status_interval_seconds: i32,
}

/// A calendar measurement period.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PeriodKind {
    /// January-April, May-August, September-December.
    #[default]
    Quadrimester,
    /// Calendar quarters.
    Quarter,
    /// Calendar months.
    Month,
}

/// The MailDomains an SlaTarget measures.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.names) > 0 || size(self.matchLabels) > 0").message("selector needs names or matchLabels"))]
pub struct SlaSelector {
    /// MailDomain names in this namespace.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub names: Vec<String>,
    /// MailDomain labels; every domain carrying all of them is measured.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Measure each domain as a whole (`Domain`, default), each of its sites
    /// (`Site`), or both (`Both`).
    #[serde(default)]
    pub scope: Scope,
}

/// What is measured for each selected domain.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// The domain as clients see it.
    #[default]
    Domain,
    /// Each site of the domain.
    Site,
    /// Both.
    Both,
}

/// How availability is observed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind != 'PecRoundTrip' || has(self.pecRoundTrip)").message(
    "probe kind PecRoundTrip needs probe.pecRoundTrip (the probe mailbox and its password Secret)"
))]
pub struct ProbeSpec {
    /// `Endpoints` (available when the domain Service has a ready endpoint in
    /// a serving site; default), `Tcp` or `Http` (the operator connects to the
    /// domain Service), or `PecRoundTrip` (the operator sends a PEC message
    /// and waits for its signed receipts).
    #[serde(default)]
    pub kind: ProbeKind,
    /// The probe mailbox of a `PecRoundTrip` probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pec_round_trip: Option<PecRoundTripProbe>,
    /// Seconds between observations. Default 10.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub interval_seconds: i32,
    /// Connection timeout of `Tcp` and `Http` probes, in seconds. Default 3.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: i32,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            kind: ProbeKind::default(),
            pec_round_trip: None,
            interval_seconds: default_interval(),
            timeout_seconds: default_timeout(),
        }
    }
}

/// The kind of availability probe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProbeKind {
    /// Read the domain Service's EndpointSlices.
    #[default]
    Endpoints,
    /// Open a TCP connection to the domain Service (port 25).
    Tcp,
    /// Send an HTTPS request to the domain Service (port 443).
    Http,
    /// Send a PEC message from a probe mailbox to itself through the domain
    /// Service (port 465) and read back, through the message API (port 443),
    /// the acceptance and delivery receipts; available only when both arrive
    /// within `timeoutSeconds` and verify against the certificates the
    /// domain's SigningKey publishes. Outage causes: `NoAcceptance`,
    /// `NoDelivery`, `BadSignature`.
    PecRoundTrip,
}

/// The mailbox a `PecRoundTrip` probe sends from and to, in every measured
/// domain. It must be a mailbox of the domain (in its mailboxes Secret) kept
/// for the probe: the probe deletes its own messages from it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PecRoundTripProbe {
    /// Local part of the probe mailbox; the address is `<mailbox>@<domain>`.
    /// Default `sla-probe`.
    #[serde(default = "default_probe_mailbox")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9._-]*$')").message(
        "mailbox must be a lowercase local part such as sla-probe (no @domain)"
    ))]
    #[schemars(length(min = 1, max = 64))]
    pub mailbox: String,
    /// The Secret, in the SlaTarget's namespace, holding the probe mailbox's
    /// password.
    pub password_secret_ref: PasswordSecretRef,
    /// `host:port` of the access point to submit to, instead of the domain
    /// Service's port 465 (for example the address clients use from outside
    /// the cluster). Only with a selector that names one domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    pub submission_address: Option<String>,
    /// `host:port` of the message API, instead of the domain Service's port
    /// 443. Only with a selector that names one domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 261))]
    pub api_address: Option<String>,
}

/// A password in a Secret of the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordSecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret. Default `password`.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_probe_mailbox() -> String {
    "sla-probe".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// A declared maintenance window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Exclusion {
    /// Start of the window.
    pub start: Time,
    /// End of the window.
    pub end: Time,
    /// Why.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub reason: String,
}

/// Observed state of an SlaTarget.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SlaTargetStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The worst state of the measured objects: `Met`, `AtRisk` or `Breached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The lowest availability (lower bound) of the measured objects, as a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_availability: Option<String>,
    /// The smallest error budget left among the measured objects, as a percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub least_budget_left: Option<String>,
    /// One entry per measured object (domain, or domain in a site).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<SlaObjectStatus>,
    /// `Met`, `AtRisk`, `Breached`, `TargetsInconsistent`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The measurement of one object in the current period, and its history.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SlaObjectStatus {
    /// `<maildomain>` or `<maildomain>@<site>`.
    pub name: String,
    /// The domain's FQDN.
    pub domain: String,
    /// The site, when measured per site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// `Met`, `AtRisk` or `Breached`.
    pub state: String,
    /// The current period.
    pub period: PeriodStatus,
    /// The outage in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ongoing_outage: Option<OutageStatus>,
    /// Availability projected for the period's end at the current rate, percent.
    pub projected_availability: f64,
    /// Closed periods, newest last (at least the last six).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<PeriodStatus>,
    /// The measurement state (internal): the last observation, as
    /// `<RFC 3339 time> up|down`, so a restart knows what it did not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_observation: Option<String>,
}

/// Aggregates of one period.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeriodStatus {
    /// A short name, such as `2026-09/12`.
    pub label: String,
    /// First instant.
    pub start: Option<Time>,
    /// First instant of the next period.
    pub end: Option<Time>,
    /// Observed seconds.
    pub measured_seconds: f64,
    /// Observed seconds down.
    pub down_seconds: f64,
    /// Seconds not observed (operator down or without a leader).
    pub unobserved_seconds: f64,
    /// Availability over observed time, percent.
    pub availability: f64,
    /// Availability with unobserved time counted as down, percent.
    pub availability_lower: f64,
    /// Availability with unobserved time counted as up, percent.
    pub availability_upper: f64,
    /// The period's error budget in seconds.
    pub budget_seconds: f64,
    /// Budget used (observed downtime) in seconds.
    pub budget_used_seconds: f64,
    /// Budget left in seconds (negative when exceeded).
    pub budget_left_seconds: f64,
    /// The longest single outage allowed, in seconds.
    pub single_outage_cap_seconds: f64,
    /// The longest outage (or part of one) in the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub longest_outage: Option<OutageStatus>,
    /// The latest closed outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_outage: Option<OutageStatus>,
    /// Outages that started or continued in the period.
    pub outages: i64,
    /// Whether the objective and the single-outage cap were met (closed periods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// One outage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutageStatus {
    /// When it started.
    pub start: Option<Time>,
    /// When it ended (absent while ongoing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
    /// Its length so far, in seconds.
    pub seconds: f64,
    /// Why.
    pub cause: String,
}

fn default_objective() -> f64 {
    99.8
}
fn default_time_zone() -> String {
    "Europe/Rome".into()
}
fn default_fraction() -> f64 {
    0.5
}
fn default_rto() -> String {
    "4h".into()
}
fn default_rpo() -> String {
    "0s".into()
}
fn default_interval() -> i32 {
    10
}
fn default_timeout() -> i32 {
    3
}
fn default_status_interval() -> i32 {
    30
}
