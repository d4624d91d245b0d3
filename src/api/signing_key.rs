//! `SigningKey`: an HSM-backed key (PKCS#11) that signs a PEC domain's
//! receipts and envelopes, its certificate, issuer and rotation policy, and
//! the generations the controller has made.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key that lives in an HSM token and never leaves it, with a certificate
/// issued and rotated before expiry.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "pec.dev",
    version = "v1alpha1",
    kind = "SigningKey",
    namespaced,
    status = "SigningKeyStatus",
    shortname = "sigkey",
    category = "pec",
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.algorithm"}"#,
    printcolumn = r#"{"name":"Generation","type":"integer","jsonPath":".status.current.generation"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.current.notAfter"}"#,
    printcolumn = r#"{"name":"Renewal","type":"string","jsonPath":".status.renewalTime"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.certificate.renewBefore) || duration(self.certificate.renewBefore) > duration(self.publication.delay)"
).message("certificate.renewBefore must be longer than publication.delay, or a new certificate could not be published before the old one expires"))]
pub struct SigningKeySpec {
    /// The PKCS#11 token holding the key. The module path is operator
    /// configuration (chart value `hsm.module`).
    pub hsm: HsmSpec,

    /// `ECDSA-P256` (default), `RSA-3072`, or `RSA-2048` (interoperability only).
    #[serde(default)]
    pub algorithm: KeyAlgorithm,

    /// The certificate's subject.
    pub subject: Subject,

    /// DNS names the certificate covers (the PEC domains it signs for).
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub dns_names: Vec<String>,

    /// Lifetime and renewal of each certificate.
    pub certificate: CertificatePolicy,

    /// Who signs the certificates. Exactly one of its fields.
    pub issuer: IssuerSpec,

    /// How long a new certificate is published before the gateways use it.
    #[serde(default)]
    pub publication: Publication,

    /// What happens to a private key once its certificate is retired:
    /// `Retain` (default) keeps it in the token, `Destroy` deletes it.
    #[serde(default)]
    pub retired_key_policy: RetiredKeyPolicy,

    /// `Never` (default): keys are generated non-extractable. `Wrapped`: keys
    /// may be exported only wrapped under a key-encryption key that is itself
    /// in the HSM (never in plaintext; see docs/signing-keys.md).
    #[serde(default)]
    pub export: ExportPolicy,

    /// Setting a reason declares the current key compromised: the operator
    /// rotates at once (no publication delay), marks the old certificate
    /// revoked and records it for the issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<Revoke>,
}

/// The PKCS#11 token and its PIN.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HsmSpec {
    /// Label of the token (never a slot number: slot numbers change).
    #[schemars(length(min = 1, max = 32))]
    pub token_label: String,
    /// The Secret (same namespace) holding the user PIN.
    pub pin_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret. Default `pin`.
    #[serde(default = "default_pin_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_pin_key() -> String {
    "pin".into()
}

/// A key algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256.
    #[default]
    #[serde(rename = "ECDSA-P256")]
    EcdsaP256,
    /// RSA 3072 bits, PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "RSA-3072")]
    Rsa3072,
    /// RSA 2048 bits, for interoperability only.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
}

/// The certificate subject.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Common name, such as `pec.example.it`.
    #[schemars(length(min = 1, max = 64))]
    pub common_name: String,
    /// Organization (the provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub organization: Option<String>,
    /// Organizational unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub organizational_unit: Option<String>,
    /// Two-letter country code, such as `IT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Z]{2}$')").message("country must be a two-letter ISO code such as IT"))]
    pub country: Option<String>,
    /// Locality, such as `Roma`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub locality: Option<String>,
}

/// Lifetime and renewal.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.renewBefore) != has(self.renewBeforePercentage)").message("set exactly one of certificate.renewBefore and certificate.renewBeforePercentage"))]
#[x_kube(validation = Rule::new("!has(self.renewBefore) || duration(self.renewBefore) < duration(self.duration)").message("certificate.renewBefore must be shorter than certificate.duration"))]
pub struct CertificatePolicy {
    /// Certificate lifetime, such as `17520h` (two years).
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,7}(s|m|h)$')").message("certificate.duration must be a whole number of seconds, minutes or hours, such as 17520h"))]
    #[schemars(length(max = 10))]
    pub duration: String,
    /// Start renewing this long before expiry, such as `1440h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,7}(s|m|h)$')").message("certificate.renewBefore must be a whole number of seconds, minutes or hours, such as 1440h"))]
    #[schemars(length(max = 10))]
    pub renew_before: Option<String>,
    /// Start renewing when this share of the lifetime is left (1-99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub renew_before_percentage: Option<i32>,
}

