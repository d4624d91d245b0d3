//! The Issue step: make (or find) the generation's key in the HSM and get its
//! certificate from the issuer. PKCS#11 work runs on a blocking thread.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Duration, Utc};
use cryptoki::types::AuthPin;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, PostParams},
};
use serde_json::json;

use crate::{
    api::{KeyAlgorithm, SigningKey},
    hsm::{Algorithm, Hsm, HsmError, key_id},
    signing::x509::{self, CertInfo, HsmSigner, X509Error},
};

/// Why an Issue attempt failed; each is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The operator was started without a PKCS#11 module.
    #[error("no PKCS#11 module is configured (chart value hsm.module)")]
    NoModule,
    /// The PIN Secret or its key is missing.
    #[error("PIN Secret {0} or its key is missing")]
    PinMissing(String),
    /// The HSM refused or failed.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// Building or reading a certificate failed.
    #[error(transparent)]
    X509(#[from] X509Error),
    /// The `ca` issuer's Secret is missing or incomplete.
    #[error("CA Secret {0} is missing or lacks tls.crt and tls.key")]
    CaMissing(String),
    /// The issuer refused the request.
    #[error("the issuer refused the request: {0}")]
    Refused(String),
    /// Reading or writing an object failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The blocking HSM task died.
    #[error("the HSM task failed: {0}")]
    Task(String),
}

impl IssueError {
    /// A short, bounded reason for conditions, metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::NoModule => "HsmModuleUnavailable",
            IssueError::PinMissing(_) => "PinSecretMissing",
            IssueError::Hsm(e) => e.reason(),
            IssueError::X509(_) => "CertificateInvalid",
            IssueError::CaMissing(_) => "CaSecretMissing",
            IssueError::Refused(_) => "IssuerRefused",
            IssueError::Kube(_) => "ApiError",
            IssueError::Task(_) => "HsmTaskFailed",
        }
    }
}

/// What one Issue attempt achieved.
pub enum Outcome {
    /// The certificate is in hand.
    Issued(CertInfo),
    /// A CSR is out; a person or cert-manager has to sign it.
    Waiting {
        /// CamelCase reason for the `Issuing` condition.
        reason: &'static str,
        /// What is awaited.
        message: String,
    },
}

/// The algorithm of the spec, as the HSM layer names it.
pub fn algorithm(a: KeyAlgorithm) -> Algorithm {
    match a {
        KeyAlgorithm::EcdsaP256 => Algorithm::EcdsaP256,
        KeyAlgorithm::Rsa3072 => Algorithm::Rsa3072,
        KeyAlgorithm::Rsa2048 => Algorithm::Rsa2048,
    }
}

/// The user PIN of `sk`'s token, read from its Secret. Never logged.
pub async fn pin(client: &Client, sk: &SigningKey) -> Result<AuthPin, IssueError> {
    let ns = sk.namespace().unwrap_or_default();
    let r = &sk.spec.hsm.pin_secret_ref;
    let missing = || IssueError::PinMissing(format!("{}/{} (key {})", ns, r.name, r.key));
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&r.name)
        .await?
        .ok_or_else(missing)?;
    let bytes = secret_value(&secret, &r.key).ok_or_else(missing)?;
    let text = String::from_utf8(bytes).map_err(|_| missing())?;
    Ok(AuthPin::from(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}

/// What the issuer has for us before the HSM is touched.
enum Issuer {
    SelfSigned,
    Ca(Box<x509::Ca>),
    /// A certificate someone supplied (external Secret, cert-manager), if any.
    Supplied {
        cert: Option<String>,
        refused: Option<String>,
    },
}

const CERT_MANAGER_GROUP: &str = "cert-manager.io";

/// The cert-manager CertificateRequest API.
pub fn certificate_requests(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        CERT_MANAGER_GROUP,
        "v1",
        "CertificateRequest",
    ));
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Name of the CertificateRequest of generation `n`.
pub fn request_name(sk: &SigningKey, n: u32) -> String {
    format!("{}-g{n}", sk.name_any())
}

/// The `ca` issuer's CA, read from its Secret (`tls.crt`, `tls.key`).
pub async fn read_ca(client: &Client, sk: &SigningKey) -> Result<x509::Ca, IssueError> {
    let ns = sk.namespace().unwrap_or_default();
    let name = sk
        .spec
        .issuer
        .ca
        .as_ref()
        .map(|ca| ca.secret_name.clone())
        .unwrap_or_default();
    let missing = || IssueError::CaMissing(format!("{ns}/{name}"));
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&name)
        .await?
        .ok_or_else(missing)?;
    let text = |k| {
        secret_value(&secret, k)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(missing)
    };
    Ok(x509::Ca::new(&text("tls.crt")?, &text("tls.key")?)?)
}

