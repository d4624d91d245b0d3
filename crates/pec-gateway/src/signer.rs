//! Signing in the HSM with the key generation `gateway.yaml` names.
//!
//! The signer loads the PKCS#11 module once, logs in to the token by label
//! with the PIN read from the mounted Secret, finds the key by its `CKA_ID`,
//! and reads the published certificate of that generation. It refuses a
//! certificate whose SHA-256 differs from the one in `gateway.yaml` or that
//! certifies another key. Until all of that holds, the gateway is not ready;
//! the signer tries again (at most every few seconds), so fixing a wrong PIN
//! in the Secret heals the gateway without a restart.
//!
//! The PIN is read, used to log in and dropped; it is never logged.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use pec_core::{
    config::{GatewayConfig, SigningConfig},
    hsm::{AuthPin, Hsm, Token},
    smime::{self, SignerCertificate},
};

use crate::pec::compose::Composed;

/// Why the gateway cannot sign.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignerError {
    /// `gateway.yaml` names no signing key generation yet.
    #[error("gateway.yaml names no signing key generation")]
    NotConfigured,
    /// The HSM, the PIN, the key or the certificate is not usable (the
    /// reason is bounded and carries no secret).
    #[error("{reason}: {detail}")]
    Unavailable {
        /// A short reason: HsmModuleUnavailable, HsmLoginFailed, KeyNotFound, ...
        reason: &'static str,
        /// What to check.
        detail: String,
    },
}

impl SignerError {
    /// A short, bounded reason.
    pub fn reason(&self) -> &'static str {
        match self {
            SignerError::NotConfigured => "NotConfigured",
            SignerError::Unavailable { reason, .. } => reason,
        }
    }
}

struct Session {
    token: Token,
    key: pec_core::hsm::ObjectHandle,
    certificate: Arc<SignerCertificate>,
}

struct State {
    hsm: Option<Hsm>,
    session: Option<Session>,
    last_error: Option<SignerError>,
    last_try: Option<Instant>,
}

/// Signs what the gateway emits, in the token.
pub struct Signer {
    config: Option<SigningConfig>,
    module: PathBuf,
    pin_file: PathBuf,
    certificate_file: PathBuf,
    retry_every: Duration,
    state: Mutex<State>,
}

fn unavailable(reason: &'static str, detail: impl Into<String>) -> SignerError {
    SignerError::Unavailable {
        reason,
        detail: detail.into(),
    }
}

impl Signer {
    /// A signer for `config`; nothing is loaded until first use.
    pub fn new(config: &GatewayConfig) -> Self {
        let signing = config.signing.clone();
        let certificate_file = signing
            .as_ref()
            .map(|s| config.paths.certificates.join(&s.certificate_key))
            .unwrap_or_default();
        Self {
            config: signing,
            module: config.hsm.module.clone(),
            pin_file: config.hsm.pin_file.clone(),
            certificate_file,
            retry_every: Duration::from_secs(3),
            state: Mutex::new(State {
                hsm: None,
                session: None,
                last_error: None,
                last_try: None,
            }),
        }
    }

