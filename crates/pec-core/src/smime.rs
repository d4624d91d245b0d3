//! S/MIME `multipart/signed` messages (RFC 8551) whose detached CMS
//! SignedData signature (RFC 5652) is made by a key that never leaves the
//! HSM, and their verification against a set of trusted certificates.
//!
//! Everything a PEC provider emits (receipts, notices, envelopes) is such a
//! message. Signing takes the signer's certificate and a signing function
//! (the token's `sign`), so this module holds no key and no session.
//! Verification takes the certificates the caller trusts (the providers'
//! index) and accepts a signature only if its signer certificate is one of
//! them, byte for byte: the index lists certificates, not CAs.
//!
//! The CMS structures come from the RustCrypto `cms` crate; signature
//! checks use `ring`. The MIME handled here is only the `multipart/signed`
//! frame: the signed entity inside is opaque bytes, signed and verified
//! exactly as they stand (in canonical CRLF form).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use cms::{
    cert::{CertificateChoices, IssuerAndSerialNumber},
    content_info::{CmsVersion, ContentInfo},
    signed_data::{
        CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo,
        SignerInfos,
    },
};
use der::{
    Any, Decode, Encode,
    asn1::{ObjectIdentifier, OctetString, SetOfVec, UtcTime},
};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use x509_cert::{Certificate, attr::Attribute};

use crate::{der::hex, hsm::Algorithm};

const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SIGNING_TIME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.5");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

/// Why signing or verifying failed. Carries no key material.
#[derive(Debug, thiserror::Error)]
pub enum SmimeError {
    /// DER that does not decode, or a structure that is not what S/MIME wants.
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    /// The signing call failed (the token's error is the source).
    #[error("signing in the token failed: {0}")]
    Sign(#[source] crate::hsm::HsmError),
    /// The signer's certificate is not among the trusted ones.
    #[error("signer certificate (sha256 {0}) is not in the providers' index")]
    UnknownSigner(String),
    /// The content was changed after signing.
    #[error("message digest does not match the content: the message was altered")]
    DigestMismatch,
    /// The signature does not verify with the signer's public key.
    #[error("signature does not verify with the signer's certificate")]
    BadSignature,
    /// The certificate was not valid when the message says it was signed.
    #[error("signer certificate was not valid at the signing time")]
    CertificateNotValid,
}

impl SmimeError {
    /// A short, bounded reason for metrics, logs and notices.
    pub fn reason(&self) -> &'static str {
        match self {
            SmimeError::Malformed { .. } => "Malformed",
            SmimeError::Sign(_) => "SigningFailed",
            SmimeError::UnknownSigner(_) => "UnknownSigner",
            SmimeError::DigestMismatch => "Tampered",
            SmimeError::BadSignature => "BadSignature",
            SmimeError::CertificateNotValid => "CertificateNotValid",
        }
    }
}

fn malformed(what: &'static str) -> impl FnOnce(der::Error) -> SmimeError {
    move |e| SmimeError::Malformed {
        what,
        detail: e.to_string(),
    }
}

/// A signer certificate, parsed once and reused for every message.
#[derive(Clone)]
pub struct SignerCertificate {
    der: Vec<u8>,
    cert: Certificate,
    algorithm: Algorithm,
}

impl SignerCertificate {
    /// Parses a DER certificate whose key signs with `algorithm`.
    pub fn from_der(der: &[u8], algorithm: Algorithm) -> Result<Self, SmimeError> {
        let cert = Certificate::from_der(der).map_err(malformed("certificate"))?;
        Ok(Self {
            der: der.to_vec(),
            cert,
            algorithm,
        })
    }

