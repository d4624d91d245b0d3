//! Signing keys inside a PKCS#11 token (an HSM; SoftHSM2 in tests).
//!
//! Keys are generated in the token as token objects, sensitive and (unless
//! wrapped export is asked for) non-extractable, and found again by a
//! `CKA_ID` derived from the owning resource's UID and the key generation,
//! so a retried or repeated reconcile finds the key it already made instead
//! of making a second one. Private key material never leaves the token: this
//! module hands out public keys and signatures only. PINs are `SecretString`s
//! and are never formatted into errors or logs.
//!
//! PKCS#11 calls block; async callers run them on a blocking thread.

use std::{
    path::Path,
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags, Pkcs11},
    error::RvError,
    mechanism::Mechanism,
    object::{Attribute, AttributeType, KeyType, ObjectClass},
    session::{Session, UserType},
};
use sha2::{Digest, Sha256};

pub use crate::der;
/// A handle to an object in the token.
pub use cryptoki::object::ObjectHandle;
/// A PIN, kept in memory that is zeroed on drop and never formatted.
pub use cryptoki::types::AuthPin;

/// Token writes in flight in this process: each holds the read side.
/// SoftHSM2 rewrites a token's files in place, so a process that dies in
/// the middle of a write can leave the token unreadable to every process.
static WRITES: RwLock<()> = RwLock::new(());

fn writing() -> RwLockReadGuard<'static, ()> {
    WRITES.read().unwrap_or_else(|e| e.into_inner())
}

/// Waits until no token write of this process (a login, a key generated
/// or destroyed) is in flight, and holds new ones off while the guard
/// lives. A deliberate crash (the restart tests' crash points) takes it
/// first, so that what it interrupts is the reconcile, not a half-written
/// token file. Must not be called by a thread inside a token write.
pub fn quiesce() -> RwLockWriteGuard<'static, ()> {
    WRITES.write().unwrap_or_else(|e| e.into_inner())
}

/// Key algorithms the operator generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA on NIST P-256 with SHA-256.
    EcdsaP256,
    /// RSA 3072 with PKCS#1 v1.5 and SHA-256.
    Rsa3072,
    /// RSA 2048 (accepted for interoperability).
    Rsa2048,
}

/// Why an HSM operation failed. Never carries a PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("loading PKCS#11 module {module}: {source}")]
    Module {
        module: String,
        #[source]
        source: cryptoki::error::Error,
    },
    /// No token carries the label.
    #[error("no initialised token labelled {0:?}")]
    TokenNotFound(String),
    /// Logging in failed (wrong PIN, locked token).
    #[error("logging in to token {token:?} failed: {source}")]
    Login {
        token: String,
        #[source]
        source: cryptoki::error::Error,
    },
    /// A PKCS#11 call failed.
    #[error("{step} failed: {source}")]
    Call {
        step: &'static str,
        #[source]
        source: cryptoki::error::Error,
    },
    /// No private key carries the id.
    #[error("no private key with that id in the token")]
    KeyNotFound,
    /// The token returned something this module cannot use.
    #[error("unexpected token data: {0}")]
    Unexpected(&'static str),
}

impl HsmError {
    /// A short, bounded reason for conditions, metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            HsmError::Module { .. } => "HsmModuleUnavailable",
            HsmError::TokenNotFound(_) => "TokenNotFound",
            HsmError::Login { .. } => "HsmLoginFailed",
            HsmError::Call { .. } => "HsmCallFailed",
            HsmError::KeyNotFound => "KeyNotFound",
            HsmError::Unexpected(_) => "HsmUnexpectedData",
        }
    }
}

fn call(step: &'static str) -> impl FnOnce(cryptoki::error::Error) -> HsmError {
    move |source| HsmError::Call { step, source }
}

/// The `CKA_ID` of generation `generation` of the key owned by `uid`.
pub fn key_id(uid: &str, generation: u32) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(uid.as_bytes());
    h.update(generation.to_be_bytes());
    h.finalize()[..16].to_vec()
}

