//! `daticert.xml`: the certification data every PEC receipt and transport
//! envelope carries as an attachment (RFC 6109 section 5 and its annex).
//!
//! The same facts are also in the human-readable text and in the `X-*`
//! headers, but this attachment is what other providers' software reads, so
//! it is written with every character escaped and read back strictly: a
//! document that lacks what identifies a transmission (`tipo`, `mittente`,
//! `identificativo`, `data`) is refused rather than guessed at.
//!
//! Writing is plain string building with quick-xml's escaping; reading is a
//! streaming pass over quick-xml events that only collects the leaves it
//! knows, so element order and unknown elements do not matter and nothing is
//! built whose size or depth an attacker controls.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, TimeZone, Utc};
use quick_xml::escape::{escape, resolve_xml_entity};
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::reader::Reader;

/// An enumeration of the fixed words `daticert.xml` uses in one attribute:
/// the type, its `ALL` list, `as_str`, `Display`, and `FromStr` whose error
/// names the element and attribute.
macro_rules! keywords {
    (
        $(#[$meta:meta])*
        $name:ident in $element:literal / $attribute:literal {
            $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order the format lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The attribute value as written in `daticert.xml`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = DaticertError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| invalid_value($element, $attribute, s))
            }
        }
    };
}

keywords! {
    /// The kind of PEC message a `daticert.xml` describes (`postacert/@tipo`).
    Tipo in "postacert" / "tipo" {
        /// A transport envelope carrying the sender's original message.
        PostaCertificata = "posta-certificata",
        /// The acceptance receipt the sender's provider returns.
        Accettazione = "accettazione",
        /// The notice that the sender's provider refused the message.
        NonAccettazione = "non-accettazione",
        /// The taking-charge receipt exchanged between providers.
        PresaInCarico = "presa-in-carico",
        /// The delivery receipt from the recipient's provider.
        AvvenutaConsegna = "avvenuta-consegna",
        /// The notice that delivery failed.
        ErroreConsegna = "errore-consegna",
        /// The warning that delivery has not happened within the deadline.
        PreavvisoErroreConsegna = "preavviso-errore-consegna",
        /// The notice that a virus was found.
        RilevazioneVirus = "rilevazione-virus",
    }
}

keywords! {
    /// The error class a receipt reports (`postacert/@errore`).
    Errore in "postacert" / "errore" {
        /// No error; the default when the attribute is absent.
        Nessuno = "nessuno",
        /// The recipient mailbox does not exist.
        NoDest = "no-dest",
        /// The recipient domain is not a PEC domain.
        NoDominio = "no-dominio",
        /// A virus was found.
        Virus = "virus",
        /// Any other error.
        Altro = "altro",
    }
}

keywords! {
    /// Whether a recipient is a PEC mailbox or an ordinary e-mail address
    /// (`destinatari/@tipo`).
    TipoDestinatario in "destinatari" / "tipo" {
        /// A PEC mailbox: its provider will return receipts.
        Certificato = "certificato",
        /// An ordinary mailbox outside PEC: no delivery receipt will come.
        Esterno = "esterno",
    }
}

/// One recipient of the original message, as listed in `intestazione`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinatario {
    /// The address, as the sender wrote it in `To`/`Cc`.
    pub address: String,
    /// PEC mailbox or ordinary address.
    pub tipo: TipoDestinatario,
}

keywords! {
    /// The delivery-receipt form the sender asked for (`ricevuta/@tipo`).
    TipoRicevuta in "ricevuta" / "tipo" {
        /// The receipt carries the whole original message (the default).
        Completa = "completa",
        /// The receipt carries the original message's hashes only.
        Breve = "breve",
        /// The receipt carries the certification data only.
        Sintetica = "sintetica",
    }
}

#[allow(clippy::derivable_impls)] // the keywords! macro owns the derives
impl Default for TipoRicevuta {
    fn default() -> Self {
        TipoRicevuta::Completa
    }
}

/// The content of one `daticert.xml`.
///
/// Fields that RFC 6109 makes optional but that are plain strings here
/// (`risposte`, `oggetto`, `gestore_emittente`, `msgid`) read as the empty
/// string when the element is absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Daticert {
    /// The kind of message (`postacert/@tipo`).
    pub tipo: Tipo,
    /// The error class (`postacert/@errore`).
    pub errore: Errore,
    /// The original sender (`intestazione/mittente`).
    pub mittente: String,
    /// The original recipients (`intestazione/destinatari`), in order.
    pub destinatari: Vec<Destinatario>,
    /// The original `Reply-To`, or the sender (`intestazione/risposte`).
    pub risposte: String,
    /// The original subject (`intestazione/oggetto`).
    pub oggetto: String,
    /// The provider that issued this document (`dati/gestore-emittente`).
    pub gestore_emittente: String,
    /// When the event happened, in the issuer's local offset (`dati/data`).
    /// Written to the second; sub-second digits are dropped.
    pub data: DateTime<FixedOffset>,
    /// The PEC message identifier (`dati/identificativo`).
    pub identificativo: String,
    /// The original `Message-ID` (`dati/msgid`), angle brackets included.
    pub msgid: String,
    /// The receipt form requested (`dati/ricevuta/@tipo`).
    pub ricevuta: Option<TipoRicevuta>,
    /// The mailbox a delivery receipt is about (`dati/consegna`).
    pub consegna: Option<String>,
    /// The detailed error text (`dati/errore-esteso`).
    pub errore_esteso: Option<String>,
}

