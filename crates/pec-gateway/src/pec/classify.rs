//! What arrived at the incoming point: a transport envelope, a receipt, or
//! an anomaly (anything else, to be wrapped in an anomaly envelope).
//!
//! A message counts as PEC only if it is `multipart/signed`, its signature
//! verifies with a certificate of the providers' index, and its signed
//! `daticert.xml` agrees with the outer headers. The outer headers are not
//! signed, so the kind is taken from the signed certification data.

use std::ops::Range;

use mail_parser::{Message, MessageParser, MimeHeaders};
use pec_core::smime::{self, TrustedSigners, Verified};

use super::compose::header;
use super::daticert::{Daticert, Tipo};

/// What an incoming message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A valid transport envelope from another provider.
    Envelope {
        /// Its certification data.
        daticert: Daticert,
        /// The signature.
        signer: Verified,
    },
    /// A valid receipt or notice.
    Receipt {
        /// Its certification data (the kind is `daticert.tipo`).
        daticert: Daticert,
        /// The signature.
        signer: Verified,
        /// Where the attached original (`postacert.eml` of a complete
        /// delivery receipt) stands in the message, when it stands there
        /// byte for byte (an attached message not transfer-encoded).
        original: Option<Range<usize>>,
    },
    /// Not a valid PEC message.
    Anomaly {
        /// Why, for the anomaly envelope and the log.
        reason: String,
        /// A bounded reason for metrics.
        code: &'static str,
    },
}

/// The sender, subject and Message-ID of any message, for logs and anomaly
/// envelopes (empty where the message has none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The first From address.
    pub from: String,
    /// The subject.
    pub subject: String,
    /// The Message-ID, without brackets.
    pub message_id: String,
}

/// The summary of a message.
pub fn summary(message: &[u8]) -> Summary {
    let Some(parsed) = MessageParser::default().parse_headers(message) else {
        return Summary::default();
    };
    Summary {
        from: super::checks::addresses(&parsed, mail_parser::HeaderName::From)
            .into_iter()
            .next()
            .unwrap_or_default(),
        subject: parsed.subject().unwrap_or_default().to_string(),
        message_id: parsed.message_id().unwrap_or_default().to_string(),
    }
}

fn anomaly(code: &'static str, reason: impl Into<String>) -> Incoming {
    Incoming::Anomaly {
        reason: reason.into(),
        code,
    }
}

/// Whether `message` says it is a receipt or notice (an `X-Ricevuta`
/// header): only a hint, which [`classify`] checks against the signed
/// certification data.
pub fn claims_receipt(message: &[u8]) -> bool {
    MessageParser::default()
        .parse_headers(message)
        .is_some_and(|m| m.header_raw(header::RICEVUTA).is_some())
}

/// Classifies `message` against the providers' index.
pub fn classify(message: &[u8], trusted: &TrustedSigners) -> Incoming {
    classify_with(message, |entity, signature| {
        smime::verify_detached(entity, signature, trusted).map_err(|e| (e.reason(), e.to_string()))
    })
}

/// Classifies `message` as [`classify`] does but takes any signature, even
/// none, as valid: what the benchmark's unsecured gateway does (see
/// [`crate::gateway::unsecured_requested`]).
#[cfg(feature = "bench-floor")]
pub fn classify_unverified(message: &[u8]) -> Incoming {
    classify_with(message, |_, _| {
        Ok(Verified {
            signer_sha256: String::new(),
            signing_time: None,
        })
    })
}

