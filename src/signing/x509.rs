//! Certificates, CSRs and CRLs for keys that stay inside the HSM.
//!
//! rcgen builds the structures; every signature by a SigningKey's own key is
//! made in the token through [`HsmSigner`] (rcgen's remote-key interface).
//! Only the `ca` issuer's key, which the user supplies in a Secret, signs in
//! process. Parsing uses x509-parser.

use chrono::{DateTime, Utc};
use cryptoki::object::ObjectHandle;
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    RevokedCertParams, SerialNumber, SignatureAlgorithm,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, SubjectPublicKeyInfo, X509Certificate};

use crate::api::{RevocationReason, Subject};
use crate::hsm::{Algorithm, Token};

/// Why a certificate operation failed. Carries no key material.
#[derive(Debug, thiserror::Error)]
pub enum X509Error {
    /// rcgen refused the parameters or the signature failed.
    #[error("building {what}: {source}")]
    Build {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// Input that is not what it should be (named, never echoed).
    #[error("{0}")]
    Invalid(String),
}

fn build(what: &'static str) -> impl FnOnce(rcgen::Error) -> X509Error {
    move |source| X509Error::Build { what, source }
}

/// A key in the token, as rcgen sees it: public data plus a signing call.
pub struct HsmSigner<'a> {
    token: &'a Token,
    key: ObjectHandle,
    algorithm: Algorithm,
    public_bits: Vec<u8>,
}

impl<'a> HsmSigner<'a> {
    /// `spki` is the key's DER SubjectPublicKeyInfo as the token reports it.
    pub fn new(
        token: &'a Token,
        key: ObjectHandle,
        algorithm: Algorithm,
        spki: &[u8],
    ) -> Result<Self, X509Error> {
        let (_, info) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|_| X509Error::Invalid("the token's public key does not parse".into()))?;
        Ok(Self {
            token,
            key,
            algorithm,
            public_bits: info.subject_public_key.data.to_vec(),
        })
    }
}

fn signature_algorithm(algorithm: Algorithm) -> &'static SignatureAlgorithm {
    match algorithm {
        Algorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        Algorithm::Rsa3072 | Algorithm::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    }
}

impl PublicKeyData for HsmSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_bits
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        signature_algorithm(self.algorithm)
    }
}

impl rcgen::SigningKey for HsmSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.token
            .sign(self.key, self.algorithm, msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// What a certificate says, as the controller records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// PEM text.
    pub pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    /// Validity start.
    pub not_before: DateTime<Utc>,
    /// Expiry.
    pub not_after: DateTime<Utc>,
    /// DER SubjectPublicKeyInfo of the certified key.
    pub spki: Vec<u8>,
}

pub use crate::hsm::der::{from_hex, hex};

fn odt(t: DateTime<Utc>) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Parses the first certificate of a PEM text.
pub fn parse_certificate(pem_text: &str) -> Result<CertInfo, X509Error> {
    let bad = |what: &str| X509Error::Invalid(format!("tls.crt is not a PEM certificate: {what}"));
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|_| bad("no PEM block"))?;
    let (_, cert) = X509Certificate::from_der(&pem.contents).map_err(|_| bad("bad DER"))?;
    let time = |t: i64| DateTime::from_timestamp(t, 0).ok_or_else(|| bad("validity out of range"));
    Ok(CertInfo {
        pem: crate::hsm::der::pem("CERTIFICATE", &pem.contents),
        serial: hex(cert.raw_serial()),
        fingerprint: hex(&Sha256::digest(&pem.contents)),
        not_before: time(cert.validity().not_before.timestamp())?,
        not_after: time(cert.validity().not_after.timestamp())?,
        spki: cert.public_key().raw.to_vec(),
    })
}

/// A positive serial number of 16 bytes, fixed by the key and the start of validity.
pub fn serial_for(key_id: &[u8], not_before: DateTime<Utc>) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(key_id);
    h.update(not_before.timestamp().to_be_bytes());
    let mut serial = h.finalize()[..16].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}

