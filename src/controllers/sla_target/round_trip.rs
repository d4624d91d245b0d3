//! The `PecRoundTrip` probe: a PEC message from a probe mailbox to itself,
//! as a client would send it, and its two signed receipts read back.
//!
//! 1. Submission on the access point (port 465, implicit TLS, AUTH PLAIN),
//!    by lettre over a TLS connection that trusts exactly the certificate of
//!    the domain's TLS Secret (pinned: the gateways serve that certificate,
//!    whichever CA issued it).
//! 2. The message API (port 443, same pinning, HTTP Basic) is polled until
//!    the acceptance receipt and the delivery receipt that name the probe's
//!    Message-ID are there, each verified with [`pec_core::smime`] against
//!    the certificates the domain's SigningKey publishes.
//! 3. Everything the probe finds of its own (receipts, the transport
//!    envelope, late arrivals of earlier rounds) is deleted, so the mailbox
//!    stays empty.
//!
//! The round trip as a whole must finish within the probe's timeout. The
//! outage causes: `NoAcceptance` (the submission failed, or no acceptance
//! receipt came, or a non-acceptance notice did), `NoDelivery` (accepted, but
//! no delivery receipt came, or a delivery error did) and `BadSignature` (a
//! receipt that does not verify).

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use base64::Engine as _;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode, body::Bytes, client::conn::http1};
use hyper_util::rt::TokioIo;
use lettre::{
    Message,
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, AsyncTokioStream},
        extension::ClientId,
    },
};
use pec_core::smime::{self, TrustedSigners};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
        pki_types::{CertificateDer, ServerName, UnixTime},
    },
};

use super::probe::Seen;

/// The API path of the probe mailbox's messages.
const MESSAGES: &str = "/api/v1/messages";
/// How often the message API is asked while waiting for the receipts.
const POLL: Duration = Duration::from_millis(250);

/// One round trip to make.
pub struct RoundTrip {
    /// The PEC domain.
    pub domain: String,
    /// The probe mailbox's full address.
    pub address: String,
    /// Its password.
    pub password: String,
    /// `host:port` of the access point.
    pub submission: String,
    /// `host:port` of the message API.
    pub api: String,
    /// DER of the certificates the gateways may present (from `tls.crt`).
    pub pinned: Vec<Vec<u8>>,
    /// The certificates receipts must verify against.
    pub trusted: TrustedSigners,
    /// What every Message-ID of this SlaTarget's probes starts with.
    pub tag: String,
    /// This round's Message-ID (without the angle brackets): the tag, a
    /// unique part, `@` and the domain.
    pub message_id: String,
    /// The bound on the whole round trip.
    pub timeout: Duration,
}

/// What the probe learnt of one message in the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Acceptance,
    NonAcceptance,
    Delivery,
    DeliveryError,
    /// The transport envelope, or another receipt of ours.
    Other,
    /// A receipt of ours whose signature does not verify.
    Unverified,
}

/// Makes the round trip and says what it saw.
pub async fn run(rt: &RoundTrip) -> Seen {
    let deadline = Instant::now() + rt.timeout;
    let tls = pinned_connector(rt.pinned.clone());
    let message_id = &rt.message_id;
    let submitted = tokio::time::timeout_at(deadline, submit(rt, &tls, message_id)).await;
    match submitted {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::info!(domain = %rt.domain, error = %e, "PEC round trip: submission failed");
            return Seen::down("NoAcceptance");
        }
        Err(_) => {
            tracing::info!(domain = %rt.domain, "PEC round trip: submission timed out");
            return Seen::down("NoAcceptance");
        }
    }
    let mut api = Api::new(rt, tls);
    let mut found: Vec<Found> = Vec::new();
    let mut seen_ids = HashSet::new();
    loop {
        if let Err(e) = api.collect(message_id, &mut seen_ids, &mut found).await {
            tracing::debug!(domain = %rt.domain, error = %e, "PEC round trip: message API");
        }
        if let Some(seen) = verdict(&found, false) {
            return seen;
        }
        if Instant::now() + POLL >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let seen = verdict(&found, true).unwrap_or_else(|| Seen::down("NoAcceptance"));
    tracing::info!(domain = %rt.domain, cause = seen.cause, found = ?found, "PEC round trip: no full answer in time");
    seen
}