    /// Opens the session now if it is not open (and the last try is not too
    /// recent); the error says why the gateway cannot sign.
    pub fn ensure(&self) -> Result<(), SignerError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.ensure_locked(&mut state)
    }

    fn ensure_locked(&self, state: &mut State) -> Result<(), SignerError> {
        if state.session.is_some() {
            return Ok(());
        }
        if let (Some(at), Some(err)) = (state.last_try, &state.last_error)
            && at.elapsed() < self.retry_every
        {
            return Err(err.clone());
        }
        state.last_try = Some(Instant::now());
        match self.open(state) {
            Ok(session) => {
                state.session = Some(session);
                state.last_error = None;
                Ok(())
            }
            Err(e) => {
                // Start the next try from a fresh module load: a token
                // re-inserted, or objects another process wrote while this one
                // read the store, are only seen after C_Initialize again.
                if e.reason() != "NotConfigured" {
                    state.hsm = None;
                }
                state.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn open(&self, state: &mut State) -> Result<Session, SignerError> {
        let config = self.config.as_ref().ok_or(SignerError::NotConfigured)?;
        if state.hsm.is_none() {
            state.hsm =
                Some(Hsm::open(&self.module).map_err(|e| unavailable(e.reason(), e.to_string()))?);
        }
        let Some(hsm) = state.hsm.as_ref() else {
            return Err(unavailable("HsmModuleUnavailable", "module not loaded"));
        };
        let pin = std::fs::read_to_string(&self.pin_file).map_err(|e| {
            unavailable(
                "PinUnreadable",
                format!("reading {}: {e}", self.pin_file.display()),
            )
        })?;
        let pin = AuthPin::from(pin.trim_end_matches(['\r', '\n']).to_string());
        let token = hsm
            .login(&config.token_label, &pin)
            .map_err(|e| unavailable(e.reason(), e.to_string()))?;
        drop(pin);
        let id = pec_core::der::from_hex(&config.key_id)
            .ok_or_else(|| unavailable("BadKeyId", "keyId is not hex"))?;
        let key = token.existing_key(&id).map_err(|e| {
            unavailable(
                e.reason(),
                format!(
                    "key {} in token {:?}: {e}",
                    config.key_id, config.token_label
                ),
            )
        })?;
        let pem = std::fs::read_to_string(&self.certificate_file).map_err(|e| {
            unavailable(
                "CertificateMissing",
                format!("reading {}: {e}", self.certificate_file.display()),
            )
        })?;
        let certificate = SignerCertificate::from_pem(&pem)
            .map_err(|e| unavailable("CertificateInvalid", e.to_string()))?;
        if !config.certificate_sha256.is_empty()
            && certificate.sha256() != config.certificate_sha256.to_ascii_lowercase()
        {
            return Err(unavailable(
                "CertificateMismatch",
                format!(
                    "{} has sha256 {}, gateway.yaml names {}",
                    self.certificate_file.display(),
                    certificate.sha256(),
                    config.certificate_sha256
                ),
            ));
        }
        let token_spki = token
            .public_key(&id)
            .map_err(|e| unavailable(e.reason(), e.to_string()))?;
        let cert_spki = certificate
            .spki_der()
            .map_err(|e| unavailable("CertificateInvalid", e.to_string()))?;
        if token_spki != cert_spki {
            return Err(unavailable(
                "CertificateDoesNotMatchKey",
                "the certificate certifies another key than the token's",
            ));
        }
        Ok(Session {
            token,
            key,
            certificate: Arc::new(certificate),
        })
    }

    /// Signs `composed` at `now` and frames it as `multipart/signed`.
    pub fn sign(&self, composed: &Composed, now: SystemTime) -> Result<Vec<u8>, SignerError> {
        let certificate = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.ensure_locked(&mut state)?;
            match state.session.as_ref() {
                Some(session) => session.certificate.clone(),
                None => return Err(unavailable("HsmSessionLost", "no session")),
            }
        };
        // Hashing the entity (up to 100 MB) happens outside the lock; only
        // the token call holds it.
        let result = smime::sign_detached(&composed.entity, &certificate, now, |data| {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.session.as_ref() {
                Some(session) => session
                    .token
                    .sign(session.key, certificate.algorithm(), data),
                None => Err(pec_core::hsm::HsmError::Unexpected(
                    "the HSM session was lost",
                )),
            }
        });
        match result {
            Ok(signature) => Ok(frame(composed, &signature)),
            Err(e) => {
                // A failed signature may mean a lost session (token removed,
                // HSM restarted): drop it so the next call logs in again.
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                state.session = None;
                let err = unavailable("SigningFailed", e.to_string());
                state.last_error = Some(err.clone());
                state.last_try = Some(Instant::now());
                Err(err)
            }
        }
    }

    /// The certificate of the generation in use, PEM-less DER, if loaded.
    pub fn certificate_der(&self) -> Option<Vec<u8>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.session.as_ref().map(|s| s.certificate.der().to_vec())
    }

    /// The generation `gateway.yaml` names.
    pub fn generation(&self) -> Option<i64> {
        self.config.as_ref().map(|c| c.generation)
    }
}

/// `composed` framed as `multipart/signed` with `signature`.
fn frame(composed: &Composed, signature: &[u8]) -> Vec<u8> {
    let boundary = format!("pec-signed-{}", &composed.message_id.len());
    let boundary = unique_boundary(&boundary, &composed.entity);
    smime::multipart_signed(&composed.headers, &composed.entity, signature, &boundary)
}

/// `composed` framed as [`Signer::sign`] frames it, with an empty signature
/// and no token call: what the benchmark's unsecured gateway emits (see
/// [`crate::gateway::unsecured_requested`]).
#[cfg(feature = "bench-floor")]
pub fn frame_unsigned(composed: &Composed) -> Vec<u8> {
    frame(composed, &[])
}

/// A boundary that does not occur in `entity`.
fn unique_boundary(seed: &str, entity: &[u8]) -> String {
    let mut n: u64 = entity.len() as u64;
    loop {
        let candidate = format!("{seed}-{n:x}");
        let needle = format!("--{candidate}");
        if !entity.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            return candidate;
        }
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
}