    /// Parses the first certificate of a PEM text; the algorithm is read
    /// from its public key.
    pub fn from_pem(pem: &str) -> Result<Self, SmimeError> {
        let der = pem_certificates(pem)
            .into_iter()
            .next()
            .ok_or(SmimeError::Malformed {
                what: "certificate",
                detail: "no CERTIFICATE block in the PEM text".into(),
            })?;
        let cert = Certificate::from_der(&der).map_err(malformed("certificate"))?;
        let algorithm = key_algorithm(&cert)?;
        Ok(Self {
            der,
            cert,
            algorithm,
        })
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// SHA-256 of the DER certificate, lowercase hex.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.der))
    }

    /// The key algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The DER SubjectPublicKeyInfo of the certified key (to compare with
    /// the token's public key).
    pub fn spki_der(&self) -> Result<Vec<u8>, SmimeError> {
        self.cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(malformed("public key"))
    }
}

fn key_algorithm(cert: &Certificate) -> Result<Algorithm, SmimeError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid == EC_PUBLIC_KEY {
        Ok(Algorithm::EcdsaP256)
    } else if spki.algorithm.oid == RSA_ENCRYPTION {
        // The modulus length decides between the two RSA sizes; for signing
        // and verifying both behave the same.
        Ok(Algorithm::Rsa3072)
    } else {
        Err(SmimeError::Malformed {
            what: "certificate",
            detail: format!("unsupported public key algorithm {}", spki.algorithm.oid),
        })
    }
}

/// Every `CERTIFICATE` block of a PEM text, as DER. Other blocks and text
/// between them are skipped.
pub fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let after = &rest[start + BEGIN.len()..];
        let Some(end) = after.find(END) else { break };
        let body: String = after[..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[end + END.len()..];
    }
    out
}

fn algorithm_id(oid: ObjectIdentifier) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid,
        parameters: None,
    }
}

fn attribute(oid: ObjectIdentifier, value: Any) -> Result<Attribute, SmimeError> {
    let mut values = SetOfVec::new();
    values
        .insert(value)
        .map_err(malformed("signed attribute"))?;
    Ok(Attribute { oid, values })
}

/// A detached CMS SignedData (DER) over `content`, signed at `now` by the
/// key behind `sign` whose certificate is `signer`. `sign` gets the DER of
/// the signed attributes and returns the signature as X.509 wants it (DER
/// ECDSA-Sig-Value, or the RSA PKCS#1 v1.5 block), which is what
/// [`crate::hsm::Token::sign`] returns.
pub fn sign_detached(
    content: &[u8],
    signer: &SignerCertificate,
    now: SystemTime,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, crate::hsm::HsmError>,
) -> Result<Vec<u8>, SmimeError> {
    let digest = Sha256::digest(content);
    let signing_time = UtcTime::from_system_time(now).map_err(malformed("signing time"))?;
    let mut signed_attrs = SetOfVec::new();
    for attr in [
        attribute(
            ID_CONTENT_TYPE,
            Any::encode_from(&ID_DATA).map_err(malformed("content type"))?,
        )?,
        attribute(
            ID_SIGNING_TIME,
            Any::encode_from(&signing_time).map_err(malformed("signing time"))?,
        )?,
        attribute(
            ID_MESSAGE_DIGEST,
            Any::encode_from(&OctetString::new(digest.to_vec()).map_err(malformed("digest"))?)
                .map_err(malformed("digest"))?,
        )?,
    ] {
        signed_attrs
            .insert(attr)
            .map_err(malformed("signed attributes"))?;
    }
    // The signature covers the attributes DER-encoded as a SET (tag 0x31),
    // not as the [0] IMPLICIT they travel in (RFC 5652, 5.4).
    let to_sign = signed_attrs
        .to_der()
        .map_err(malformed("signed attributes"))?;
    let signature = sign(&to_sign).map_err(SmimeError::Sign)?;
    let signature_algorithm = match signer.algorithm {
        Algorithm::EcdsaP256 => ECDSA_WITH_SHA256,
        Algorithm::Rsa3072 | Algorithm::Rsa2048 => SHA256_WITH_RSA,
    };
    let tbs = &signer.cert.tbs_certificate;
    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: tbs.issuer.clone(),
            serial_number: tbs.serial_number.clone(),
        }),
        digest_alg: algorithm_id(ID_SHA256),
        signed_attrs: Some(signed_attrs),
        signature_algorithm: algorithm_id(signature_algorithm),
        signature: OctetString::new(signature).map_err(malformed("signature"))?,
        unsigned_attrs: None,
    };
    let mut digest_algorithms = SetOfVec::new();
    digest_algorithms
        .insert(algorithm_id(ID_SHA256))
        .map_err(malformed("digest algorithms"))?;
    let mut certificates = SetOfVec::new();
    certificates
        .insert(CertificateChoices::Certificate(signer.cert.clone()))
        .map_err(malformed("certificates"))?;
    let mut signer_infos = SetOfVec::new();
    signer_infos
        .insert(signer_info)
        .map_err(malformed("signer infos"))?;
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(certificates)),
        crls: None,
        signer_infos: SignerInfos(signer_infos),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: Any::encode_from(&signed_data).map_err(malformed("signed data"))?,
    }
    .to_der()
    .map_err(malformed("content info"))
}