/// A loaded PKCS#11 module. Initialise once per process.
pub struct Hsm {
    ctx: Pkcs11,
    /// SHA-256 of the PIN each token was last logged in with. PKCS#11 login
    /// state belongs to the whole process: while one session is logged in,
    /// `C_Login` on another answers "already logged in" without looking at
    /// the PIN. Comparing with the PIN that did log in keeps a wrong PIN
    /// wrong even then (a token has one user PIN).
    logged_in: std::sync::Mutex<std::collections::HashMap<String, [u8; 32]>>,
}

impl Hsm {
    /// Loads and initialises the module at `module`.
    pub fn open(module: &Path) -> Result<Self, HsmError> {
        let err = |source| HsmError::Module {
            module: module.display().to_string(),
            source,
        };
        let ctx = Pkcs11::new(module).map_err(err)?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(err)?;
        Ok(Self {
            ctx,
            logged_in: std::sync::Mutex::default(),
        })
    }

    /// A logged-in read-write session on the token labelled `label` (by
    /// label, never by slot number: slot numbers change).
    pub fn login(&self, label: &str, pin: &AuthPin) -> Result<Token, HsmError> {
        // A token store shared by several processes (SoftHSM2's files) can
        // look empty or unreadable for a moment while another process
        // writes it: look again a few times before saying it is not there.
        let mut attempt = 0;
        let slot = loop {
            match self.find_slot(label) {
                Ok(slot) => break slot,
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
                }
                Err(e) => return Err(e),
            }
        };
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(call("opening a session"))?;
        let digest: [u8; 32] = {
            use secrecy::ExposeSecret as _;
            Sha256::digest(pin.expose_secret().as_bytes()).into()
        };
        let mut logged_in = self.logged_in.lock().unwrap_or_else(|e| e.into_inner());
        // A failed login rewrites the token's files.
        let login = {
            let _writing = writing();
            session.login(UserType::User, Some(pin))
        };
        match login {
            Ok(()) => {
                logged_in.insert(label.to_string(), digest);
            }
            // Another session of this process is logged in: the PIN was not
            // checked, so it must be the one that logged in.
            Err(source @ cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                if logged_in.get(label) != Some(&digest) {
                    return Err(HsmError::Login {
                        token: label.to_string(),
                        source,
                    });
                }
            }
            Err(source) => {
                return Err(HsmError::Login {
                    token: label.to_string(),
                    source,
                });
            }
        }
        Ok(Token { session })
    }
}

impl Hsm {
    /// The slot of the token labelled `label`. A token whose information
    /// cannot be read is passed over, not an error: SoftHSM2, for one,
    /// fails to read a token another process is rewriting (a failed login
    /// rewrites it), and that token must not hide the others. An
    /// uninitialised token has a blank label, so it never matches.
    fn find_slot(&self, label: &str) -> Result<cryptoki::slot::Slot, HsmError> {
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(call("listing slots"))?;
        slots
            .into_iter()
            .find(|s| {
                self.ctx
                    .get_token_info(*s)
                    .is_ok_and(|t| t.label().trim_end() == label)
            })
            .ok_or_else(|| HsmError::TokenNotFound(label.to_string()))
    }
}

impl Drop for Hsm {
    /// Finalizes the module, so opening it again (to recover from a lost
    /// token, or to see objects another process wrote) starts afresh
    /// instead of finding it already initialised.
    fn drop(&mut self) {
        let _ = self.ctx.clone().finalize();
    }
}

/// A logged-in session on one token.
pub struct Token {
    session: Session,
}

/// The protection attributes of a private key, as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// `CKA_TOKEN`: persistent in the token.
    pub token: bool,
    /// `CKA_SENSITIVE`: the value cannot be read in plaintext.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key can be wrapped out.
    pub extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
}

impl Token {
    fn find(&self, class: ObjectClass, id: &[u8]) -> Result<Vec<ObjectHandle>, HsmError> {
        self.session
            .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
            .map_err(call("finding objects"))
    }