/// Classifies `message`, with `verify` checking the signature over the
/// signed entity (failing with the anomaly's code and reason).
fn classify_with(
    message: &[u8],
    verify: impl FnOnce(&[u8], &[u8]) -> Result<Verified, (&'static str, String)>,
) -> Incoming {
    let Some(outer) = MessageParser::default().parse_headers(message) else {
        return anomaly("Malformed", "the message could not be parsed");
    };
    let trasporto = outer
        .header_raw(header::TRASPORTO)
        .map(|v| v.trim().to_ascii_lowercase());
    let ricevuta = outer
        .header_raw(header::RICEVUTA)
        .map(|v| v.trim().to_ascii_lowercase());
    let claimed: Tipo = match (trasporto.as_deref(), ricevuta.as_deref()) {
        (Some("posta-certificata"), None) => Tipo::PostaCertificata,
        (None, Some(kind)) => match kind.parse() {
            Ok(Tipo::PostaCertificata) | Err(_) => {
                return anomaly("UnknownKind", format!("unknown receipt kind {kind:?}"));
            }
            Ok(t) => t,
        },
        (None, None) => {
            return anomaly(
                "NotPec",
                "not a certified message (no X-Trasporto or X-Ricevuta)",
            );
        }
        _ => {
            return anomaly(
                "UnknownKind",
                "contradictory or unknown X-Trasporto/X-Ricevuta headers",
            );
        }
    };
    let Some(parts) = smime::split_signed(message) else {
        return anomaly("NotSigned", "not an S/MIME signed message");
    };
    let signer = match verify(parts.entity, &parts.signature) {
        Ok(v) => v,
        Err((code, reason)) => return anomaly(code, reason),
    };
    let Some(entity) = MessageParser::default().parse(parts.entity) else {
        return anomaly("Malformed", "the signed part could not be parsed");
    };
    let Some(xml) = attachment(&entity, "daticert.xml") else {
        return anomaly("NoDaticert", "no daticert.xml in the signed part");
    };
    let daticert = match std::str::from_utf8(xml)
        .map_err(|e| e.to_string())
        .and_then(|x| Daticert::from_xml(x).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => return anomaly("BadDaticert", format!("daticert.xml: {e}")),
    };
    if daticert.tipo != claimed {
        return anomaly(
            "KindMismatch",
            format!(
                "headers say {} but the signed certification data says {}",
                claimed.as_str(),
                daticert.tipo.as_str()
            ),
        );
    }
    if claimed == Tipo::PostaCertificata {
        if attachment(&entity, "postacert.eml").is_none() {
            return anomaly("NoOriginal", "transport envelope without postacert.eml");
        }
        Incoming::Envelope { daticert, signer }
    } else {
        let original = attachment(&entity, "postacert.eml").and_then(|a| within(message, a));
        Incoming::Receipt {
            daticert,
            signer,
            original,
        }
    }
}

/// Where `part` stands in `whole`, if it is a slice of it (not a decoded
/// copy).
fn within(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    // Addresses compared as numbers: no pointer is dereferenced.
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// The bytes of the attachment named `name`.
pub fn attachment<'a>(entity: &'a Message<'a>, name: &str) -> Option<&'a [u8]> {
    entity.attachments().find_map(|a| {
        (a.attachment_name() == Some(name)).then(|| match a.message() {
            // An attached message: its raw bytes as they stand in the entity.
            Some(m) => m.raw_message(),
            None => a.contents(),
        })
    })
}

/// The original message (`postacert.eml`) of a transport envelope.
pub fn original(envelope: &[u8]) -> Option<Vec<u8>> {
    let parts = smime::split_signed(envelope)?;
    let entity = MessageParser::default().parse(parts.entity)?;
    attachment(&entity, "postacert.eml").map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ENVELOPE: &str = "From: posta-certificata@pec.a.it\r\nX-Trasporto: posta-certificata\r\nMIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=\"sha-256\"; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\nciao\r\n--m\r\nContent-Type: application/xml\r\nContent-Disposition: attachment; filename=\"daticert.xml\"\r\n\r\n<postacert tipo=\"posta-certificata\" errore=\"nessuno\"/>\r\n--m--\r\n\r\n--b\r\nContent-Type: application/pkcs7-signature; name=\"smime.p7s\"\r\nContent-Transfer-Encoding: base64\r\n\r\nMIIBAAYJ\r\n\r\n--b--\r\n";

    #[test]
    fn an_unsigned_message_is_an_anomaly_with_its_reason() {
        let plain = b"From: a@b.it\r\nSubject: x\r\n\r\nhi\r\n";
        assert!(matches!(
            classify(plain, &TrustedSigners::default()),
            Incoming::Anomaly { code: "NotPec", .. }
        ));
        let claimed = b"From: a@b.it\r\nX-Trasporto: posta-certificata\r\n\r\nhi\r\n";
        assert!(matches!(
            classify(claimed, &TrustedSigners::default()),
            Incoming::Anomaly {
                code: "NotSigned",
                ..
            }
        ));
    }

    #[test]
    fn a_signature_that_is_not_cms_is_malformed() {
        let r = classify(ENVELOPE.as_bytes(), &TrustedSigners::default());
        assert!(
            matches!(
                r,
                Incoming::Anomaly {
                    code: "Malformed",
                    ..
                }
            ),
            "{r:?}"
        );
    }

    /// A delivery receipt for `tipo`, carrying `original`, framed as signed
    /// (with a signature only [`accept_any`] takes).
    fn delivery_receipt(tipo: super::super::daticert::TipoRicevuta, original: &[u8]) -> Vec<u8> {
        use super::super::compose::{self, Issuer, Notice};
        let mut t = compose::tests::transmission();
        t.tipo_ricevuta = tipo;
        let issuer = Issuer {
            domain: "pec.b.it",
            gestore: "B",
        };
        let c = compose::receipt(
            &t,
            Notice::Delivered("anna@pec.b.it"),
            &t.mittente,
            issuer,
            crate::clock::now(),
            Some(original),
        );
        smime::multipart_signed(&c.headers, &c.entity, b"sig", "s")
    }

    fn accept_any(message: &[u8]) -> Incoming {
        classify_with(message, |_, _| {
            Ok(Verified {
                signer_sha256: String::new(),
                signing_time: None,
            })
        })
    }

    #[test]
    fn a_complete_receipt_says_where_its_original_stands_byte_for_byte() {
        use super::super::daticert::TipoRicevuta;
        let original = b"From: mario@pec.a.it\r\nSubject: Prova\r\n\r\nciao\r\n";
        let full = delivery_receipt(TipoRicevuta::Completa, original);
        match accept_any(&full) {
            Incoming::Receipt {
                original: Some(r), ..
            } => assert_eq!(&full[r], original),
            other => panic!("expected a receipt with its original, got {other:?}"),
        }
        let short = delivery_receipt(TipoRicevuta::Breve, original);
        assert!(
            matches!(accept_any(&short), Incoming::Receipt { original: None, .. }),
            "a short receipt carries no original"
        );
    }

    #[test]
    fn only_a_slice_of_the_message_stands_within_it() {
        let whole = b"abcdef".to_vec();
        assert_eq!(within(&whole, &whole[2..5]), Some(2..5));
        assert_eq!(within(&whole, &whole[6..]), Some(6..6));
        let copy = whole[2..5].to_vec();
        assert_eq!(within(&whole, &copy), None, "a decoded copy is not");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic_the_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = classify(&bytes, &TrustedSigners::default());
            let _ = summary(&bytes);
            let _ = original(&bytes);
            let envelope = super::super::checks::SmtpEnvelope {
                reverse_path: "a@b.it".into(),
                forward_paths: vec!["c@d.it".into()],
            };
            let limits = super::super::checks::Limits { max_message_bytes: 1 << 20, max_recipients: 10 };
            let _ = super::super::checks::check_submission(&envelope, &bytes, limits);
        }

        #[test]
        fn mangled_envelopes_never_panic_the_parsers(
            edits in proptest::collection::vec((0usize..ENVELOPE.len(), any::<u8>(), any::<bool>()), 1..24)
        ) {
            let mut bytes = ENVELOPE.as_bytes().to_vec();
            for (at, byte, insert) in edits {
                let at = at.min(bytes.len());
                if insert || at == bytes.len() {
                    bytes.insert(at, byte);
                } else {
                    bytes[at] = byte;
                }
            }
            let _ = classify(&bytes, &TrustedSigners::default());
            let _ = original(&bytes);
            let _ = pec_core::smime::split_signed(&bytes);
        }
    }
}