/// What a verified signature says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// SHA-256 of the signer's certificate, lowercase hex.
    pub signer_sha256: String,
    /// The signing time the signer claims.
    pub signing_time: Option<SystemTime>,
}

/// Certificates a verifier trusts: the providers' index.
#[derive(Debug, Clone, Default)]
pub struct TrustedSigners {
    certificates: Vec<Vec<u8>>,
}

impl TrustedSigners {
    /// Trusts every certificate in `pem` (several PEM texts may be added).
    pub fn add_pem(&mut self, pem: &str) -> usize {
        let found = pem_certificates(pem);
        let n = found.len();
        for der in found {
            if !self.certificates.contains(&der) {
                self.certificates.push(der);
            }
        }
        n
    }

    /// How many certificates are trusted.
    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }

    fn trusts(&self, der: &[u8]) -> bool {
        self.certificates.iter().any(|c| c == der)
    }
}

/// Verifies a detached CMS SignedData `signature` over `content`: the
/// signer's certificate must be in `trusted`, valid at the signing time, the
/// digest must match the content and the signature must verify.
pub fn verify_detached(
    content: &[u8],
    signature: &[u8],
    trusted: &TrustedSigners,
) -> Result<Verified, SmimeError> {
    let info = ContentInfo::from_der(signature).map_err(malformed("CMS content info"))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(SmimeError::Malformed {
            what: "CMS content info",
            detail: format!("content type {} is not signed-data", info.content_type),
        });
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(malformed("CMS signed data"))?;
    let signer = signed
        .signer_infos
        .0
        .iter()
        .next()
        .ok_or(SmimeError::Malformed {
            what: "CMS signed data",
            detail: "no signer".into(),
        })?;
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &signer.sid else {
        return Err(SmimeError::Malformed {
            what: "CMS signer",
            detail: "signer identified by key id, not issuer and serial".into(),
        });
    };
    let cert = signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .find_map(|c| match c {
            CertificateChoices::Certificate(c)
                if c.tbs_certificate.issuer == sid.issuer
                    && c.tbs_certificate.serial_number == sid.serial_number =>
            {
                Some(c)
            }
            _ => None,
        })
        .ok_or(SmimeError::Malformed {
            what: "CMS signed data",
            detail: "the signer's certificate is not in the message".into(),
        })?;
    let cert_der = cert.to_der().map_err(malformed("certificate"))?;
    let signer_sha256 = hex(&Sha256::digest(&cert_der));
    if !trusted.trusts(&cert_der) {
        return Err(SmimeError::UnknownSigner(signer_sha256));
    }
    let attrs = signer.signed_attrs.as_ref().ok_or(SmimeError::Malformed {
        what: "CMS signer",
        detail: "no signed attributes".into(),
    })?;
    let mut digest = None;
    let mut signing_time = None;
    for attr in attrs.iter() {
        let Some(value) = attr.values.iter().next() else {
            continue;
        };
        if attr.oid == ID_MESSAGE_DIGEST {
            digest = Some(
                value
                    .decode_as::<OctetString>()
                    .map_err(malformed("message digest"))?,
            );
        } else if attr.oid == ID_SIGNING_TIME {
            signing_time = value
                .decode_as::<UtcTime>()
                .ok()
                .map(|t| t.to_system_time());
        }
    }
    let digest = digest.ok_or(SmimeError::Malformed {
        what: "CMS signer",
        detail: "no message digest".into(),
    })?;
    if digest.as_bytes() != Sha256::digest(content).as_slice() {
        return Err(SmimeError::DigestMismatch);
    }
    if let Some(at) = signing_time {
        let validity = &cert.tbs_certificate.validity;
        // A minute of slack for clocks that differ by less than that.
        let slack = Duration::from_secs(60);
        if at + slack < validity.not_before.to_system_time()
            || at > validity.not_after.to_system_time() + slack
        {
            return Err(SmimeError::CertificateNotValid);
        }
    }
    let signed_bytes = attrs.to_der().map_err(malformed("signed attributes"))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let public = spki.subject_public_key.raw_bytes();
    let algorithm: &dyn ring::signature::VerificationAlgorithm = if signer.signature_algorithm.oid
        == ECDSA_WITH_SHA256
        && spki.algorithm.oid == EC_PUBLIC_KEY
    {
        &ring::signature::ECDSA_P256_SHA256_ASN1
    } else if spki.algorithm.oid == RSA_ENCRYPTION
        && (signer.signature_algorithm.oid == SHA256_WITH_RSA
            || signer.signature_algorithm.oid == RSA_ENCRYPTION)
    {
        &ring::signature::RSA_PKCS1_2048_8192_SHA256
    } else {
        return Err(SmimeError::Malformed {
            what: "CMS signer",
            detail: format!(
                "unsupported signature algorithm {}",
                signer.signature_algorithm.oid
            ),
        });
    };
    ring::signature::UnparsedPublicKey::new(algorithm, public)
        .verify(&signed_bytes, signer.signature.as_bytes())
        .map_err(|_| SmimeError::BadSignature)?;
    Ok(Verified {
        signer_sha256,
        signing_time,
    })
}