async fn fetch_issuer(client: &Client, sk: &SigningKey, n: u32) -> Result<Issuer, IssueError> {
    let ns = sk.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let issuer = &sk.spec.issuer;
    if issuer.ca.is_some() {
        return Ok(Issuer::Ca(Box::new(read_ca(client, sk).await?)));
    }
    if let Some(ext) = &issuer.external {
        let cert = secrets
            .get_opt(&ext.certificate_secret_name)
            .await?
            .and_then(|s| secret_value(&s, "tls.crt"))
            .and_then(|b| String::from_utf8(b).ok());
        return Ok(Issuer::Supplied {
            cert,
            refused: None,
        });
    }
    if issuer.cert_manager.is_some() {
        let request = certificate_requests(client, &ns)
            .get_opt(&request_name(sk, n))
            .await?;
        let status = request.as_ref().and_then(|r| r.data.get("status"));
        let cert = status
            .and_then(|s| s.get("certificate"))
            .and_then(|c| c.as_str())
            .and_then(|b64| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(b64).ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        let refused = status
            .and_then(|s| s.get("conditions"))
            .and_then(|c| c.as_array())
            .and_then(|cs| {
                cs.iter().find(|c| {
                    let t = c.get("type").and_then(|t| t.as_str());
                    let st = c.get("status").and_then(|t| t.as_str());
                    (t == Some("Denied") && st == Some("True"))
                        || (t == Some("Ready")
                            && st == Some("False")
                            && c.get("reason").and_then(|r| r.as_str()) == Some("Failed"))
                })
            })
            .map(|c| {
                c.get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("denied")
                    .to_string()
            });
        return Ok(Issuer::Supplied { cert, refused });
    }
    Ok(Issuer::SelfSigned)
}

/// Everything the blocking HSM task needs, owned.
struct Job {
    /// `namespace/name` of the SigningKey.
    object: String,
    hsm: Arc<Hsm>,
    token_label: String,
    pin: AuthPin,
    key_id: Vec<u8>,
    key_label: String,
    algorithm: Algorithm,
    extractable: bool,
    subject: crate::api::Subject,
    dns_names: Vec<String>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    issuer: Issuer,
    csr: Option<String>,
}

/// The result of the blocking part.
enum Made {
    Cert(CertInfo),
    Csr {
        csr: String,
        /// A supplied certificate that belongs to another key.
        mismatch: Option<String>,
    },
}

fn run_job(job: Job) -> Result<Made, IssueError> {
    let token = job.hsm.login(&job.token_label, &job.pin)?;
    let handle = token.ensure_key(&job.key_id, &job.key_label, job.algorithm, job.extractable)?;
    crate::failpoint::hit("key", &job.object);
    let spki = token.public_key(&job.key_id)?;
    let signer = HsmSigner::new(&token, handle, job.algorithm, &spki)?;
    let serial = x509::serial_for(&job.key_id, job.not_before);
    let params = x509::leaf_params(
        &job.subject,
        &job.dns_names,
        serial,
        job.not_before,
        job.not_after,
    )?;
    let pem = match job.issuer {
        Issuer::SelfSigned => x509::self_signed(&params, &signer)?,
        Issuer::Ca(ca) => ca.sign(&params, &signer)?,
        Issuer::Supplied { cert, refused } => {
            if let Some(why) = refused {
                return Err(IssueError::Refused(why));
            }
            let supplied = cert.as_deref().map(x509::parse_certificate).transpose()?;
            if let Some(info) = supplied.as_ref().filter(|i| i.spki == spki) {
                return Ok(Made::Cert(info.clone()));
            }
            let csr = match job.csr {
                Some(csr) => csr,
                None => x509::csr(&params, &signer)?,
            };
            let mismatch = supplied.map(|i| i.fingerprint);
            return Ok(Made::Csr { csr, mismatch });
        }
    };
    Ok(Made::Cert(x509::parse_certificate(&pem)?))
}

/// One Issue attempt for generation `n` of `sk` at `now`. `csr` is the CSR
/// already sent for this generation, if any, so it is not made again.
pub async fn attempt(
    ctx: &crate::controllers::Context,
    sk: &SigningKey,
    n: u32,
    duration: Duration,
    csr: Option<String>,
    details: &mut BTreeMap<u32, crate::api::KeyGeneration>,
    now: DateTime<Utc>,
) -> Result<Outcome, IssueError> {
    let client = &ctx.client;
    let hsm = ctx.hsm.clone().ok_or(IssueError::NoModule)?;
    let pin = pin(client, sk).await?;
    let issuer = fetch_issuer(client, sk, n).await?;
    let uid = sk.uid().unwrap_or_default();
    let id = key_id(&uid, n);
    // Whole seconds; valid from a minute back for clock skew between
    // parties, for the full duration from now.
    let issued_at = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
    let not_before = issued_at - Duration::minutes(1);
    let job = Job {
        object: format!("{}/{}", sk.namespace().unwrap_or_default(), sk.name_any()),
        hsm,
        token_label: sk.spec.hsm.token_label.clone(),
        pin,
        key_id: id.clone(),
        key_label: format!(
            "{}/{} g{n}",
            sk.namespace().unwrap_or_default(),
            sk.name_any()
        ),
        algorithm: algorithm(sk.spec.algorithm),
        extractable: sk.spec.export == crate::api::ExportPolicy::Wrapped,
        subject: sk.spec.subject.clone(),
        dns_names: sk.spec.dns_names.clone(),
        not_before,
        not_after: issued_at + duration,
        issuer,
        csr,
    };
    let made = tokio::task::spawn_blocking(move || run_job(job))
        .await
        .map_err(|e| IssueError::Task(e.to_string()))??;
    let entry = details.entry(n).or_default();
    entry.generation = i64::from(n);
    entry.key_id = x509::hex(&id);
    match made {
        Made::Cert(info) => {
            entry.serial = Some(info.serial.clone());
            entry.fingerprint = Some(info.fingerprint.clone());
            entry.certificate = Some(info.pem.clone());
            Ok(Outcome::Issued(info))
        }
        Made::Csr { csr, mismatch } => {
            entry.csr = Some(csr.clone());
            send_csr(client, sk, n, &csr).await?;
            let (reason, message) = match (&sk.spec.issuer.external, mismatch) {
                (Some(ext), Some(fp)) => (
                    "CertificateDoesNotMatchKey",
                    format!(
                        "the certificate in Secret {} (sha256 {fp}) is not for this key; put the certificate signed from the CSR in status.next.csr (also in Secret {}) there",
                        ext.certificate_secret_name,
                        csr_secret_name(sk)
                    ),
                ),
                (Some(ext), None) => (
                    "AwaitingExternalSignature",
                    format!(
                        "have the CSR in Secret {} (also status.next.csr) signed and put the certificate into Secret {} as tls.crt",
                        csr_secret_name(sk),
                        ext.certificate_secret_name
                    ),
                ),
                (None, _) => (
                    "AwaitingCertificateRequest",
                    format!(
                        "waiting for cert-manager to sign CertificateRequest {}",
                        request_name(sk, n)
                    ),
                ),
            };
            Ok(Outcome::Waiting { reason, message })
        }
    }
}

/// Name of the Secret holding the CSR for an external issuer.
pub fn csr_secret_name(sk: &SigningKey) -> String {
    format!("{}-csr", sk.name_any())
}

/// Publishes the CSR: a Secret for `external`, a CertificateRequest for `certManager`.
async fn send_csr(client: &Client, sk: &SigningKey, n: u32, csr: &str) -> Result<(), IssueError> {
    let ns = sk.namespace().unwrap_or_default();
    let owner = super::owner_reference(sk);
    if sk.spec.issuer.external.is_some() {
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": csr_secret_name(sk),
                "namespace": ns,
                "labels": super::labels(sk),
                "annotations": {"pec.dev/generation": n.to_string()},
                "ownerReferences": [owner],
            },
            "type": "Opaque",
            "data": {"csr.pem": ByteString(csr.as_bytes().to_vec())},
        });
        super::apply_json::<Secret>(client, &ns, &csr_secret_name(sk), secret).await?;
    } else if let Some(cm) = &sk.spec.issuer.cert_manager {
        let api = certificate_requests(client, &ns);
        let name = request_name(sk, n);
        if api.get_opt(&name).await?.is_none() {
            use base64::Engine;
            let mut request: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "cert-manager.io/v1",
                "kind": "CertificateRequest",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": super::labels(sk),
                    "ownerReferences": [owner],
                },
                "spec": {
                    "request": base64::engine::general_purpose::STANDARD.encode(csr),
                    "issuerRef": {"name": cm.issuer_ref.name, "kind": cm.issuer_ref.kind, "group": cm.issuer_ref.group},
                    "duration": sk.spec.certificate.duration,
                    "usages": ["digital signature", "content commitment", "email protection"],
                },
            }))
            .map_err(|e| IssueError::Refused(e.to_string()))?;
            request.metadata.namespace = Some(ns.clone());
            match api.create(&PostParams::default(), &request).await {
                // Made since the read (a previous attempt whose answer was
                // lost): the request stands, which is what was wanted.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}