/// Why a `daticert.xml` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DaticertError {
    /// The text is not well-formed XML.
    #[error("malformed XML at byte {position}: {message}")]
    Xml {
        /// Byte offset where the reader stopped.
        position: u64,
        /// What the XML reader reported.
        message: String,
    },
    /// The document has no root element at all.
    #[error("no <postacert> root element")]
    NoRoot,
    /// The root element is something else.
    #[error("root element is <{0}>, expected <postacert>")]
    WrongRoot(String),
    /// Elements or text follow the root element.
    #[error("content after the </postacert> end tag")]
    TrailingContent,
    /// The document stops before its elements are closed.
    #[error("document ends inside <{0}>")]
    Unterminated(String),
    /// A reference other than the five predefined entities or a character
    /// reference (DTD-declared entities are never expanded).
    #[error("unknown entity reference &{0};")]
    UnknownEntity(String),
    /// A required element is absent.
    #[error("missing element <{0}>")]
    MissingElement(&'static str),
    /// A required element is present but empty.
    #[error("element <{0}> is empty")]
    EmptyElement(&'static str),
    /// A single-valued element appears more than once, which would make the
    /// document ambiguous.
    #[error("element <{0}> appears more than once")]
    DuplicateElement(&'static str),
    /// A required attribute is absent.
    #[error("element <{element}> lacks the attribute {attribute}")]
    MissingAttribute {
        /// The element.
        element: &'static str,
        /// The absent attribute.
        attribute: &'static str,
    },
    /// An attribute has a value outside its enumeration.
    #[error("element <{element}>: attribute {attribute} has invalid value {value:?}")]
    InvalidValue {
        /// The element.
        element: &'static str,
        /// The attribute.
        attribute: &'static str,
        /// The value found.
        value: String,
    },
    /// The date, time or offset in `<data>` cannot be read.
    #[error("element <{element}> has invalid value {value:?}: expected {expected}")]
    BadDate {
        /// `giorno`, `ora` or `data` (for the `zona` attribute).
        element: &'static str,
        /// The value found.
        value: String,
        /// The expected form.
        expected: &'static str,
    },
}

fn invalid_value(element: &'static str, attribute: &'static str, value: &str) -> DaticertError {
    DaticertError::InvalidValue {
        element,
        attribute,
        value: value.to_owned(),
    }
}

/// The instant `now` as Italian civil time (Europe/Rome), frozen into a
/// fixed offset: `+0100` in winter, `+0200` in summer. PEC documents state
/// times in Italian time, with the offset alongside.
pub fn italian_time(now: DateTime<Utc>) -> DateTime<FixedOffset> {
    now.with_timezone(&chrono_tz::Europe::Rome).fixed_offset()
}

impl Daticert {
    /// Writes the document, UTF-8, two-space indented.
    ///
    /// Characters XML 1.0 cannot carry (most C0 controls, U+FFFE, U+FFFF)
    /// become U+FFFD so the output is always well-formed; carriage returns
    /// are written as `&#13;` so that XML end-of-line normalisation does not
    /// turn them into line feeds. `zona` has minute precision: an offset
    /// with a seconds part is rounded towards zero and the time shown in that
    /// offset, so the instant is still exact.
    pub fn to_xml(&self) -> String {
        let mut w = XmlWriter::default();
        w.line(0, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let root = format!(
            r#"<postacert tipo="{}" errore="{}">"#,
            self.tipo.as_str(),
            self.errore.as_str()
        );
        w.line(0, &root);

        w.line(1, "<intestazione>");
        w.leaf(2, "mittente", "", &self.mittente);
        for d in &self.destinatari {
            let attrs = format!(r#" tipo="{}""#, d.tipo.as_str());
            w.leaf(2, "destinatari", &attrs, &d.address);
        }
        w.leaf(2, "risposte", "", &self.risposte);
        w.leaf(2, "oggetto", "", &self.oggetto);
        w.line(1, "</intestazione>");

        w.line(1, "<dati>");
        w.leaf(2, "gestore-emittente", "", &self.gestore_emittente);
        let (zona, local) = zona_and_local(self.data);
        w.line(2, &format!(r#"<data zona="{zona}">"#));
        w.leaf(3, "giorno", "", &local.format("%d/%m/%Y").to_string());
        w.leaf(3, "ora", "", &local.format("%H:%M:%S").to_string());
        w.line(2, "</data>");
        w.leaf(2, "identificativo", "", &self.identificativo);
        w.leaf(2, "msgid", "", &self.msgid);
        if let Some(r) = self.ricevuta {
            w.line(2, &format!(r#"<ricevuta tipo="{}"/>"#, r.as_str()));
        }
        if let Some(c) = &self.consegna {
            w.leaf(2, "consegna", "", c);
        }
        if let Some(e) = &self.errore_esteso {
            w.leaf(2, "errore-esteso", "", e);
        }
        w.line(1, "</dati>");
        w.line(0, "</postacert>");
        w.0
    }

    /// Reads a document.
    ///
    /// Strict about what identifies the transmission: the root must be
    /// `postacert` with a valid `tipo`; `mittente`, `identificativo` and
    /// `data` (with `zona`, `giorno`, `ora`) must be present and valid, and
    /// single-valued elements must not repeat. Lenient about layout:
    /// whitespace between elements, element order inside `intestazione` and
    /// `dati`, comments, a DOCTYPE and unknown elements are all accepted.
    /// Addresses, identifiers and date parts are trimmed of surrounding
    /// whitespace; `oggetto`, `gestore-emittente` and `errore-esteso` are
    /// kept exactly as written.
    pub fn from_xml(xml: &str) -> Result<Daticert, DaticertError> {
        Parser::default().run(xml)
    }
}

/// The document being written, one element per line, two-space indented.
#[derive(Default)]
struct XmlWriter(String);

impl XmlWriter {
    /// Appends markup that is already XML, `depth` levels in.
    fn line(&mut self, depth: usize, markup: &str) {
        for _ in 0..depth {
            self.0.push_str("  ");
        }
        self.0.push_str(markup);
        self.0.push('\n');
    }

    /// Appends `<name attrs>text</name>` with `text` escaped; `attrs` is
    /// markup, empty or starting with a space.
    fn leaf(&mut self, depth: usize, name: &str, attrs: &str, text: &str) {
        let element = format!("<{name}{attrs}>{}</{name}>", escape_text(text));
        self.line(depth, &element);
    }
}

fn escape_text(text: &str) -> String {
    let escaped = escape(text);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        match c {
            '\r' => out.push_str("&#13;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push(char::REPLACEMENT_CHARACTER),
        }
    }
    out
}

/// The `Char` production of XML 1.0.
fn is_xml_char(c: char) -> bool {
    matches!(c,
        '\t' | '\n' | '\r'
        | '\u{20}'..='\u{D7FF}'
        | '\u{E000}'..='\u{FFFD}'
        | '\u{10000}'..='\u{10FFFF}')
}

fn zona_and_local(data: DateTime<FixedOffset>) -> (String, DateTime<FixedOffset>) {
    let secs = data.offset().local_minus_utc();
    let whole_minutes = secs - secs % 60;
    let local = match FixedOffset::east_opt(whole_minutes) {
        Some(off) => data.with_timezone(&off),
        // Unreachable: a valid offset rounded towards zero is still valid.
        None => data,
    };
    let sign = if whole_minutes < 0 { '-' } else { '+' };
    let abs = whole_minutes.unsigned_abs() / 60;
    (format!("{sign}{:02}{:02}", abs / 60, abs % 60), local)
}

fn parse_zona(value: &str) -> Result<FixedOffset, DaticertError> {
    let bad = || DaticertError::BadDate {
        element: "data",
        value: value.to_owned(),
        expected: "attribute zona as +HHMM or -HHMM",
    };
    let bytes = value.as_bytes();
    if bytes.len() != 5 || !bytes[1..].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return Err(bad()),
    };
    let digit = |i: usize| i32::from(bytes[i] - b'0');
    let hours = digit(1) * 10 + digit(2);
    let minutes = digit(3) * 10 + digit(4);
    if hours > 23 || minutes > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60)).ok_or_else(bad)
}

fn parse_date(zona: &str, giorno: &str, ora: &str) -> Result<DateTime<FixedOffset>, DaticertError> {
    let offset = parse_zona(zona)?;
    let day =
        NaiveDate::parse_from_str(giorno, "%d/%m/%Y").map_err(|_| DaticertError::BadDate {
            element: "giorno",
            value: giorno.to_owned(),
            expected: "dd/mm/yyyy",
        })?;
    let time = NaiveTime::parse_from_str(ora, "%H:%M:%S").map_err(|_| DaticertError::BadDate {
        element: "ora",
        value: ora.to_owned(),
        expected: "HH:MM:SS",
    })?;
    offset
        .from_local_datetime(&day.and_time(time))
        .single()
        .ok_or_else(|| DaticertError::BadDate {
            element: "data",
            value: format!("{giorno} {ora} {zona}"),
            expected: "a representable instant",
        })
}

/// The leaves whose text the parser collects, by their path under the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Mittente,
    Destinatari,
    Risposte,
    Oggetto,
    GestoreEmittente,
    Giorno,
    Ora,
    Identificativo,
    Msgid,
    Consegna,
    ErroreEsteso,
}

impl Leaf {
    fn at(grandparent: Option<&str>, parent: &str, name: &str) -> Option<Leaf> {
        Some(match (grandparent, parent, name) {
            (None, "intestazione", "mittente") => Leaf::Mittente,
            (None, "intestazione", "destinatari") => Leaf::Destinatari,
            (None, "intestazione", "risposte") => Leaf::Risposte,
            (None, "intestazione", "oggetto") => Leaf::Oggetto,
            (None, "dati", "gestore-emittente") => Leaf::GestoreEmittente,
            (None, "dati", "identificativo") => Leaf::Identificativo,
            (None, "dati", "msgid") => Leaf::Msgid,
            (None, "dati", "consegna") => Leaf::Consegna,
            (None, "dati", "errore-esteso") => Leaf::ErroreEsteso,
            (Some("dati"), "data", "giorno") => Leaf::Giorno,
            (Some("dati"), "data", "ora") => Leaf::Ora,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Leaf::Mittente => "mittente",
            Leaf::Destinatari => "destinatari",
            Leaf::Risposte => "risposte",
            Leaf::Oggetto => "oggetto",
            Leaf::GestoreEmittente => "gestore-emittente",
            Leaf::Giorno => "giorno",
            Leaf::Ora => "ora",
            Leaf::Identificativo => "identificativo",
            Leaf::Msgid => "msgid",
            Leaf::Consegna => "consegna",
            Leaf::ErroreEsteso => "errore-esteso",
        }
    }

    /// Free text keeps its whitespace; addresses, identifiers and date parts
    /// never meaningfully start or end with it.
    fn is_free_text(self) -> bool {
        matches!(
            self,
            Leaf::Oggetto | Leaf::GestoreEmittente | Leaf::ErroreEsteso
        )
    }
}

/// The leaf being read: which one, its text so far, and how deep it sits.
struct Open {
    leaf: Leaf,
    depth: usize,
    text: String,
    tipo: Option<TipoDestinatario>,
}

#[derive(Default)]
struct Parser {
    /// Names of the open elements, root first.
    stack: Vec<String>,
    root_done: bool,
    open: Option<Open>,
    tipo: Option<Tipo>,
    errore: Option<Errore>,
    mittente: Option<String>,
    destinatari: Vec<Destinatario>,
    risposte: Option<String>,
    oggetto: Option<String>,
    gestore_emittente: Option<String>,
    data_seen: bool,
    zona: Option<String>,
    giorno: Option<String>,
    ora: Option<String>,
    identificativo: Option<String>,
    msgid: Option<String>,
    ricevuta: Option<TipoRicevuta>,
    consegna: Option<String>,
    errore_esteso: Option<String>,
}

impl Parser {
    fn run(mut self, xml: &str) -> Result<Daticert, DaticertError> {
        let mut reader = Reader::from_str(xml);
        let xml_error = |reader: &Reader<&[u8]>, e: &dyn fmt::Display| DaticertError::Xml {
            position: reader.error_position(),
            message: e.to_string(),
        };
        loop {
            let event = reader.read_event().map_err(|e| xml_error(&reader, &e))?;
            match event {
                Event::Start(e) => self.start(&reader, &e)?,
                Event::Empty(e) => {
                    self.start(&reader, &e)?;
                    self.end()?;
                }
                Event::End(_) => self.end()?,
                Event::Text(t) => {
                    let text = t.xml10_content().map_err(|e| xml_error(&reader, &e))?;
                    self.text(&text)?;
                }
                Event::CData(t) => {
                    let text = t.xml10_content().map_err(|e| xml_error(&reader, &e))?;
                    self.text(&text)?;
                }
                Event::GeneralRef(r) => {
                    let text = resolve_ref(&r).map_err(|e| match e {
                        RefError::Xml(e) => xml_error(&reader, &e),
                        RefError::Unknown(name) => DaticertError::UnknownEntity(name),
                    })?;
                    self.text(&text)?;
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(name) = self.stack.last() {
            return Err(DaticertError::Unterminated(name.clone()));
        }
        if !self.root_done {
            return Err(DaticertError::NoRoot);
        }
        self.finish()
    }

    fn start(&mut self, reader: &Reader<&[u8]>, e: &BytesStart<'_>) -> Result<(), DaticertError> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        if self.root_done {
            return Err(DaticertError::TrailingContent);
        }
        let depth = self.stack.len();
        if depth == 0 {
            if name != "postacert" {
                return Err(DaticertError::WrongRoot(name));
            }
            let tipo = attribute(reader, e, "postacert", "tipo")?.ok_or(
                DaticertError::MissingAttribute {
                    element: "postacert",
                    attribute: "tipo",
                },
            )?;
            self.tipo = Some(tipo.trim_matches(is_xml_space).parse()?);
            if let Some(errore) = attribute(reader, e, "postacert", "errore")? {
                self.errore = Some(errore.trim_matches(is_xml_space).parse()?);
            }
        } else if self.open.is_none() {
            let parent = self.stack[depth - 1].as_str();
            // Only children of <intestazione>/<dati> and of <dati>/<data>
            // are leaves; anything deeper or elsewhere is ignored.
            let leaf = match depth {
                2 => Leaf::at(None, parent, &name),
                3 => Leaf::at(Some(self.stack[1].as_str()), parent, &name),
                _ => None,
            };
            if let Some(leaf) = leaf {
                let tipo = if leaf == Leaf::Destinatari {
                    let t = attribute(reader, e, "destinatari", "tipo")?.ok_or(
                        DaticertError::MissingAttribute {
                            element: "destinatari",
                            attribute: "tipo",
                        },
                    )?;
                    Some(t.trim_matches(is_xml_space).parse()?)
                } else {
                    None
                };
                self.open = Some(Open {
                    leaf,
                    depth: depth + 1,
                    text: String::new(),
                    tipo,
                });
            }
            if depth == 2 && parent == "dati" {
                self.section_element(reader, e, &name)?;
            }
        }
        self.stack.push(name);
        Ok(())
    }

    /// `<data>` and `<ricevuta>` carry their value in attributes.
    fn section_element(
        &mut self,
        reader: &Reader<&[u8]>,
        e: &BytesStart<'_>,
        name: &str,
    ) -> Result<(), DaticertError> {
        match name {
            "data" => {
                if self.data_seen {
                    return Err(DaticertError::DuplicateElement("data"));
                }
                self.data_seen = true;
                let zona = attribute(reader, e, "data", "zona")?.ok_or(
                    DaticertError::MissingAttribute {
                        element: "data",
                        attribute: "zona",
                    },
                )?;
                self.zona = Some(zona.trim_matches(is_xml_space).to_owned());
            }
            "ricevuta" => {
                if self.ricevuta.is_some() {
                    return Err(DaticertError::DuplicateElement("ricevuta"));
                }
                self.ricevuta = Some(match attribute(reader, e, "ricevuta", "tipo")? {
                    Some(t) => t.trim_matches(is_xml_space).parse()?,
                    None => TipoRicevuta::default(),
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), DaticertError> {
        let depth = self.stack.len();
        if let Some(open) = self.open.take_if(|o| o.depth == depth) {
            self.close_leaf(open)?;
        }
        self.stack.pop();
        if self.stack.is_empty() {
            self.root_done = true;
        }
        Ok(())
    }

    fn text(&mut self, text: &str) -> Result<(), DaticertError> {
        if self.stack.is_empty() {
            if text.chars().all(is_xml_space) {
                return Ok(());
            }
            return Err(if self.root_done {
                DaticertError::TrailingContent
            } else {
                DaticertError::NoRoot
            });
        }
        // Text belongs to a leaf only when directly inside it, not inside
        // some unknown child element of it.
        if let Some(open) = self.open.as_mut().filter(|o| o.depth == self.stack.len()) {
            open.text.push_str(text);
        }
        Ok(())
    }

    fn close_leaf(&mut self, open: Open) -> Result<(), DaticertError> {
        let leaf = open.leaf;
        let value = if leaf.is_free_text() {
            open.text
        } else {
            open.text.trim_matches(is_xml_space).to_owned()
        };
        let slot = match leaf {
            Leaf::Destinatari => {
                // The attribute was required when the element opened.
                if let Some(tipo) = open.tipo {
                    self.destinatari.push(Destinatario {
                        address: value,
                        tipo,
                    });
                }
                return Ok(());
            }
            Leaf::Mittente => &mut self.mittente,
            Leaf::Risposte => &mut self.risposte,
            Leaf::Oggetto => &mut self.oggetto,
            Leaf::GestoreEmittente => &mut self.gestore_emittente,
            Leaf::Giorno => &mut self.giorno,
            Leaf::Ora => &mut self.ora,
            Leaf::Identificativo => &mut self.identificativo,
            Leaf::Msgid => &mut self.msgid,
            Leaf::Consegna => &mut self.consegna,
            Leaf::ErroreEsteso => &mut self.errore_esteso,
        };
        if slot.is_some() {
            return Err(DaticertError::DuplicateElement(leaf.name()));
        }
        *slot = Some(value);
        Ok(())
    }

    fn finish(self) -> Result<Daticert, DaticertError> {
        let tipo = self.tipo.ok_or(DaticertError::MissingAttribute {
            element: "postacert",
            attribute: "tipo",
        })?;
        let mittente = required(self.mittente, "mittente")?;
        let identificativo = required(self.identificativo, "identificativo")?;
        if !self.data_seen {
            return Err(DaticertError::MissingElement("data"));
        }
        let zona = self.zona.ok_or(DaticertError::MissingAttribute {
            element: "data",
            attribute: "zona",
        })?;
        let giorno = self.giorno.ok_or(DaticertError::MissingElement("giorno"))?;
        let ora = self.ora.ok_or(DaticertError::MissingElement("ora"))?;
        let data = parse_date(&zona, &giorno, &ora)?;
        Ok(Daticert {
            tipo,
            errore: self.errore.unwrap_or(Errore::Nessuno),
            mittente,
            destinatari: self.destinatari,
            risposte: self.risposte.unwrap_or_default(),
            oggetto: self.oggetto.unwrap_or_default(),
            gestore_emittente: self.gestore_emittente.unwrap_or_default(),
            data,
            identificativo,
            msgid: self.msgid.unwrap_or_default(),
            ricevuta: self.ricevuta,
            consegna: self.consegna,
            errore_esteso: self.errore_esteso,
        })
    }
}

fn required(value: Option<String>, name: &'static str) -> Result<String, DaticertError> {
    match value {
        None => Err(DaticertError::MissingElement(name)),
        Some(v) if v.is_empty() => Err(DaticertError::EmptyElement(name)),
        Some(v) => Ok(v),
    }
}

fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The value of attribute `attribute`, unescaped; `None` when absent.
fn attribute(
    reader: &Reader<&[u8]>,
    e: &BytesStart<'_>,
    element: &'static str,
    attribute: &'static str,
) -> Result<Option<String>, DaticertError> {
    let xml_error = |message: String| DaticertError::Xml {
        position: reader.buffer_position(),
        message: format!("in <{element}>: {message}"),
    };
    let mut found = None;
    for attr in e.attributes() {
        let attr = attr.map_err(|err| xml_error(err.to_string()))?;
        if attr.key.as_ref() == attribute.as_bytes() {
            let value = attr
                .decode_and_unescape_value_with(reader.decoder(), resolve_xml_entity)
                .map_err(|err| xml_error(err.to_string()))?;
            found = Some(value.into_owned());
        }
    }
    Ok(found)
}

enum RefError {
    Xml(quick_xml::Error),
    Unknown(String),
}

fn resolve_ref(r: &BytesRef<'_>) -> Result<String, RefError> {
    if let Some(c) = r.resolve_char_ref().map_err(RefError::Xml)? {
        return Ok(c.to_string());
    }
    let name = r
        .decode()
        .map_err(|e| RefError::Xml(quick_xml::Error::from(e)))?;
    resolve_xml_entity(&name)
        .map(str::to_owned)
        .ok_or_else(|| RefError::Unknown(name.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="avvenuta-consegna" errore="nessuno">
  <intestazione>
    <mittente>mario.rossi@pec.a.it</mittente>
    <destinatari tipo="certificato">anna@pec.b.it</destinatari>
    <destinatari tipo="esterno">x@gmail.com</destinatari>
    <risposte>mario.rossi@pec.a.it</risposte>
    <oggetto>Prova</oggetto>
  </intestazione>
  <dati>
    <gestore-emittente>PEC provider of pec.b.it</gestore-emittente>
    <data zona="+0100">
      <giorno>23/11/2026</giorno>
      <ora>17:00:00</ora>
    </data>
    <identificativo>opec.20261123170000.1234@pec.a.it</identificativo>
    <msgid>&lt;abc@client&gt;</msgid>
    <ricevuta tipo="completa"/>
    <consegna>anna@pec.b.it</consegna>
    <errore-esteso>5.1.1 - mailbox unknown</errore-esteso>
  </dati>
</postacert>
"#;

    fn at(rfc3339: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(rfc3339).unwrap()
    }

    fn full() -> Daticert {
        Daticert {
            tipo: Tipo::AvvenutaConsegna,
            errore: Errore::Nessuno,
            mittente: "mario.rossi@pec.a.it".into(),
            destinatari: vec![
                Destinatario {
                    address: "anna@pec.b.it".into(),
                    tipo: TipoDestinatario::Certificato,
                },
                Destinatario {
                    address: "x@gmail.com".into(),
                    tipo: TipoDestinatario::Esterno,
                },
            ],
            risposte: "mario.rossi@pec.a.it".into(),
            oggetto: "Prova".into(),
            gestore_emittente: "PEC provider of pec.b.it".into(),
            data: at("2026-11-23T17:00:00+01:00"),
            identificativo: "opec.20261123170000.1234@pec.a.it".into(),
            msgid: "<abc@client>".into(),
            ricevuta: Some(TipoRicevuta::Completa),
            consegna: Some("anna@pec.b.it".into()),
            errore_esteso: Some("5.1.1 - mailbox unknown".into()),
        }
    }

    fn minimal() -> Daticert {
        Daticert {
            tipo: Tipo::Accettazione,
            errore: Errore::Nessuno,
            mittente: "a@pec.a.it".into(),
            destinatari: vec![],
            risposte: String::new(),
            oggetto: String::new(),
            gestore_emittente: String::new(),
            data: at("2026-07-01T09:30:05+02:00"),
            identificativo: "id-1".into(),
            msgid: String::new(),
            ricevuta: None,
            consegna: None,
            errore_esteso: None,
        }
    }

    fn error_of(xml: &str) -> DaticertError {
        match Daticert::from_xml(xml) {
            Ok(d) => panic!("expected an error, parsed {d:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn full_document_round_trips() {
        let d = full();
        assert_eq!(Daticert::from_xml(&d.to_xml()).unwrap(), d);
    }

    #[test]
    fn minimal_document_round_trips_and_omits_optional_elements() {
        let d = minimal();
        let xml = d.to_xml();
        for absent in ["<ricevuta", "<consegna", "<errore-esteso"] {
            assert!(!xml.contains(absent), "{absent} in {xml}");
        }
        assert_eq!(Daticert::from_xml(&xml).unwrap(), d);
    }

    #[test]
    fn the_rfc_shaped_example_parses() {
        assert_eq!(Daticert::from_xml(EXAMPLE).unwrap(), full());
    }

    #[test]
    fn writes_the_example_shape() {
        assert_eq!(full().to_xml(), EXAMPLE);
    }

    #[test]
    fn all_enum_values_parse_back_from_their_names() {
        for &t in Tipo::ALL {
            assert_eq!(t.as_str().parse::<Tipo>().unwrap(), t);
        }
        for &e in Errore::ALL {
            assert_eq!(e.as_str().parse::<Errore>().unwrap(), e);
        }
        for r in [
            TipoRicevuta::Completa,
            TipoRicevuta::Breve,
            TipoRicevuta::Sintetica,
        ] {
            assert_eq!(r.as_str().parse::<TipoRicevuta>().unwrap(), r);
        }
        for t in [TipoDestinatario::Certificato, TipoDestinatario::Esterno] {
            assert_eq!(t.as_str().parse::<TipoDestinatario>().unwrap(), t);
        }
        assert_eq!(TipoRicevuta::default(), TipoRicevuta::Completa);
    }

    #[test]
    fn unknown_enum_values_are_named_in_the_error() {
        let msg = "consegnata".parse::<Tipo>().unwrap_err().to_string();
        assert!(
            msg.contains("\"consegnata\"") && msg.contains("tipo"),
            "{msg}"
        );
        let msg = "boh".parse::<Errore>().unwrap_err().to_string();
        assert!(msg.contains("\"boh\"") && msg.contains("errore"), "{msg}");
    }

    #[test]
    fn winter_time_in_italy_is_plus_one_hour() {
        let now = Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap();
        let it = italian_time(now);
        assert_eq!(it.offset().local_minus_utc(), 3600);
        assert_eq!(it, now);
        let mut d = minimal();
        d.data = it;
        let xml = d.to_xml();
        assert!(xml.contains(r#"<data zona="+0100">"#), "{xml}");
        assert!(xml.contains("<ora>13:00:00</ora>"), "{xml}");
    }

    #[test]
    fn summer_time_in_italy_is_plus_two_hours() {
        let now = Utc.with_ymd_and_hms(2026, 7, 15, 12, 0, 0).unwrap();
        let it = italian_time(now);
        assert_eq!(it.offset().local_minus_utc(), 7200);
        let mut d = minimal();
        d.data = it;
        let xml = d.to_xml();
        assert!(xml.contains(r#"<data zona="+0200">"#), "{xml}");
        assert!(xml.contains("<giorno>15/07/2026</giorno>"), "{xml}");
        assert!(xml.contains("<ora>14:00:00</ora>"), "{xml}");
    }

    #[test]
    fn the_switch_to_summer_time_happens_at_one_utc() {
        let before = Utc.with_ymd_and_hms(2026, 3, 29, 0, 59, 59).unwrap();
        let after = Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap();
        assert_eq!(italian_time(before).offset().local_minus_utc(), 3600);
        assert_eq!(italian_time(after).offset().local_minus_utc(), 7200);
    }

    #[test]
    fn negative_offsets_and_subseconds_are_written_to_the_second() {
        let mut d = minimal();
        d.data = at("2026-02-03T04:05:06.789-03:30");
        let xml = d.to_xml();
        assert!(xml.contains(r#"zona="-0330""#), "{xml}");
        let back = Daticert::from_xml(&xml).unwrap();
        assert_eq!(back.data, at("2026-02-03T04:05:06-03:30"));
        assert_eq!(back.data.offset(), d.data.offset());
    }

    #[test]
    fn hostile_subjects_round_trip_without_injecting_elements() {
        let hostile = [
            "</oggetto><x>",
            "</oggetto></intestazione><dati><identificativo>forged</identificativo>",
            "&amp; &lt; & < > \" '",
            "line one\r\nline two\rthree\n",
            "  spaced  ",
            "Così è — 日本語 🎉",
            "]]><![CDATA[x]]>",
            "<!-- comment -->",
        ];
        for subject in hostile {
            let mut d = full();
            d.oggetto = subject.to_owned();
            d.gestore_emittente = subject.to_owned();
            d.errore_esteso = Some(subject.to_owned());
            let xml = d.to_xml();
            assert!(!xml.contains("<x>"), "{xml}");
            assert!(!xml.contains("<!--"), "{xml}");
            assert_eq!(xml.matches("<identificativo>").count(), 1, "{xml}");
            assert_eq!(Daticert::from_xml(&xml).unwrap(), d, "{subject:?}");
        }
    }

    #[test]
    fn characters_xml_cannot_carry_become_replacement_characters() {
        let mut d = minimal();
        d.oggetto = "a\u{0}b\u{1b}c\u{FFFF}".into();
        let back = Daticert::from_xml(&d.to_xml()).unwrap();
        assert_eq!(back.oggetto, "a\u{FFFD}b\u{FFFD}c\u{FFFD}");
    }

    #[test]
    fn element_order_whitespace_comments_and_unknown_elements_are_tolerated() {
        let xml = r#"<!DOCTYPE postacert SYSTEM "Docs/postacert.dtd">
            <postacert tipo="accettazione">
              <!-- some provider's comment -->
              <dati>
                <identificativo>
                   id-1
                </identificativo>
                <extra><mittente>not.me@x.it</mittente></extra>
                <data zona="+0200"><ora>09:30:05</ora><giorno>01/07/2026</giorno></data>
              </dati>
              <futuro attr="1"/>
              <intestazione><mittente>a@pec.a.it</mittente></intestazione>
            </postacert>"#;
        assert_eq!(Daticert::from_xml(xml).unwrap(), minimal());
    }

    #[test]
    fn a_document_with_another_root_is_refused() {
        let xml = EXAMPLE.replace("postacert", "ricevuta");
        assert!(matches!(error_of(&xml), DaticertError::WrongRoot(r) if r == "ricevuta"));
        assert!(matches!(error_of(""), DaticertError::NoRoot));
        assert!(matches!(error_of("just text"), DaticertError::NoRoot));
    }

    #[test]
    fn each_required_field_missing_is_named() {
        let cases: [(&str, &str, &str); 7] = [
            (r#" tipo="avvenuta-consegna""#, "", "tipo"),
            (
                "<mittente>mario.rossi@pec.a.it</mittente>",
                "",
                "<mittente>",
            ),
            (
                "<identificativo>opec.20261123170000.1234@pec.a.it</identificativo>",
                "",
                "<identificativo>",
            ),
            (r#" zona="+0100""#, "", "zona"),
            ("<giorno>23/11/2026</giorno>", "", "<giorno>"),
            ("<ora>17:00:00</ora>", "", "<ora>"),
            (r#" tipo="certificato""#, "", "tipo"),
        ];
        for (remove, with, named) in cases {
            let xml = EXAMPLE.replacen(remove, with, 1);
            assert_ne!(xml, EXAMPLE);
            let msg = error_of(&xml).to_string();
            assert!(msg.contains(named), "removing {remove:?}: {msg}");
        }
        let start = EXAMPLE.find("<data ").unwrap();
        let end = EXAMPLE.find("</data>").unwrap() + "</data>".len();
        let without_data = format!("{}{}", &EXAMPLE[..start], &EXAMPLE[end..]);
        assert!(matches!(
            error_of(&without_data),
            DaticertError::MissingElement("data")
        ));
        let empty_sender = EXAMPLE.replace(">mario.rossi@pec.a.it</mittente>", "> </mittente>");
        assert!(matches!(
            error_of(&empty_sender),
            DaticertError::EmptyElement("mittente")
        ));
    }

    #[test]
    fn bad_dates_and_offsets_are_refused() {
        for (from, to, element) in [
            ("23/11/2026", "31/11/2026", "giorno"),
            ("23/11/2026", "2026-11-23", "giorno"),
            ("17:00:00", "25:00:00", "ora"),
            ("17:00:00", "5 pm", "ora"),
            ("+0100", "+01:00", "data"),
            ("+0100", "+2400", "data"),
            ("+0100", "CET", "data"),
        ] {
            let xml = EXAMPLE.replacen(from, to, 1);
            match error_of(&xml) {
                DaticertError::BadDate { element: e, .. } => assert_eq!(e, element, "{to}"),
                other => panic!("{to}: {other}"),
            }
        }
    }

    #[test]
    fn invalid_attribute_values_repeated_elements_and_trailing_content_are_refused() {
        let bad_tipo = EXAMPLE.replace("avvenuta-consegna", "consegnata");
        assert!(matches!(
            error_of(&bad_tipo),
            DaticertError::InvalidValue {
                attribute: "tipo",
                ..
            }
        ));
        let twice = EXAMPLE.replace(
            "<oggetto>Prova</oggetto>",
            "<mittente>evil@x.it</mittente><oggetto>Prova</oggetto>",
        );
        assert!(matches!(
            error_of(&twice),
            DaticertError::DuplicateElement("mittente")
        ));
        let trailing = format!("{EXAMPLE}<postacert/>");
        assert!(matches!(
            error_of(&trailing),
            DaticertError::TrailingContent
        ));
        let cut = &EXAMPLE[..EXAMPLE.len() - "</postacert>\n".len()];
        assert!(matches!(error_of(cut), DaticertError::Unterminated(r) if r == "postacert"));
        let entity = EXAMPLE.replace("Prova", "&xxe;");
        assert!(matches!(error_of(&entity), DaticertError::UnknownEntity(n) if n == "xxe"));
        let mismatched = EXAMPLE.replace("</oggetto>", "</soggetto>");
        assert!(matches!(error_of(&mismatched), DaticertError::Xml { .. }));
    }

    /// One character XML 1.0 can carry (its `Char` production): printable
    /// ASCII (including `<>&"'`) most of the time, tab, LF and CR, and any
    /// non-ASCII scalar value outside U+FFFE/U+FFFF. The other C0 controls
    /// cannot be represented at all, even as character references, so
    /// `to_xml` replaces them and they are not generated here.
    fn xml_char() -> impl Strategy<Value = char> {
        prop_oneof![
            8 => proptest::char::range(' ', '~'),
            1 => prop_oneof![Just('\t'), Just('\n'), Just('\r')],
            2 => proptest::char::ranges(
                vec![
                    '\u{80}'..='\u{D7FF}',
                    '\u{E000}'..='\u{FFFD}',
                    '\u{10000}'..='\u{10FFFF}',
                ]
                .into()
            ),
        ]
    }

    fn xml_string() -> impl Strategy<Value = String> {
        proptest::collection::vec(xml_char(), 0..40).prop_map(String::from_iter)
    }

    /// Addresses and identifiers are read trimmed, so they are generated
    /// without surrounding whitespace.
    fn token() -> impl Strategy<Value = String> {
        xml_string().prop_map(|s| s.trim_matches(is_xml_space).to_owned())
    }

    fn required_token() -> impl Strategy<Value = String> {
        token().prop_filter("required fields are not empty", |s| !s.is_empty())
    }

    /// Whole seconds (the document's precision), years that print as four
    /// digits, offsets in whole minutes (what `zona` can say).
    fn data() -> impl Strategy<Value = DateTime<FixedOffset>> {
        (0i64..=7_258_118_399, -(23 * 60 + 59)..=(23 * 60 + 59)).prop_map(|(secs, minutes)| {
            let offset = FixedOffset::east_opt(minutes * 60).unwrap();
            DateTime::from_timestamp(secs, 0)
                .unwrap()
                .with_timezone(&offset)
        })
    }

    fn daticert() -> impl Strategy<Value = Daticert> {
        let tipo = proptest::sample::select(Tipo::ALL.to_vec());
        let errore = proptest::sample::select(Errore::ALL.to_vec());
        let destinatario = (
            token(),
            prop_oneof![
                Just(TipoDestinatario::Certificato),
                Just(TipoDestinatario::Esterno)
            ],
        )
            .prop_map(|(address, tipo)| Destinatario { address, tipo });
        let ricevuta = proptest::option::of(prop_oneof![
            Just(TipoRicevuta::Completa),
            Just(TipoRicevuta::Breve),
            Just(TipoRicevuta::Sintetica),
        ]);
        (
            (
                tipo,
                errore,
                required_token(),
                proptest::collection::vec(destinatario, 0..4),
                token(),
                xml_string(),
            ),
            (
                xml_string(),
                data(),
                required_token(),
                token(),
                ricevuta,
                proptest::option::of(token()),
                proptest::option::of(xml_string()),
            ),
        )
            .prop_map(
                |(
                    (tipo, errore, mittente, destinatari, risposte, oggetto),
                    (
                        gestore_emittente,
                        data,
                        identificativo,
                        msgid,
                        ricevuta,
                        consegna,
                        errore_esteso,
                    ),
                )| Daticert {
                    tipo,
                    errore,
                    mittente,
                    destinatari,
                    risposte,
                    oggetto,
                    gestore_emittente,
                    data,
                    identificativo,
                    msgid,
                    ricevuta,
                    consegna,
                    errore_esteso,
                },
            )
    }

    /// A byte-level edit of a document: insert a byte or delete one, at a
    /// position taken modulo the current length.
    #[derive(Debug, Clone)]
    enum Edit {
        Insert(usize, u8),
        Delete(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let byte = prop_oneof![
            3 => proptest::sample::select(b"<>/&;\"'=?!-[] \n#x0".to_vec()),
            1 => any::<u8>(),
        ];
        prop_oneof![
            (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<usize>().prop_map(Edit::Delete),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = Daticert::from_xml(&s);
        }

        #[test]
        fn xml_like_noise_never_panics(s in "[<>/&;#a-z=\"' ?!\\-\\[\\]]{0,200}") {
            let _ = Daticert::from_xml(&s);
        }

        #[test]
        fn mutated_documents_never_panic(
            d in daticert(),
            edits in proptest::collection::vec(edit(), 1..12),
        ) {
            let mut bytes = d.to_xml().into_bytes();
            for e in edits {
                match e {
                    Edit::Insert(i, b) => {
                        let at = i % (bytes.len() + 1);
                        bytes.insert(at, b);
                    }
                    Edit::Delete(i) => {
                        if !bytes.is_empty() {
                            let at = i % bytes.len();
                            bytes.remove(at);
                        }
                    }
                }
            }
            let _ = Daticert::from_xml(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn any_daticert_round_trips_unchanged(d in daticert()) {
            let xml = d.to_xml();
            prop_assert_eq!(Daticert::from_xml(&xml).map_err(|e| e.to_string()), Ok(d));
        }
    }
}
