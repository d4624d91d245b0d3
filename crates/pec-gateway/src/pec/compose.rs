//! Building what the provider emits: transport envelopes, receipts,
//! notices and anomaly envelopes, each as outer headers plus the MIME entity
//! that gets signed (the signature itself is the signer's job).
//!
//! Pure: a function of the transmission, the original bytes and `now`.
//! Message-IDs are derived from the transmission identifier, the kind and
//! the addressee, so emitting the same thing twice (after a crash) yields
//! the same Message-ID and the store can refuse the copy.

use chrono::{DateTime, Utc};
use mail_builder::{
    headers::{Header, address::Address, text::Text},
    mime::MimePart,
};
use sha2::{Digest, Sha256};

use super::daticert::{
    Daticert, Destinatario, Errore, Tipo, TipoDestinatario, TipoRicevuta, italian_time,
};

/// Headers the system sets on what it emits (never trusted from a user).
pub mod header {
    /// `posta-certificata` on an envelope, `errore` on an anomaly envelope.
    pub const TRASPORTO: &str = "X-Trasporto";
    /// The receipt or notice kind.
    pub const RICEVUTA: &str = "X-Ricevuta";
    /// The Message-ID of the message a receipt is about.
    pub const RIFERIMENTO: &str = "X-Riferimento-Message-ID";
    /// The delivery receipt kind the sender asked for.
    pub const TIPO_RICEVUTA: &str = "X-TipoRicevuta";
}

/// One transmission, as every receipt about it describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmission {
    /// The sending provider's unique identifier of the transmission.
    pub identificativo: String,
    /// The original Message-ID.
    pub msgid: String,
    /// The sender.
    pub mittente: String,
    /// The recipients.
    pub destinatari: Vec<Destinatario>,
    /// The subject.
    pub oggetto: String,
    /// The delivery receipt kind asked for.
    pub tipo_ricevuta: TipoRicevuta,
}

impl Transmission {
    /// The transmission an envelope's certification data describes.
    pub fn from_daticert(d: &Daticert) -> Self {
        Self {
            identificativo: d.identificativo.clone(),
            msgid: d.msgid.clone(),
            mittente: d.mittente.clone(),
            destinatari: d.destinatari.clone(),
            oggetto: d.oggetto.clone(),
            tipo_ricevuta: d.ricevuta.unwrap_or_default(),
        }
    }
}

/// Who emits: the domain whose key signs, and its provider's name.
#[derive(Debug, Clone, Copy)]
pub struct Issuer<'a> {
    /// The PEC domain.
    pub domain: &'a str,
    /// The provider's name in `gestore-emittente`.
    pub gestore: &'a str,
}

impl Issuer<'_> {
    /// The address everything the system emits comes from.
    pub fn system_address(&self) -> String {
        format!("posta-certificata@{}", self.domain)
    }
}

/// Something to sign and send: outer headers and the entity to sign.
#[derive(Debug, Clone, PartialEq)]
pub struct Composed {
    /// Outer header lines, each ending in CRLF (no MIME-Version or Content-Type).
    pub headers: String,
    /// The MIME entity the signature covers, canonical CRLF.
    pub entity: Vec<u8>,
    /// The Message-ID, without brackets.
    pub message_id: String,
    /// The envelope recipient(s).
    pub to: Vec<String>,
}