/// A `multipart/signed` message: `headers` (the outer header lines, each
/// ending in CRLF, without Content-Type and MIME-Version), the signed
/// `entity` (a MIME entity in canonical CRLF form) and its detached CMS
/// `signature`.
pub fn multipart_signed(headers: &str, entity: &[u8], signature: &[u8], boundary: &str) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(signature);
    let mut out = Vec::with_capacity(headers.len() + entity.len() + b64.len() + 512);
    out.extend_from_slice(headers.as_bytes());
    out.extend_from_slice(
        format!(
            "MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=\"sha-256\"; boundary=\"{boundary}\"\r\n\r\nThis is an S/MIME signed message\r\n\r\n--{boundary}\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(entity);
    out.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"smime.p7s\"\r\n\r\n"
        )
        .as_bytes(),
    );
    for line in b64.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The parts of a `multipart/signed` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedParts<'a> {
    /// The outer header block, up to (not including) the blank line.
    pub headers: &'a [u8],
    /// The signed entity, exactly as signed.
    pub entity: &'a [u8],
    /// The decoded detached signature.
    pub signature: Vec<u8>,
}

/// Splits a `multipart/signed` message into its signed entity and its
/// signature. `None` if the message is not one (or is broken).
pub fn split_signed(message: &[u8]) -> Option<SignedParts<'_>> {
    let header_end = find(message, b"\r\n\r\n")?;
    let headers = &message[..header_end];
    let boundary = signed_boundary(headers)?;
    let delimiter = [b"--", boundary.as_bytes()].concat();
    let body = &message[header_end + 4..];
    let first = find_delimiter(body, &delimiter, 0)?;
    let entity_start = first + delimiter.len() + 2;
    if body.get(first + delimiter.len()..entity_start)? != b"\r\n" {
        return None;
    }
    let second = find_delimiter(body, &delimiter, entity_start)?;
    // The CRLF before a delimiter belongs to the delimiter (RFC 2046).
    let entity = body.get(entity_start..second.checked_sub(2)?)?;
    let sig_part = &body[second + delimiter.len()..];
    let sig_part = sig_part.strip_prefix(b"\r\n")?;
    let sig_body_start = find(sig_part, b"\r\n\r\n")? + 4;
    let sig_headers = String::from_utf8_lossy(&sig_part[..sig_body_start]).to_ascii_lowercase();
    if !sig_headers.contains("pkcs7-signature") {
        return None;
    }
    let end = find_delimiter(sig_part, &delimiter, sig_body_start)?;
    let b64: Vec<u8> = sig_part[sig_body_start..end]
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let signature = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(SignedParts {
        headers,
        entity,
        signature,
    })
}

