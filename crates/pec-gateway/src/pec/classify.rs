//! What arrived at the incoming point: a transport envelope, a receipt, or
//! an anomaly (anything else, to be wrapped in an anomaly envelope).
//!
//! A message counts as PEC only if it is `multipart/signed`, its signature
//! verifies with a certificate of the providers' index, and its signed
//! `daticert.xml` agrees with the outer headers. The outer headers are not
//! signed, so the kind is taken from the signed certification data.

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

/// Classifies `message` against the providers' index.
pub fn classify(message: &[u8], trusted: &TrustedSigners) -> Incoming {
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
    let signer = match smime::verify_detached(parts.entity, &parts.signature, trusted) {
        Ok(v) => v,
        Err(e) => return anomaly(e.reason(), e.to_string()),
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
        Incoming::Receipt { daticert, signer }
    }
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