    /// The private key with `id`, generating the pair if there is none.
    /// `extractable` allows wrapped export later (never plaintext).
    pub fn ensure_key(
        &self,
        id: &[u8],
        label: &str,
        algorithm: Algorithm,
        extractable: bool,
    ) -> Result<ObjectHandle, HsmError> {
        if let Some(existing) = self.find(ObjectClass::PRIVATE_KEY, id)?.into_iter().next() {
            return Ok(existing);
        }
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Private(private),
            ]
        };
        let mut public = common(false);
        public.push(Attribute::Verify(true));
        let mut private = common(true);
        private.extend([
            Attribute::Sign(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
        ]);
        let mechanism = match algorithm {
            Algorithm::EcdsaP256 => {
                public.push(Attribute::EcParams(der::P256_PARAMS.to_vec()));
                Mechanism::EccKeyPairGen
            }
            Algorithm::Rsa3072 | Algorithm::Rsa2048 => {
                let bits: u64 = if algorithm == Algorithm::Rsa3072 {
                    3072
                } else {
                    2048
                };
                public.push(Attribute::ModulusBits(bits.into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        let _writing = writing();
        let (_, private_key) = self
            .session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(call("generating a key pair"))?;
        Ok(private_key)
    }

    /// The existing private key with `id`, without generating one (what a
    /// gateway signs with: the operator made the key, the gateway only uses it).
    pub fn existing_key(&self, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        self.find(ObjectClass::PRIVATE_KEY, id)?
            .into_iter()
            .next()
            .ok_or(HsmError::KeyNotFound)
    }

    /// How many private-key objects carry `id` (a test and a guard: never more than one).
    pub fn count_keys(&self, id: &[u8]) -> Result<usize, HsmError> {
        Ok(self.find(ObjectClass::PRIVATE_KEY, id)?.len())
    }

    /// The protection attributes of `key`.
    pub fn protection(&self, key: ObjectHandle) -> Result<Protection, HsmError> {
        let attrs = self
            .session
            .get_attributes(
                key,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                ],
            )
            .map_err(call("reading key attributes"))?;
        let mut p = Protection {
            token: false,
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
        };
        for a in attrs {
            match a {
                Attribute::Token(v) => p.token = v,
                Attribute::Sensitive(v) => p.sensitive = v,
                Attribute::Extractable(v) => p.extractable = v,
                Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                Attribute::NeverExtractable(v) => p.never_extractable = v,
                _ => {}
            }
        }
        Ok(p)
    }

    /// The DER SubjectPublicKeyInfo of the key pair with `id`.
    pub fn public_key(&self, id: &[u8]) -> Result<Vec<u8>, HsmError> {
        let public = self
            .find(ObjectClass::PUBLIC_KEY, id)?
            .into_iter()
            .next()
            .ok_or(HsmError::Unexpected("no public key for the id"))?;
        let attrs = self
            .session
            .get_attributes(
                public,
                &[
                    AttributeType::KeyType,
                    AttributeType::EcPoint,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                ],
            )
            .map_err(call("reading the public key"))?;
        let (mut kind, mut point, mut modulus, mut exponent) = (None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => kind = Some(k),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        match kind {
            Some(k) if k == KeyType::EC => {
                point
                    .as_deref()
                    .and_then(der::ec_p256_spki)
                    .ok_or(HsmError::Unexpected(
                        "EC point is not an uncompressed P-256 point",
                    ))
            }
            Some(k) if k == KeyType::RSA => match (modulus, exponent) {
                (Some(m), Some(e)) => Ok(der::rsa_spki(&m, &e)),
                _ => Err(HsmError::Unexpected("RSA key without modulus or exponent")),
            },
            _ => Err(HsmError::Unexpected("unsupported key type")),
        }
    }

    /// Signs `message` with `key` inside the token: ECDSA over the SHA-256
    /// digest (tokens such as SoftHSM offer raw `CKM_ECDSA` only), returned
    /// DER-encoded as X.509 wants it; RSA with `CKM_SHA256_RSA_PKCS`.
    pub fn sign(
        &self,
        key: ObjectHandle,
        algorithm: Algorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        match algorithm {
            Algorithm::EcdsaP256 => {
                let digest = Sha256::digest(message);
                let raw = self
                    .session
                    .sign(&Mechanism::Ecdsa, key, &digest)
                    .map_err(call("signing"))?;
                der::ecdsa_signature(&raw).ok_or(HsmError::Unexpected("odd-length ECDSA signature"))
            }
            Algorithm::Rsa3072 | Algorithm::Rsa2048 => self
                .session
                .sign(&Mechanism::Sha256RsaPkcs, key, message)
                .map_err(call("signing")),
        }
    }

    /// The AES-256 key-encryption key labelled `label`, generated in the
    /// token if there is none: a token object, sensitive, never extractable,
    /// usable only to wrap and unwrap.
    pub fn ensure_kek(&self, label: &str) -> Result<ObjectHandle, HsmError> {
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(call("finding the key-encryption key"))?;
        if let Some(kek) = found.into_iter().next() {
            return Ok(kek);
        }
        let _writing = writing();
        self.session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::ValueLen(32.into()),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                ],
            )
            .map_err(call("generating the key-encryption key"))
    }

    /// The private key with `id`, wrapped under `kek` with AES key wrap
    /// (RFC 5649) inside the token. Keys generated non-extractable (export
    /// `Never`) refuse; there is no plaintext path at all.
    pub fn wrap(&self, kek: ObjectHandle, id: &[u8]) -> Result<Vec<u8>, HsmError> {
        let key = self
            .find(ObjectClass::PRIVATE_KEY, id)?
            .into_iter()
            .next()
            .ok_or(HsmError::Unexpected("no private key for the id"))?;
        self.session
            .wrap_key(&Mechanism::AesKeyWrapPad, kek, key)
            .map_err(call("wrapping the key"))
    }

    /// The restore half of [`Token::wrap`]: `wrapped` (a private key of
    /// `algorithm` wrapped under `kek`) unwrapped inside the token as a
    /// session key, sensitive and usable only to sign. A blob that was not
    /// wrapped under `kek` is refused by the token.
    pub fn unwrap_for_signing(
        &self,
        kek: ObjectHandle,
        wrapped: &[u8],
        algorithm: Algorithm,
    ) -> Result<ObjectHandle, HsmError> {
        let key_type = match algorithm {
            Algorithm::EcdsaP256 => KeyType::EC,
            Algorithm::Rsa3072 | Algorithm::Rsa2048 => KeyType::RSA,
        };
        self.session
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                kek,
                wrapped,
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(key_type),
                    Attribute::Token(false),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                ],
            )
            .map_err(call("unwrapping the key"))
    }

    /// Whether the plaintext value of the private key with `id` can be read
    /// (it never should: keys are sensitive).
    pub fn plaintext_readable(&self, id: &[u8]) -> Result<bool, HsmError> {
        let key = self
            .find(ObjectClass::PRIVATE_KEY, id)?
            .into_iter()
            .next()
            .ok_or(HsmError::Unexpected("no private key for the id"))?;
        let kind = self
            .session
            .get_attributes(key, &[AttributeType::KeyType])
            .map_err(call("reading the key type"))?;
        let secret = if kind.contains(&Attribute::KeyType(KeyType::EC)) {
            AttributeType::Value
        } else {
            AttributeType::PrivateExponent
        };
        Ok(self
            .session
            .get_attributes(key, &[secret])
            .is_ok_and(|a| !a.is_empty()))
    }

    /// Destroys the key pair with `id`; already gone counts as done.
    pub fn destroy(&self, id: &[u8]) -> Result<(), HsmError> {
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for handle in self.find(class, id)? {
                let _writing = writing();
                self.session
                    .destroy_object(handle)
                    .map_err(call("destroying a key"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_stable_per_owner_and_generation() {
        assert_eq!(key_id("uid-1", 1), key_id("uid-1", 1));
        assert_ne!(key_id("uid-1", 1), key_id("uid-1", 2));
        assert_ne!(key_id("uid-1", 1), key_id("uid-2", 1));
        assert_eq!(key_id("uid-1", 1).len(), 16);
    }
}