/// The outcome once `found` decides it; with `final_` (the time is up),
/// whatever is missing decides it.
fn verdict(found: &[Found], final_: bool) -> Option<Seen> {
    let has = |f: Found| found.contains(&f);
    if has(Found::Unverified) {
        return Some(Seen::down("BadSignature"));
    }
    if has(Found::NonAcceptance) {
        return Some(Seen::down("NoAcceptance"));
    }
    if has(Found::DeliveryError) {
        return Some(Seen::down("NoDelivery"));
    }
    match (has(Found::Acceptance), has(Found::Delivery)) {
        (true, true) => Some(Seen::up()),
        (false, _) if final_ => Some(Seen::down("NoAcceptance")),
        (true, false) if final_ => Some(Seen::down("NoDelivery")),
        _ => None,
    }
}

/// Submits the probe message on the access point.
async fn submit(rt: &RoundTrip, tls: &TlsConnector, message_id: &str) -> Result<(), String> {
    let message = Message::builder()
        .from(
            rt.address
                .parse()
                .map_err(|e| format!("probe address: {e}"))?,
        )
        .to(rt
            .address
            .parse()
            .map_err(|e| format!("probe address: {e}"))?)
        .subject("SLA probe")
        .message_id(Some(format!("<{message_id}>")))
        .body(format!("Availability probe {message_id}\r\n"))
        .map_err(|e| format!("building the probe message: {e}"))?;
    let stream = connect(&rt.submission, &rt.domain, tls).await?;
    let mut smtp =
        AsyncSmtpConnection::connect_with_transport(Box::new(stream), &ClientId::default())
            .await
            .map_err(|e| format!("greeting: {e}"))?;
    smtp.auth(
        &[Mechanism::Plain],
        &Credentials::new(rt.address.clone(), rt.password.clone()),
    )
    .await
    .map_err(|e| format!("AUTH: {e}"))?;
    smtp.send(message.envelope(), &message.formatted())
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let _ = smtp.quit().await;
    Ok(())
}

/// Opens TCP and then TLS to `address`, naming `domain` in the handshake.
async fn connect(address: &str, domain: &str, tls: &TlsConnector) -> Result<PinnedTls, String> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let name = ServerName::try_from(domain.to_string())
        .map_err(|e| format!("server name {domain}: {e}"))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {address}: {e}"))?;
    Ok(PinnedTls(stream))
}

/// A keep-alive connection to the message API.
struct Api<'a> {
    rt: &'a RoundTrip,
    tls: TlsConnector,
    sender: Option<http1::SendRequest<Empty<Bytes>>>,
    authorization: String,
    /// What every probe message of this SlaTarget contains (`<tag>.`).
    ours: String,
}

impl<'a> Api<'a> {
    fn new(rt: &'a RoundTrip, tls: TlsConnector) -> Self {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", rt.address, rt.password));
        Self {
            rt,
            tls,
            sender: None,
            authorization: format!("Basic {basic}"),
            ours: format!("{}.", rt.tag),
        }
    }

    /// Reads every message not read yet: what is about `message_id` goes
    /// into `found` and is deleted, leftovers of earlier rounds are deleted.
    async fn collect(
        &mut self,
        message_id: &str,
        read: &mut HashSet<String>,
        found: &mut Vec<Found>,
    ) -> Result<(), String> {
        let (status, body) = self.request(Method::GET, MESSAGES).await?;
        if status != StatusCode::OK {
            return Err(format!("listing the mailbox: HTTP {status}"));
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            id: String,
        }
        let entries: Vec<Entry> =
            serde_json::from_slice(&body).map_err(|e| format!("listing the mailbox: {e}"))?;
        for entry in entries {
            if read.contains(&entry.id) {
                continue;
            }
            let path = format!("{MESSAGES}/{}", entry.id);
            let (status, message) = self.request(Method::GET, &path).await?;
            if status != StatusCode::OK {
                continue;
            }
            read.insert(entry.id.clone());
            let ours = contains(&message, message_id.as_bytes());
            if ours {
                found.push(classify(&message, &self.rt.trusted));
            }
            // The probe's mailbox holds nothing but the probe's messages.
            if ours || contains(&message, self.ours.as_bytes()) {
                let _ = self.request(Method::DELETE, &path).await;
            }
        }
        Ok(())
    }