/// The parameters of a SigningKey's certificate: a leaf for signing
/// (digital signature and non-repudiation, e-mail protection).
pub fn leaf_params(
    subject: &Subject,
    dns_names: &[String],
    serial: Vec<u8>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
) -> Result<CertificateParams, X509Error> {
    let mut params = CertificateParams::new(dns_names.to_vec()).map_err(build("the names"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject.common_name.as_str());
    for (kind, value) in [
        (DnType::OrganizationName, &subject.organization),
        (DnType::OrganizationalUnitName, &subject.organizational_unit),
        (DnType::CountryName, &subject.country),
        (DnType::LocalityName, &subject.locality),
    ] {
        if let Some(v) = value {
            dn.push(kind, v.as_str());
        }
    }
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from(serial));
    params.not_before = odt(not_before);
    params.not_after = odt(not_after);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

/// A self-signed certificate, signed in the token.
pub fn self_signed(params: &CertificateParams, key: &HsmSigner) -> Result<String, X509Error> {
    let mut params = params.clone();
    params.use_authority_key_identifier_extension = false;
    Ok(params
        .self_signed(key)
        .map_err(build("a self-signed certificate"))?
        .pem())
}

/// A PKCS#10 CSR, signed in the token. The serial number and authority key
/// identifier are the CA's to choose, so they are left out.
pub fn csr(params: &CertificateParams, key: &HsmSigner) -> Result<String, X509Error> {
    let mut params = params.clone();
    params.serial_number = None;
    params.use_authority_key_identifier_extension = false;
    params
        .serialize_request(key)
        .map_err(build("a CSR"))?
        .pem()
        .map_err(build("a CSR"))
}

/// A CA supplied in a Secret (`tls.crt`, `tls.key`).
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    /// The CA's subject key identifier, which the CRL's authority key
    /// identifier must repeat for verifiers to match them.
    key_id: KeyIdMethod,
}

impl Ca {
    /// Reads the CA; errors name the Secret key that is wrong.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Self, X509Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| X509Error::Invalid("tls.key is not a PKCS#8 PEM private key".into()))?;
        let info = parse_certificate(cert_pem)?;
        if info.spki != key.subject_public_key_info() {
            return Err(X509Error::Invalid(
                "tls.crt and tls.key do not belong together".into(),
            ));
        }
        let key_id =
            subject_key_id(cert_pem).map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified);
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key,
            key_id,
        })
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, X509Error> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(build("the CA issuer"))
    }

    /// The leaf certificate for `public` (the HSM key), signed by the CA.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public: &HsmSigner,
    ) -> Result<String, X509Error> {
        Ok(params
            .signed_by(public, &self.issuer()?)
            .map_err(build("a CA-signed certificate"))?
            .pem())
    }

    /// The CA's CRL listing `revoked` (serial hex, revocation time, reason).
    pub fn crl(
        &self,
        revoked: &[(String, DateTime<Utc>, RevocationReason)],
        number: u64,
        now: DateTime<Utc>,
        next_update: DateTime<Utc>,
    ) -> Result<String, X509Error> {
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at, reason)| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from(from_hex(serial).ok_or_else(|| {
                        X509Error::Invalid(format!("serial {serial} is not hex"))
                    })?),
                    revocation_time: odt(*at),
                    reason_code: Some(rfc5280_reason(*reason)),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, X509Error>>()?;
        let params = CertificateRevocationListParams {
            this_update: odt(now),
            next_update: odt(next_update),
            crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_id.clone(),
        };
        params
            .signed_by(&self.issuer()?)
            .map_err(build("a CRL"))?
            .pem()
            .map_err(build("a CRL"))
    }
}

/// The subject key identifier of the certificate in `pem_text`, if it has one.
fn subject_key_id(pem_text: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).ok()?;
    let (_, cert) = X509Certificate::from_der(&pem.contents).ok()?;
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn rfc5280_reason(r: RevocationReason) -> rcgen::RevocationReason {
    match r {
        RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise => rcgen::RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
        RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "Test CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn serials_are_positive_and_stable() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
        let a = serial_for(b"id", t);
        assert_eq!(a, serial_for(b"id", t));
        assert_ne!(a, serial_for(b"id", t + chrono::Duration::seconds(1)));
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_eq!(from_hex(&hex(&a)), Some(a));
    }

    #[test]
    fn a_ca_signed_certificate_parses_back_and_a_mismatched_ca_is_named() {
        let (cert, key) = ca();
        let ca = Ca::new(&cert, &key).expect("ca");
        let info = parse_certificate(&cert).expect("parse");
        assert_eq!(info.fingerprint.len(), 64);
        let (_, other_key) = self::ca();
        let err = Ca::new(&cert, &other_key).err().expect("mismatch refused");
        assert!(err.to_string().contains("do not belong together"));
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("t");
        let crl = ca
            .crl(
                &[("0a0b".into(), now, RevocationReason::KeyCompromise)],
                1,
                now,
                now + chrono::Duration::hours(1),
            )
            .expect("crl");
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(parse_certificate("hello").is_err());
    }
}