/// Who signs the certificates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.selfSigned), has(self.ca), has(self.external), has(self.certManager)].filter(x, x).size() == 1").message("issuer needs exactly one of selfSigned, ca, external, certManager"))]
pub struct IssuerSpec {
    /// The key signs its own certificate (development only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedIssuer>,
    /// A CA certificate and key in a Secret sign the certificate; revocations
    /// go to a CRL Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaIssuer>,
    /// A person takes the CSR to an accredited CA and puts the signed
    /// certificate into a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalIssuer>,
    /// A cert-manager `CertificateRequest` carries the CSR; the key stays in the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_manager: Option<CertManagerIssuer>,
}

/// Self-signed issuance: no settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SelfSignedIssuer {}

/// A CA in a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaIssuer {
    /// Secret (same namespace) with `tls.crt` (the CA certificate) and
    /// `tls.key` (its PKCS#8 private key), as cert-manager's CA issuer reads it.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Issuance by a person.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalIssuer {
    /// Secret (same namespace) into which the signed certificate is put, as
    /// `tls.crt`. The operator checks it matches the key before using it.
    #[schemars(length(min = 1, max = 253))]
    pub certificate_secret_name: String,
}

/// Issuance through cert-manager.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertManagerIssuer {
    /// The cert-manager issuer that signs the request.
    pub issuer_ref: IssuerRef,
}

/// A cert-manager issuer reference.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: String,
    /// API group. Default `cert-manager.io`.
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

fn default_issuer_kind() -> String {
    "Issuer".into()
}

fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

/// Publication before use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Publication {
    /// How long a new certificate is published (Secret and index ConfigMap)
    /// before the gateways sign with it. Default `24h`.
    #[serde(default = "default_publication_delay")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,7}(s|m|h)$')").message("publication.delay must be a whole number of seconds, minutes or hours, such as 24h"))]
    #[schemars(length(max = 10))]
    pub delay: String,
}

fn default_publication_delay() -> String {
    "24h".into()
}

impl Default for Publication {
    fn default() -> Self {
        Self {
            delay: default_publication_delay(),
        }
    }
}

/// What happens to retired private keys.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RetiredKeyPolicy {
    /// Keep retired keys in the token.
    #[default]
    Retain,
    /// Destroy a key once its certificate is retired and no gateway uses it.
    Destroy,
}

/// Whether keys may leave the HSM.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExportPolicy {
    /// Non-extractable keys.
    #[default]
    Never,
    /// Extractable only wrapped under a key-encryption key in the HSM.
    Wrapped,
}

/// A declared compromise.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Revoke {
    /// RFC 5280 reason.
    pub reason: RevocationReason,
    /// The generation compromised (`status.current.generation` for the key
    /// in use). Naming it keeps the request idempotent: it is acted on once.
    #[schemars(range(min = 1))]
    pub generation: i64,
}

/// RFC 5280 revocation reasons the operator records.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationReason {
    /// The private key is (suspected) compromised.
    KeyCompromise,
    /// The CA's key is compromised.
    CaCompromise,
    /// The subject's details changed.
    AffiliationChanged,
    /// Replaced by a new certificate.
    Superseded,
    /// The domain is no longer operated.
    CessationOfOperation,
}

/// What the controller has made.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyStatus {
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary: `Pending`, `Issuing`, `Publishing`, `Active`, `Rotating`,
    /// `Expiring`, `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The generation the gateways sign with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<KeyGeneration>,
    /// The generation on its way in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<KeyGeneration>,
    /// The generation last retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<KeyGeneration>,
    /// When the current certificate's successor is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<Time>,
    /// Retry state of the step in progress (survives restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffStatus>,
    /// Revoked certificates, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked: Vec<RevokedCertificate>,
    /// Something a person must do, such as asking the external CA to revoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_action: Option<String>,
    /// `Ready`, `Issuing`, `Expiring`, `Revoked`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One generation of the key and its certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyGeneration {
    /// 1, 2, 3, ...
    pub generation: i64,
    /// `Pending`, `Issued`, `Published`, `Active`, `Retired`.
    pub phase: String,
    /// `CKA_ID` of the key in the token, hex.
    pub key_id: String,
    /// Certificate serial number, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// SHA-256 of the certificate, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Certificate validity start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    /// Certificate expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    /// When the certificate was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<Time>,
    /// Made in an emergency: no publication delay.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emergency: bool,
    /// The certificate, PEM (public data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The CSR sent to an `external` or `certManager` issuer, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// The private key was destroyed (`retiredKeyPolicy: Destroy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_destroyed: bool,
}

/// Retry state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackoffStatus {
    /// Failures in a row.
    pub failures: i32,
    /// Not before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Time>,
    /// The last failure's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A revoked certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevokedCertificate {
    /// Its generation.
    pub generation: i64,
    /// Its serial number, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When it was revoked.
    pub revoked_at: Time,
    /// Why.
    pub reason: RevocationReason,
}