/// The boundary of a `multipart/signed` Content-Type among `headers`.
fn signed_boundary(headers: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(headers);
    // Unfold continuation lines first (RFC 5322, 2.2.3).
    let unfolded = text.replace("\r\n ", " ").replace("\r\n\t", " ");
    let line = unfolded
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))?;
    let lower = line.to_ascii_lowercase();
    if !lower.contains("multipart/signed") {
        return None;
    }
    let at = lower.find("boundary=")? + "boundary=".len();
    let rest = &line[at..];
    let value = if let Some(quoted) = rest.strip_prefix('"') {
        &quoted[..quoted.find('"')?]
    } else {
        rest.split([';', ' ', '\t']).next()?
    };
    (!value.is_empty()).then(|| value.to_string())
}

/// The offset of the next `delimiter` at the start of a line, from `from`.
fn find_delimiter(body: &[u8], delimiter: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(i) = find(body.get(at..)?, delimiter) {
        let pos = at + i;
        if pos == 0 || body[..pos].ends_with(b"\r\n") {
            return Some(pos);
        }
        at = pos + 1;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Converts bare LF line ends to CRLF (the canonical form signatures cover),
/// leaving existing CRLF alone.
pub fn canonical_crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 32);
    let mut prev = 0u8;
    for &b in text {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_what_it_frames() {
        let entity = b"Content-Type: text/plain\r\n\r\nhello\r\n";
        let msg = multipart_signed("Subject: x\r\n", entity, b"\x30\x03\x02\x01\x01", "b1");
        let parts = split_signed(&msg).expect("a signed message");
        assert_eq!(parts.entity, entity);
        assert_eq!(parts.signature, b"\x30\x03\x02\x01\x01");
        assert_eq!(parts.headers, b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=\"sha-256\"; boundary=\"b1\"");
    }

    #[test]
    fn a_plain_message_is_not_signed() {
        assert!(split_signed(b"Subject: x\r\nContent-Type: text/plain\r\n\r\nhi\r\n").is_none());
        assert!(split_signed(b"garbage").is_none());
        assert!(split_signed(b"").is_none());
    }

    #[test]
    fn a_delimiter_inside_a_line_does_not_split() {
        let entity = b"Content-Type: text/plain\r\n\r\nsee --b1 here\r\n";
        let msg = multipart_signed("", entity, b"sig", "b1");
        assert_eq!(split_signed(&msg).expect("signed").entity, entity);
    }

    #[test]
    fn canonical_form_adds_cr_only_where_missing() {
        assert_eq!(canonical_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn pem_blocks_are_all_read() {
        let pem = "x\n-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nAwQ=\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_certificates(pem), vec![vec![0, 1, 2], vec![3, 4]]);
    }
}