    async fn request(&mut self, method: Method, path: &str) -> Result<(StatusCode, Bytes), String> {
        let sender = match self.sender.as_mut() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let stream = connect(&self.rt.api, &self.rt.domain, &self.tls).await?;
                let (sender, connection) = http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP with {}: {e}", self.rt.api))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                self.sender.insert(sender)
            }
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.rt.domain)
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP {path}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP {path}: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a message of ours is: its `X-Ricevuta` kind, once its signature
/// verifies against `trusted`.
fn classify(message: &[u8], trusted: &TrustedSigners) -> Found {
    let kind = header(message, "X-Ricevuta");
    let Some(kind) = kind else {
        return Found::Other;
    };
    let verified = smime::split_signed(message).is_some_and(|parts| {
        smime::verify_detached(parts.entity, &parts.signature, trusted).is_ok()
    });
    if !verified {
        return Found::Unverified;
    }
    match kind.as_str() {
        "accettazione" => Found::Acceptance,
        "non-accettazione" => Found::NonAcceptance,
        "avvenuta-consegna" => Found::Delivery,
        "errore-consegna" | "preavviso-errore-consegna" => Found::DeliveryError,
        _ => Found::Other,
    }
}

/// The value of the top-level header `name` (unfolded, trimmed).
fn header(message: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ");
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// A TLS client that trusts exactly the certificates in `pinned` (and still
/// checks that the server holds their keys).
fn pinned_connector(pinned: Vec<Vec<u8>>) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        certificates: pinned,
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct Pinned {
    certificates: Vec<Vec<u8>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .certificates
            .iter()
            .any(|c| c.as_slice() == end_entity.as_ref())
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A pinned TLS stream lettre can speak SMTP over.
#[derive(Debug)]
struct PinnedTls(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for PinnedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PinnedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for PinnedTls {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_waits_for_both_receipts_and_names_what_is_missing() {
        use Found::*;
        assert_eq!(verdict(&[Acceptance], false), None);
        assert_eq!(
            verdict(&[Other, Acceptance, Delivery], false),
            Some(Seen::up())
        );
        assert_eq!(verdict(&[], true).map(|s| s.cause), Some("NoAcceptance"));
        assert_eq!(
            verdict(&[Acceptance], true).map(|s| s.cause),
            Some("NoDelivery")
        );
        assert_eq!(
            verdict(&[Acceptance, Unverified], false).map(|s| s.cause),
            Some("BadSignature")
        );
        assert_eq!(
            verdict(&[NonAcceptance], false).map(|s| s.cause),
            Some("NoAcceptance")
        );
        assert_eq!(
            verdict(&[Acceptance, DeliveryError], false).map(|s| s.cause),
            Some("NoDelivery")
        );
    }

    #[test]
    fn headers_are_read_from_the_top_block_only() {
        let m =
            b"Subject: x\r\nX-Ricevuta:\r\n accettazione\r\n\r\nX-Ricevuta: avvenuta-consegna\r\n";
        assert_eq!(header(m, "x-ricevuta").as_deref(), Some("accettazione"));
        assert_eq!(header(b"Subject: x\r\n\r\n", "X-Ricevuta"), None);
    }

    #[test]
    fn an_unsigned_receipt_is_a_bad_signature_and_plain_mail_is_other() {
        let trusted = TrustedSigners::default();
        let receipt = b"X-Ricevuta: accettazione\r\nContent-Type: text/plain\r\n\r\nhi\r\n";
        assert_eq!(classify(receipt, &trusted), Found::Unverified);
        assert_eq!(
            classify(b"Subject: x\r\n\r\nhi\r\n", &trusted),
            Found::Other
        );
    }
}
