//! The formal checks of the access point (RFC 6109, 3.1.1): what a
//! mailbox owner's message must satisfy before the provider accepts it.
//!
//! Pure: a function of the SMTP envelope, the message bytes and the limits.
//! A failure is a [`Refusal`] whose reason goes into the SMTP reply and the
//! non-acceptance notice.

use mail_parser::{Address, HeaderName, Message, MessageParser};

use super::daticert::TipoRicevuta;

/// What the SMTP dialogue said about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpEnvelope {
    /// `MAIL FROM`.
    pub reverse_path: String,
    /// Every `RCPT TO`.
    pub forward_paths: Vec<String>,
}

/// Limits the domain sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of size x recipients.
    pub max_message_bytes: u64,
    /// Most recipients.
    pub max_recipients: usize,
}

/// A message that passed the checks, with what the receipts need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The sender (From = reverse path), lowercase.
    pub sender: String,
    /// To addresses, lowercase.
    pub to: Vec<String>,
    /// Cc addresses, lowercase.
    pub cc: Vec<String>,
    /// The subject, decoded.
    pub subject: String,
    /// The Message-ID, without angle brackets (empty if the client set none).
    pub message_id: String,
    /// The receipt kind the sender asked for.
    pub tipo_ricevuta: TipoRicevuta,
}

/// Why a message is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// A short, bounded reason (metric label, log outcome).
    pub reason: &'static str,
    /// What is wrong and what to fix, for the sender.
    pub detail: String,
}

fn refuse(reason: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        reason,
        detail: detail.into(),
    }
}

/// Checks a submitted message.
pub fn check_submission(
    envelope: &SmtpEnvelope,
    message: &[u8],
    limits: Limits,
) -> Result<Submission, Refusal> {
    let recipients = envelope.forward_paths.len().max(1) as u64;
    if recipients as usize > limits.max_recipients {
        return Err(refuse(
            "TooManyRecipients",
            format!(
                "{} recipients, at most {} allowed",
                envelope.forward_paths.len(),
                limits.max_recipients
            ),
        ));
    }
    let total = (message.len() as u64).saturating_mul(recipients);
    if total > limits.max_message_bytes {
        return Err(refuse(
            "TooLarge",
            format!(
                "size x recipients is {total} bytes, more than the {} allowed",
                limits.max_message_bytes
            ),
        ));
    }
    let parsed = parse(message)?;
    let from = addresses(&parsed, HeaderName::From);
    let sender = match from.as_slice() {
        [one] => one.clone(),
        [] => return Err(refuse("NoFrom", "the message has no valid From address")),
        _ => return Err(refuse("MultipleFrom", "From must name exactly one address")),
    };
    if !is_address(&sender) {
        return Err(refuse(
            "InvalidFrom",
            format!("From {sender:?} is not a valid address"),
        ));
    }
    if !sender.eq_ignore_ascii_case(&envelope.reverse_path) {
        return Err(refuse(
            "FromMismatch",
            format!(
                "From {sender} differs from the SMTP reverse path {}",
                envelope.reverse_path
            ),
        ));
    }
    if parsed.header(HeaderName::Bcc).is_some() {
        return Err(refuse(
            "BccPresent",
            "PEC messages may not have Bcc recipients; move them to To or Cc",
        ));
    }
    let to = addresses(&parsed, HeaderName::To);
    if to.is_empty() {
        return Err(refuse("NoTo", "the message has no valid To address"));
    }
    let cc = addresses(&parsed, HeaderName::Cc);
    for path in &envelope.forward_paths {
        let path = path.to_ascii_lowercase();
        if !to.contains(&path) && !cc.contains(&path) {
            return Err(refuse(
                "RecipientNotInHeaders",
                format!("recipient {path} is in neither To nor Cc"),
            ));
        }
    }
    let tipo_ricevuta = match parsed.header_raw("X-TipoRicevuta") {
        None => TipoRicevuta::default(),
        Some(v) => v.trim().parse().map_err(|_| {
            refuse(
                "BadTipoRicevuta",
                "X-TipoRicevuta must be completa, breve or sintetica",
            )
        })?,
    };
    Ok(Submission {
        sender: sender.to_ascii_lowercase(),
        to,
        cc,
        subject: parsed.subject().unwrap_or_default().to_string(),
        message_id: parsed.message_id().unwrap_or_default().to_string(),
        tipo_ricevuta,
    })
}

/// Parses a message, refusing what is not a message at all.
pub fn parse(message: &[u8]) -> Result<Message<'_>, Refusal> {
    let parsed = MessageParser::default()
        .parse(message)
        .ok_or_else(|| refuse("Malformed", "the message could not be parsed as MIME"))?;
    if parsed.headers().is_empty() {
        return Err(refuse("Malformed", "the message has no header section"));
    }
    Ok(parsed)
}