/// What a receipt or notice says beyond the transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Accepted by the access point.
    Accepted,
    /// Refused by the access point, with the reason.
    NotAccepted(&'a str),
    /// Refused because of a virus.
    Virus(&'a str),
    /// Taken in charge by the recipient's provider.
    TakenInCharge,
    /// Delivered into this mailbox.
    Delivered(&'a str),
    /// Not delivered to this address, with the reason.
    NotDelivered(&'a str, &'a str),
    /// No receipt yet after the warning delay (preavviso).
    StillUndelivered(&'a str),
    /// No receipt within the maximum time: given up.
    TimedOut(&'a str),
    /// The recipient's provider found a virus in the transport envelope
    /// (to the sender's provider), with the virus' name.
    VirusDetected(&'a str),
    /// Not delivered to this address because the recipient's provider
    /// found a virus, with its name.
    VirusNotDelivered(&'a str, &'a str),
}

impl Notice<'_> {
    fn tipo(&self) -> Tipo {
        match self {
            Notice::Accepted => Tipo::Accettazione,
            Notice::NotAccepted(_) | Notice::Virus(_) => Tipo::NonAccettazione,
            Notice::TakenInCharge => Tipo::PresaInCarico,
            Notice::Delivered(_) => Tipo::AvvenutaConsegna,
            Notice::NotDelivered(..) | Notice::TimedOut(_) | Notice::VirusNotDelivered(..) => {
                Tipo::ErroreConsegna
            }
            Notice::StillUndelivered(_) => Tipo::PreavvisoErroreConsegna,
            Notice::VirusDetected(_) => Tipo::RilevazioneVirus,
        }
    }

    fn subject_prefix(&self) -> &'static str {
        match self {
            Notice::Accepted => "ACCETTAZIONE: ",
            Notice::NotAccepted(_) => "AVVISO DI NON ACCETTAZIONE: ",
            Notice::Virus(_) => "AVVISO DI NON ACCETTAZIONE PER VIRUS: ",
            Notice::TakenInCharge => "PRESA IN CARICO: ",
            Notice::Delivered(_) => "CONSEGNA: ",
            Notice::NotDelivered(..) => "AVVISO DI MANCATA CONSEGNA: ",
            Notice::StillUndelivered(_) => {
                "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO (PREAVVISO): "
            }
            Notice::TimedOut(_) => "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: ",
            Notice::VirusDetected(_) => "PROBLEMA DI SICUREZZA: ",
            Notice::VirusNotDelivered(..) => "AVVISO DI MANCATA CONSEGNA PER VIRUS: ",
        }
    }

    fn errore(&self) -> Errore {
        match self {
            Notice::Virus(_) | Notice::VirusDetected(_) | Notice::VirusNotDelivered(..) => {
                Errore::Virus
            }
            Notice::NotDelivered(..) => Errore::NoDest,
            Notice::NotAccepted(_) | Notice::StillUndelivered(_) | Notice::TimedOut(_) => {
                Errore::Altro
            }
            _ => Errore::Nessuno,
        }
    }

    /// The addressee the notice is about, for the Message-ID.
    fn about(&self) -> &str {
        match self {
            Notice::Delivered(a) | Notice::NotDelivered(a, _) | Notice::VirusNotDelivered(a, _) => {
                a
            }
            Notice::StillUndelivered(a) | Notice::TimedOut(a) => a,
            _ => "",
        }
    }

    fn errore_esteso(&self) -> Option<String> {
        match self {
            Notice::NotAccepted(r) | Notice::Virus(r) | Notice::VirusDetected(r) => {
                Some(r.to_string())
            }
            Notice::VirusNotDelivered(_, r) => Some(r.to_string()),
            Notice::NotDelivered(_, r) => Some(r.to_string()),
            Notice::StillUndelivered(_) => Some("nessuna ricevuta entro 12 ore".into()),
            Notice::TimedOut(_) => Some("nessuna ricevuta entro 24 ore".into()),
            _ => None,
        }
    }
}

/// A new transmission identifier for `domain`: unique, and a valid Message-ID.
pub fn new_identificativo(domain: &str, now: DateTime<Utc>, random: u64) -> String {
    format!("opec.{}.{random:016x}@{domain}", now.format("%Y%m%d%H%M%S"))
}

fn derived_message_id(t: &Transmission, kind: &str, about: &str, domain: &str) -> String {
    let h = Sha256::digest(format!("{}\0{kind}\0{about}", t.identificativo));
    let hex: String = h[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}.{hex}@{domain}")
}

fn daticert(
    t: &Transmission,
    tipo: Tipo,
    errore: Errore,
    issuer: Issuer<'_>,
    now: DateTime<Utc>,
) -> Daticert {
    Daticert {
        tipo,
        errore,
        mittente: t.mittente.clone(),
        destinatari: t.destinatari.clone(),
        risposte: t.mittente.clone(),
        oggetto: t.oggetto.clone(),
        gestore_emittente: issuer.gestore.to_string(),
        data: italian_time(now),
        identificativo: t.identificativo.clone(),
        msgid: t.msgid.clone(),
        ricevuta: None,
        consegna: None,
        errore_esteso: None,
    }
}

fn when(now: DateTime<Utc>) -> String {
    let local = italian_time(now);
    format!(
        "Il giorno {} alle ore {} ({})",
        local.format("%d/%m/%Y"),
        local.format("%H:%M:%S"),
        local.format("%z")
    )
}

fn header_line(out: &mut String, name: &str, value: &impl Header) {
    let mut buf = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = value.write_header(&mut buf, name.len() + 2);
    out.push_str(name);
    out.push_str(": ");
    out.push_str(&String::from_utf8_lossy(&buf));
}

fn outer_headers(
    from: Address<'_>,
    to: &[String],
    subject: &str,
    message_id: &str,
    now: DateTime<Utc>,
    extra: &[(&str, &str)],
) -> String {
    let mut h = String::new();
    header_line(&mut h, "From", &from);
    let to_list = Address::new_list(
        to.iter()
            .map(|a| Address::new_address(None::<&str>, a.as_str()))
            .collect(),
    );
    header_line(&mut h, "To", &to_list);
    // A subject comes from a user: no control character may reach the
    // header, or CR/LF would start a header of the user's choosing.
    let subject: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    header_line(&mut h, "Subject", &Text::new(subject));
    h.push_str(&format!("Date: {}\r\n", now.to_rfc2822()));
    h.push_str(&format!("Message-ID: <{message_id}>\r\n"));
    for (name, value) in extra {
        // Values the system sets: single-line by construction.
        h.push_str(&format!("{name}: {}\r\n", value.replace(['\r', '\n'], " ")));
    }
    h
}

fn entity(text: String, daticert: Option<&Daticert>, original: Option<&[u8]>) -> Vec<u8> {
    let mut parts = vec![MimePart::new("text/plain", text)];
    if let Some(original) = original {
        parts.push(
            MimePart::new("message/rfc822", pec_core::smime::canonical_crlf(original))
                .attachment("postacert.eml")
                .transfer_encoding("8bit"),
        );
    }
    if let Some(d) = daticert {
        parts.push(
            MimePart::new("application/xml", d.to_xml().into_bytes()).attachment("daticert.xml"),
        );
    }
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = MimePart::new("multipart/mixed", parts).write_part(&mut out);
    out
}

/// The transport envelope of a submitted message: the original as
/// `postacert.eml` and the certification data, to every recipient.
pub fn transport_envelope(
    t: &Transmission,
    original: &[u8],
    recipients: &[String],
    issuer: Issuer<'_>,
    now: DateTime<Utc>,
) -> Composed {
    let d = daticert(t, Tipo::PostaCertificata, Errore::Nessuno, issuer, now);
    let text = format!(
        "Messaggio di posta certificata\r\n\r\n{} il messaggio \"{}\" e' stato inviato da \"{}\"\r\nindirizzato a:\r\n{}\r\nIl messaggio originale e' incluso in allegato.\r\nIdentificativo messaggio: {}\r\n",
        when(now),
        t.oggetto,
        t.mittente,
        list(&t.destinatari),
        t.identificativo
    );
    let from = Address::new_address(
        Some(format!("Per conto di: {}", t.mittente)),
        issuer.system_address(),
    );
    let to: Vec<String> = t.destinatari.iter().map(|d| d.address.clone()).collect();
    let mut headers = outer_headers(
        from,
        &to,
        &format!("POSTA CERTIFICATA: {}", t.oggetto),
        &t.identificativo,
        now,
        &[
            (header::TRASPORTO, "posta-certificata"),
            (header::RIFERIMENTO, &t.msgid),
            (header::TIPO_RICEVUTA, t.tipo_ricevuta.as_str()),
        ],
    );
    headers.push_str(&format!("Reply-To: {}\r\n", t.mittente));
    Composed {
        headers,
        entity: entity(text, Some(&d), Some(original)),
        message_id: t.identificativo.clone(),
        to: recipients.to_vec(),
    }
}

/// A receipt or notice about `t`, to `to`. `original` is attached to a
/// complete delivery receipt.
pub fn receipt(
    t: &Transmission,
    notice: Notice<'_>,
    to: &str,
    issuer: Issuer<'_>,
    now: DateTime<Utc>,
    original: Option<&[u8]>,
) -> Composed {
    let tipo = notice.tipo();
    let mut d = daticert(t, tipo, notice.errore(), issuer, now);
    d.errore_esteso = notice.errore_esteso();
    let mut attach = None;
    if let Notice::Delivered(addr) = notice {
        d.consegna = Some(addr.to_string());
        d.ricevuta = Some(t.tipo_ricevuta);
        attach = match t.tipo_ricevuta {
            TipoRicevuta::Completa => original,
            TipoRicevuta::Breve | TipoRicevuta::Sintetica => None,
        };
    }
    if let Notice::NotDelivered(addr, _) | Notice::VirusNotDelivered(addr, _) = notice {
        d.consegna = Some(addr.to_string());
    }
    let mut text = format!(
        "{}\r\n\r\n{} il messaggio \"{}\" proveniente da \"{}\" ",
        title(&notice),
        when(now),
        t.oggetto,
        t.mittente
    );
    text.push_str(&match notice {
        Notice::Accepted => format!(
            "ed indirizzato a:\r\n{}\r\ne' stato accettato dal sistema ed inoltrato.\r\n",
            list(&t.destinatari)
        ),
        Notice::NotAccepted(r) => format!("non e' stato accettato: {r}\r\n"),
        Notice::Virus(r) => format!("non e' stato accettato perche' contiene un virus: {r}\r\n"),
        Notice::TakenInCharge => {
            "e' stato preso in carico dal gestore del destinatario.\r\n".into()
        }
        Notice::Delivered(a) => format!(
            "ed indirizzato a \"{a}\" e' stato consegnato nella casella di destinazione.\r\n"
        ),
        Notice::NotDelivered(a, r) => {
            format!("ed indirizzato a \"{a}\" non e' stato consegnato: {r}\r\n")
        }
        Notice::StillUndelivered(a) => {
            format!("ed indirizzato a \"{a}\" non ha ancora ricevuto ricevute entro 12 ore.\r\n")
        }
        Notice::TimedOut(a) => {
            format!("ed indirizzato a \"{a}\" non e' stato consegnato entro 24 ore.\r\n")
        }
        Notice::VirusDetected(v) => format!(
            "ed indirizzato a:\r\n{}\r\ncontiene un virus ({v}) e non e' stato consegnato.\r\n",
            list(&t.destinatari)
        ),
        Notice::VirusNotDelivered(a, v) => format!(
            "ed indirizzato a \"{a}\" non e' stato consegnato: il gestore del destinatario vi ha rilevato un virus ({v}).\r\n"
        ),
    });
    if t.tipo_ricevuta == TipoRicevuta::Breve
        && matches!(notice, Notice::Delivered(_))
        && let Some(original) = original
    {
        let hash: String = Sha256::digest(original)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        text.push_str(&format!(
            "Impronta SHA-256 del messaggio consegnato: {hash}\r\n"
        ));
    }
    text.push_str(&format!(
        "Identificativo messaggio: {}\r\n",
        t.identificativo
    ));
    let message_id = derived_message_id(t, tipo.as_str(), notice.about(), issuer.domain);
    let headers = outer_headers(
        Address::new_address(None::<&str>, issuer.system_address()),
        &[to.to_string()],
        &format!("{}{}", notice.subject_prefix(), t.oggetto),
        &message_id,
        now,
        &[
            (header::RICEVUTA, tipo.as_str()),
            (header::RIFERIMENTO, &t.msgid),
        ],
    );
    Composed {
        headers,
        entity: entity(text, Some(&d), attach),
        message_id,
        to: vec![to.to_string()],
    }
}

/// A message as it arrived at the incoming point.
#[derive(Debug, Clone, Copy)]
pub struct Arrived<'a> {
    /// The bytes.
    pub original: &'a [u8],
    /// Its sender (From, else the reverse path).
    pub sender: &'a str,
    /// Its subject.
    pub subject: &'a str,
    /// Its Message-ID.
    pub message_id: &'a str,
}

/// An anomaly envelope: mail that arrived at the incoming point but is not a
/// valid PEC message, wrapped and delivered as such to `recipients`.
pub fn anomaly_envelope(
    arrived: Arrived<'_>,
    reason: &str,
    recipients: &[String],
    issuer: Issuer<'_>,
    now: DateTime<Utc>,
) -> Composed {
    let Arrived {
        original,
        sender,
        subject,
        message_id: original_id,
    } = arrived;
    let id_source = Transmission {
        identificativo: format!("{original_id}\0{}", hex_digest(original)),
        msgid: original_id.into(),
        mittente: sender.into(),
        destinatari: Vec::new(),
        oggetto: subject.into(),
        tipo_ricevuta: TipoRicevuta::Sintetica,
    };
    let message_id =
        derived_message_id(&id_source, "anomalia", &recipients.join(","), issuer.domain);
    let text = format!(
        "Anomalia nel messaggio\r\n\r\n{} e' stato ricevuto il messaggio \"{subject}\" proveniente da \"{sender}\".\r\nIl messaggio non e' un messaggio di posta certificata valido ({reason}) ed e' incluso in allegato.\r\n",
        when(now)
    );
    let headers = outer_headers(
        Address::new_address(
            Some(format!("Per conto di: {sender}")),
            issuer.system_address(),
        ),
        recipients,
        &format!("ANOMALIA MESSAGGIO: {subject}"),
        &message_id,
        now,
        &[
            (header::TRASPORTO, "errore"),
            (header::RIFERIMENTO, original_id),
        ],
    );
    Composed {
        headers,
        entity: entity(text, None, Some(original)),
        message_id,
        to: recipients.to_vec(),
    }
}

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn title(notice: &Notice<'_>) -> &'static str {
    match notice {
        Notice::Accepted => "Ricevuta di accettazione",
        Notice::NotAccepted(_) | Notice::Virus(_) => "Avviso di non accettazione",
        Notice::TakenInCharge => "Ricevuta di presa in carico",
        Notice::Delivered(_) => "Ricevuta di avvenuta consegna",
        Notice::NotDelivered(..) => "Avviso di mancata consegna",
        Notice::StillUndelivered(_) => "Preavviso di mancata consegna",
        Notice::TimedOut(_) => "Avviso di mancata consegna per superamento tempi massimi",
        Notice::VirusDetected(_) => "Avviso di rilevazione virus informatico",
        Notice::VirusNotDelivered(..) => "Avviso di mancata consegna per virus informatico",
    }
}

fn list(destinatari: &[Destinatario]) -> String {
    destinatari
        .iter()
        .map(|d| {
            let kind = match d.tipo {
                TipoDestinatario::Certificato => "posta certificata",
                TipoDestinatario::Esterno => "posta ordinaria",
            };
            format!("{} (\"{kind}\")", d.address)
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use mail_parser::MimeHeaders;

    /// A transmission from mario@pec.a.it to anna@pec.b.it, complete
    /// receipts asked for (a fixture of the tests of `pec`).
    pub(crate) fn transmission() -> Transmission {
        Transmission {
            identificativo: "opec.1@pec.a.it".into(),
            msgid: "m1@client".into(),
            mittente: "mario@pec.a.it".into(),
            destinatari: vec![Destinatario {
                address: "anna@pec.b.it".into(),
                tipo: TipoDestinatario::Certificato,
            }],
            oggetto: "Prova è".into(),
            tipo_ricevuta: TipoRicevuta::Completa,
        }
    }

    const ISSUER: Issuer<'static> = Issuer {
        domain: "pec.a.it",
        gestore: "Gestore A",
    };

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 16, 0, 0)
            .single()
            .expect("valid")
    }

    fn daticert_of(c: &Composed) -> Daticert {
        let parsed = mail_parser::MessageParser::default()
            .parse(&c.entity)
            .expect("entity parses");
        let xml = parsed
            .attachments()
            .find(|a| a.attachment_name() == Some("daticert.xml"))
            .expect("daticert.xml attached");
        Daticert::from_xml(std::str::from_utf8(xml.contents()).expect("utf-8"))
            .expect("daticert parses")
    }

    /// The benchmark's unsecured gateways emit unsigned envelopes: only
    /// their own classifier takes them; a gateway that checks signatures
    /// finds them malformed and wraps them as anomalies.
    #[cfg(feature = "bench-floor")]
    #[test]
    fn an_unsigned_floor_envelope_passes_only_the_unverified_classifier() {
        use crate::pec::classify::{self, Incoming};
        let composed = transport_envelope(
            &transmission(),
            b"Subject: x\r\n\r\nbody\r\n",
            &["anna@pec.b.it".into()],
            ISSUER,
            now(),
        );
        let unsigned = crate::signer::frame_unsigned(&composed);
        assert!(
            matches!(
                classify::classify_unverified(&unsigned),
                Incoming::Envelope { .. }
            ),
            "the floor's own classifier takes its envelope"
        );
        let checked = classify::classify(&unsigned, &Default::default());
        assert!(
            matches!(
                checked,
                Incoming::Anomaly {
                    code: "Malformed",
                    ..
                }
            ),
            "a checking gateway refuses it: {checked:?}"
        );
    }

    #[test]
    fn an_envelope_carries_the_original_and_the_certification_data() {
        let c = transport_envelope(
            &transmission(),
            b"Subject: x\n\nbody\n",
            &["anna@pec.b.it".into()],
            ISSUER,
            now(),
        );
        assert!(c.headers.contains("X-Trasporto: posta-certificata\r\n"));
        assert!(c.headers.contains("Message-ID: <opec.1@pec.a.it>\r\n"));
        assert!(c.headers.contains("posta-certificata@pec.a.it"));
        let parsed = mail_parser::MessageParser::default()
            .parse(&c.entity)
            .expect("parses");
        let eml = parsed
            .attachments()
            .find(|a| a.attachment_name() == Some("postacert.eml"))
            .expect("postacert.eml");
        assert!(eml.contents().windows(4).any(|w| w == b"body") || eml.message().is_some());
        let d = daticert_of(&c);
        assert_eq!(d.tipo, Tipo::PostaCertificata);
        assert_eq!(d.identificativo, "opec.1@pec.a.it");
        assert_eq!(d.data.format("%z").to_string(), "+0100");
    }

    #[test]
    fn a_delivery_receipt_names_the_mailbox_and_follows_the_receipt_kind() {
        let t = transmission();
        let full = receipt(
            &t,
            Notice::Delivered("anna@pec.b.it"),
            "mario@pec.a.it",
            ISSUER,
            now(),
            Some(b"Subject: x\r\n\r\nb\r\n"),
        );
        let d = daticert_of(&full);
        assert_eq!(
            (d.tipo, d.consegna.as_deref()),
            (Tipo::AvvenutaConsegna, Some("anna@pec.b.it"))
        );
        assert!(String::from_utf8_lossy(&full.entity).contains("postacert.eml"));
        let short = receipt(
            &Transmission {
                tipo_ricevuta: TipoRicevuta::Sintetica,
                ..t
            },
            Notice::Delivered("anna@pec.b.it"),
            "mario@pec.a.it",
            ISSUER,
            now(),
            Some(b"Subject: x\r\n\r\nb\r\n"),
        );
        assert!(!String::from_utf8_lossy(&short.entity).contains("postacert.eml"));
        assert!(full.headers.contains("X-Ricevuta: avvenuta-consegna\r\n"));
    }

    #[test]
    fn the_same_receipt_twice_has_the_same_message_id() {
        let t = transmission();
        let a = receipt(&t, Notice::Accepted, "mario@pec.a.it", ISSUER, now(), None);
        let b = receipt(
            &t,
            Notice::Accepted,
            "mario@pec.a.it",
            ISSUER,
            now() + chrono::Duration::seconds(5),
            None,
        );
        let c = receipt(
            &t,
            Notice::Delivered("anna@pec.b.it"),
            "mario@pec.a.it",
            ISSUER,
            now(),
            None,
        );
        assert_eq!(a.message_id, b.message_id);
        assert_ne!(a.message_id, c.message_id);
    }

    #[test]
    fn hostile_subjects_do_not_inject_headers() {
        let t = Transmission {
            oggetto: "x\r\nBcc: eve@evil.it".into(),
            ..transmission()
        };
        let c = receipt(&t, Notice::Accepted, "mario@pec.a.it", ISSUER, now(), None);
        assert!(!c.headers.contains("\r\nBcc:"), "{}", c.headers);
    }

    #[test]
    fn a_notice_says_why() {
        let c = receipt(
            &transmission(),
            Notice::NotAccepted("Bcc present"),
            "mario@pec.a.it",
            ISSUER,
            now(),
            None,
        );
        let d = daticert_of(&c);
        assert_eq!((d.tipo, d.errore), (Tipo::NonAccettazione, Errore::Altro));
        assert_eq!(d.errore_esteso.as_deref(), Some("Bcc present"));
        let head = mail_parser::MessageParser::default()
            .parse_headers(c.headers.as_bytes())
            .expect("headers parse");
        assert_eq!(head.subject(), Some("AVVISO DI NON ACCETTAZIONE: Prova è"));
    }

    #[test]
    fn virus_notices_between_providers_and_to_the_sender_name_the_virus() {
        let t = transmission();
        let found = receipt(
            &t,
            Notice::VirusDetected("Eicar"),
            &t.mittente,
            ISSUER,
            now(),
            None,
        );
        let d = daticert_of(&found);
        assert_eq!((d.tipo, d.errore), (Tipo::RilevazioneVirus, Errore::Virus));
        assert_eq!(d.errore_esteso.as_deref(), Some("Eicar"));
        let stopped = receipt(
            &t,
            Notice::VirusNotDelivered("anna@pec.b.it", "Eicar"),
            &t.mittente,
            ISSUER,
            now(),
            None,
        );
        let d = daticert_of(&stopped);
        assert_eq!((d.tipo, d.errore), (Tipo::ErroreConsegna, Errore::Virus));
        assert_eq!(d.consegna.as_deref(), Some("anna@pec.b.it"));
        let head = mail_parser::MessageParser::default()
            .parse_headers(stopped.headers.as_bytes())
            .expect("headers parse");
        assert_eq!(
            head.subject(),
            Some("AVVISO DI MANCATA CONSEGNA PER VIRUS: Prova è")
        );
    }
}
