//! The little DER this operator needs around a PKCS#11 token: ECDSA
//! signatures (tokens return `r || s`, X.509 wants a DER SEQUENCE of two
//! INTEGERs) and SubjectPublicKeyInfo for EC P-256 and RSA public keys.

/// OID 1.2.840.10045.2.1 (id-ecPublicKey).
const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// OID 1.2.840.10045.3.1.7 (prime256v1), as a complete DER OBJECT IDENTIFIER.
pub const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// OID 1.2.840.113549.1.1.1 (rsaEncryption).
const RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const NULL: &[u8] = &[0x05, 0x00];

/// One DER element: tag, length, contents.
pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// A DER INTEGER for an unsigned big-endian magnitude.
pub fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = match magnitude.iter().position(|b| *b != 0) {
        Some(i) => &magnitude[i..],
        None => &[0],
    };
    let mut contents = Vec::with_capacity(trimmed.len() + 1);
    if trimmed[0] & 0x80 != 0 {
        contents.push(0);
    }
    contents.extend_from_slice(trimmed);
    tlv(0x02, &contents)
}

fn sequence(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// The DER `ECDSA-Sig-Value` of a raw `r || s` signature.
pub fn ecdsa_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(sequence(&[&unsigned_integer(r), &unsigned_integer(s)]))
}

/// The SubjectPublicKeyInfo of a P-256 key, from the token's `CKA_EC_POINT`
/// (a DER OCTET STRING holding the uncompressed point, or the bare point).
pub fn ec_p256_spki(ec_point: &[u8]) -> Option<Vec<u8>> {
    let point = match ec_point {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        [0x04, ..] if ec_point.len() == 65 => ec_point,
        _ => return None,
    };
    let mut bits = vec![0u8];
    bits.extend_from_slice(point);
    Some(sequence(&[
        &sequence(&[EC_PUBLIC_KEY, P256_PARAMS]),
        &tlv(0x03, &bits),
    ]))
}

/// The SubjectPublicKeyInfo of an RSA key from its modulus and exponent.
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let key = sequence(&[&unsigned_integer(modulus), &unsigned_integer(exponent)]);
    let mut bits = vec![0u8];
    bits.extend(key);
    sequence(&[&sequence(&[RSA_ENCRYPTION, NULL]), &tlv(0x03, &bits)])
}

/// PEM text of DER `der` with `label` (for tools such as openssl).
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lowercase or uppercase hex; `None` if it is not hex (an odd
/// length included).
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(unsigned_integer(&[0x00, 0x00, 0x7f]), [0x02, 0x01, 0x7f]);
        assert_eq!(unsigned_integer(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(unsigned_integer(&[0, 0]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn long_lengths_use_the_long_form() {
        let t = tlv(0x04, &[0u8; 300]);
        assert_eq!(&t[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn ecdsa_raw_signature_becomes_a_der_sequence() {
        let mut raw = vec![0x80; 32];
        raw.extend(vec![0x01; 32]);
        let der = ecdsa_signature(&raw).expect("even length");
        assert_eq!(der[0], 0x30);
        assert_eq!(&der[2..5], &[0x02, 0x21, 0x00]); // r gets a leading zero
        assert_eq!(der.len(), 2 + 35 + 34);
        assert!(ecdsa_signature(&[1, 2, 3]).is_none());
    }

    #[test]
    fn p256_spki_accepts_wrapped_or_bare_points() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&point);
        let a = ec_p256_spki(&wrapped).expect("wrapped");
        assert_eq!(a, ec_p256_spki(&point).expect("bare"));
        assert_eq!(a.len(), 91);
        assert!(ec_p256_spki(&[0x04, 0x01]).is_none());
    }

    #[test]
    fn pem_wraps_base64() {
        assert_eq!(
            pem("X", b"Man"),
            "-----BEGIN X-----\nTWFu\n-----END X-----\n"
        );
        assert_eq!(
            pem("X", b"Ma"),
            "-----BEGIN X-----\nTWE=\n-----END X-----\n"
        );
    }
}