/// The addresses of one header, lowercase; entries without an address are
/// left out (and so fail the checks that need one).
pub fn addresses(message: &Message<'_>, name: HeaderName<'_>) -> Vec<String> {
    let Some(value) = message.header(name).and_then(|h| h.as_address()) else {
        return Vec::new();
    };
    let list: Vec<_> = match value {
        Address::List(list) => list.iter().collect(),
        Address::Group(groups) => groups.iter().flat_map(|g| g.addresses.iter()).collect(),
    };
    list.iter()
        .filter_map(|a| a.address.as_deref())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// A plain `local@domain` with no spaces, control characters or brackets.
pub fn is_address(addr: &str) -> bool {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && domain.len() <= 253
        && addr.chars().all(|c| {
            c.is_ascii_graphic() && !matches!(c, '<' | '>' | '(' | ')' | ',' | ';' | '\\' | '"')
        })
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// The domain of an address, lowercase.
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The local part of an address, lowercase.
pub fn local_part(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(l, _)| l.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_message_bytes: 10_000,
        max_recipients: 3,
    };

    fn envelope(from: &str, to: &[&str]) -> SmtpEnvelope {
        SmtpEnvelope {
            reverse_path: from.into(),
            forward_paths: to.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn message(headers: &str) -> Vec<u8> {
        format!("{headers}Subject: prova\r\nMessage-ID: <m1@client>\r\n\r\nciao\r\n").into_bytes()
    }

    #[test]
    fn a_well_formed_message_passes_with_what_the_receipts_need() {
        let msg = message(
            "From: Mario <mario@pec.a.it>\r\nTo: anna@pec.b.it\r\nCc: Bob <bob@pec.c.it>\r\n",
        );
        let ok = check_submission(
            &envelope("mario@pec.a.it", &["anna@pec.b.it", "bob@pec.c.it"]),
            &msg,
            LIMITS,
        )
        .expect("accepted");
        assert_eq!(ok.sender, "mario@pec.a.it");
        assert_eq!(ok.to, vec!["anna@pec.b.it"]);
        assert_eq!(ok.cc, vec!["bob@pec.c.it"]);
        assert_eq!(ok.subject, "prova");
        assert_eq!(ok.message_id, "m1@client");
        assert_eq!(ok.tipo_ricevuta, TipoRicevuta::Completa);
    }

    #[test]
    fn each_formal_error_is_refused_with_its_reason() {
        let cases: [(&str, SmtpEnvelope, &str); 7] = [
            (
                "NoFrom",
                envelope("mario@pec.a.it", &["anna@pec.b.it"]),
                "To: anna@pec.b.it\r\n",
            ),
            (
                "FromMismatch",
                envelope("other@pec.a.it", &["anna@pec.b.it"]),
                "From: mario@pec.a.it\r\nTo: anna@pec.b.it\r\n",
            ),
            (
                "BccPresent",
                envelope("mario@pec.a.it", &["anna@pec.b.it"]),
                "From: mario@pec.a.it\r\nTo: anna@pec.b.it\r\nBcc: x@pec.b.it\r\n",
            ),
            (
                "NoTo",
                envelope("mario@pec.a.it", &["anna@pec.b.it"]),
                "From: mario@pec.a.it\r\n",
            ),
            (
                "RecipientNotInHeaders",
                envelope("mario@pec.a.it", &["eve@pec.e.it"]),
                "From: mario@pec.a.it\r\nTo: anna@pec.b.it\r\n",
            ),
            (
                "MultipleFrom",
                envelope("mario@pec.a.it", &["anna@pec.b.it"]),
                "From: mario@pec.a.it, luigi@pec.a.it\r\nTo: anna@pec.b.it\r\n",
            ),
            (
                "TooManyRecipients",
                envelope("mario@pec.a.it", &["a@x.it", "b@x.it", "c@x.it", "d@x.it"]),
                "From: mario@pec.a.it\r\nTo: a@x.it, b@x.it, c@x.it, d@x.it\r\n",
            ),
        ];
        for (reason, env, headers) in cases {
            let refusal = check_submission(&env, &message(headers), LIMITS).expect_err(reason);
            assert_eq!(refusal.reason, reason, "{headers:?}: {}", refusal.detail);
        }
    }

    #[test]
    fn size_counts_every_recipient() {
        let mut msg = message("From: mario@pec.a.it\r\nTo: a@x.it, b@x.it\r\n");
        msg.extend(std::iter::repeat_n(b'x', 6_000));
        msg.extend(b"\r\n");
        assert!(check_submission(&envelope("mario@pec.a.it", &["a@x.it"]), &msg, LIMITS).is_ok());
        let refusal = check_submission(
            &envelope("mario@pec.a.it", &["a@x.it", "b@x.it"]),
            &msg,
            LIMITS,
        )
        .expect_err("two recipients exceed the limit");
        assert_eq!(refusal.reason, "TooLarge");
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for input in [&b""[..], b"\r\n\r\n", b"\xff\xfe\x00", b"no header at all"] {
            let r = check_submission(&envelope("mario@pec.a.it", &["a@x.it"]), input, LIMITS);
            assert!(r.is_err(), "{input:?}");
        }
    }

    #[test]
    fn a_bad_receipt_kind_is_refused() {
        let msg = message("From: mario@pec.a.it\r\nTo: a@x.it\r\nX-TipoRicevuta: lunga\r\n");
        let r = check_submission(&envelope("mario@pec.a.it", &["a@x.it"]), &msg, LIMITS);
        assert_eq!(r.expect_err("refused").reason, "BadTipoRicevuta");
    }

    #[test]
    fn addresses_are_plain() {
        assert!(is_address("mario.rossi@pec.a.it"));
        for bad in [
            "mario",
            "@pec.a.it",
            "a@b",
            "a b@pec.it",
            "a@pec..it",
            "a\r\n@pec.it",
            "<a@pec.it>",
        ] {
            assert!(!is_address(bad), "{bad:?}");
        }
    }
}
