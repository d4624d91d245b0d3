//! The gateway as other providers and mailbox owners meet it: two real
//! gateway processes for two domains, a real SoftHSM2 token, a real clamd,
//! SMTP on loopback, and openssl checking every signature.
//!
//! Run through `e2e/test.sh` (it initialises the token); alone:
//! `. e2e/lib/hsm.sh && init_hsm "$(mktemp -d)" && cargo test -p pec-gateway --test gateway`.

mod support;

use std::time::Duration;

use support::*;

/// A message with `content` as a base64 attachment, as mail clients send files.
fn with_attachment(from: &str, to: &str, subject: &str, content: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(content);
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"file\"\r\n\r\n--file\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n--file\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"file.com\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--file--\r\n"
    )
}

fn daticert_of(message: &[u8]) -> pec_gateway::pec::daticert::Daticert {
    let parts = pec_core::smime::split_signed(message).expect("a signed message");
    let entity = mail_parser::MessageParser::default()
        .parse(parts.entity)
        .expect("entity");
    let xml =
        pec_gateway::pec::classify::attachment(&entity, "daticert.xml").expect("daticert.xml");
    pec_gateway::pec::daticert::Daticert::from_xml(std::str::from_utf8(xml).expect("utf-8"))
        .expect("daticert parses")
}

#[test]
fn a_message_crosses_all_three_points_and_every_receipt_verifies() {
    let p = Pair::start();
    let ca = p.ca_file();
    let (mario, anna) = (p.mario(), p.anna());
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Contratto", "In allegato il contratto.");
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);

    let accepted = p.a.wait_for_mail("mario", "X-Ricevuta: accettazione", 1);
    let envelope =
        p.b.wait_for_mail("anna", "X-Trasporto: posta-certificata", 1);
    let delivered =
        p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);

    for (what, msg, cert) in [
        ("acceptance", &accepted[0], &p.da.cert_pem),
        ("envelope", &envelope[0], &p.da.cert_pem),
        ("delivery receipt", &delivered[0], &p.db.cert_pem),
    ] {
        let signer =
            openssl_verify(msg, &ca).unwrap_or_else(|e| panic!("{what} does not verify: {e}"));
        assert_eq!(
            pem_der(&signer),
            pem_der(cert),
            "{what} is signed by the issuing domain's key"
        );
    }
    let d = daticert_of(&delivered[0]);
    assert_eq!(d.tipo.as_str(), "avvenuta-consegna");
    assert_eq!(d.consegna.as_deref(), Some(anna.as_str()));
    assert_eq!(d.mittente, mario);
    let e = daticert_of(&envelope[0]);
    assert_eq!(
        e.identificativo, d.identificativo,
        "the receipt names the transmission"
    );
    assert!(header_block(&envelope[0]).contains("Subject: POSTA CERTIFICATA: Contratto"));
    let original = pec_gateway::pec::classify::original(&envelope[0]).expect("postacert.eml");
    assert!(String::from_utf8_lossy(&original).contains("In allegato il contratto."));

    // The taking-charge receipt stays between providers: recorded, not delivered.
    wait_for(
        Duration::from_secs(30),
        "the taking-charge receipt in A's legal log",
        || {
            std::fs::read_to_string(p.a.legal_log())
                .is_ok_and(|l| l.contains("\"kind\":\"presa-in-carico\""))
        },
    );
    assert!(p.a.find("mario", "presa-in-carico").is_empty());
    for g in [&p.a, &p.b] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pec-gateway"))
            .args(["log", "verify"])
            .arg(g.legal_log())
            .output()
            .expect("log verify");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_message_within_one_domain_is_delivered_with_receipts() {
    let p = Pair::start();
    let ca = p.ca_file();
    let mario = p.mario();
    let luigi = format!("luigi@{}", p.da.name);
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&luigi], "Interno", "ciao");
    assert_eq!(code, 250, "{text}");
    let envelope =
        p.a.wait_for_mail("luigi", "X-Trasporto: posta-certificata", 1);
    let delivered =
        p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
    openssl_verify(&envelope[0], &ca).expect("envelope verifies");
    openssl_verify(&delivered[0], &ca).expect("receipt verifies");
}

#[test]
fn mail_for_a_domain_without_a_route_goes_to_its_mx_hosts_in_preference_order() {
    let mut p = Pair::start();
    let b = p.db.name.clone();
    let (dead, live) = (format!("dead.{b}"), format!("mx.{b}"));
    // The preferred host hangs up on every connection (a listener on
    // 127.0.0.2 that closes what it accepts): the relay must try it first,
    // then go on to the next one.
    let dead_host = std::net::TcpListener::bind(("127.0.0.2", p.db.smtp)).expect("bind 127.0.0.2");
    let hung_up = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hung_up.clone();
    std::thread::spawn(move || {
        for connection in dead_host.incoming() {
            drop(connection);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let dns = Dns::start(
        &[(&b, &dead, 5), (&b, &live, 10)],
        &[(&dead, "127.0.0.2"), (&live, "127.0.0.1")],
    );
    let config =
        p.da.config(&p.clamd, &p.providers, &[], &p.pin_file)
            .replace(
                "  routes:\n",
                &format!(
                    "  nameservers: [\"127.0.0.1:{}\"]\n  mxPort: {}\n  routes: {{}}\n",
                    dns.port, p.db.smtp
                ),
            );
    p.a.rewrite_config(&config);
    p.a.restart();
    p.a.wait_ready();

    let mario = p.mario();
    let anna = p.anna();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Via MX", "trovato");
    assert_eq!(code, 250, "{text}");
    let envelope = p.b.wait_for_mail("anna", "Via MX", 1);
    assert!(
        hung_up.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the preferred MX host (preference 5) was never tried"
    );
    let delivered =
        p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
    let ca = p.ca_file();
    openssl_verify(&envelope[0], &ca).expect("envelope verifies");
    openssl_verify(&delivered[0], &ca).expect("receipt verifies");

    // A domain that does not exist: the sender gets the non-delivery
    // notice at once, not after the relay deadlines.
    let ghost = format!("nessuno@ghost-{b}");
    let (code, text) = c.send_message(&mario, &[&ghost], "Nessuno", "ciao");
    assert_eq!(code, 250, "{text}");
    let failed = p.a.wait_for_mail("mario", "X-Ricevuta: errore-consegna", 1);
    openssl_verify(&failed[0], &ca).expect("the notice verifies");
    let why = daticert_of(&failed[0]).errore_esteso.unwrap_or_default();
    assert!(
        why.contains("does not exist"),
        "the notice says why: {why:?}"
    );
}

#[test]
fn a_silent_peer_brings_the_warning_then_the_final_notice_on_time() {
    let mut p = Pair::start();
    // The peer is gone (nothing listens on its route any more), and the
    // deadlines are seconds instead of the rule's hours.
    p.b.kill9();
    let config =
        p.da.config(
            &p.clamd,
            &p.providers,
            &[(&p.db.name, p.db.smtp)],
            &p.pin_file,
        )
        .replace("warnAfterSeconds: 43200", "warnAfterSeconds: 3")
        .replace("giveUpAfterSeconds: 86400", "giveUpAfterSeconds: 8");
    p.a.rewrite_config(&config);
    p.a.restart();
    p.a.wait_ready();

    let mario = p.mario();
    let anna = p.anna();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let sent = std::time::Instant::now();
    let (code, text) = c.send_message(&mario, &[&anna], "Nessuna risposta", "ciao");
    assert_eq!(code, 250, "{text}");
    let warning =
        p.a.wait_for_mail("mario", "X-Ricevuta: preavviso-errore-consegna", 1);
    let warned_after = sent.elapsed();
    let final_notice = p.a.wait_for_mail("mario", "X-Ricevuta: errore-consegna", 1);
    let gave_up_after = sent.elapsed();
    println!("warning after {warned_after:?}, final notice after {gave_up_after:?}");
    // Each on its deadline, give or take the 2 s tick that checks them.
    assert!(
        warned_after >= Duration::from_secs(3) && warned_after < Duration::from_secs(8),
        "warning after {warned_after:?}"
    );
    assert!(
        gave_up_after >= Duration::from_secs(8) && gave_up_after < Duration::from_secs(14),
        "final notice after {gave_up_after:?}"
    );
    let ca = p.ca_file();
    openssl_verify(&warning[0], &ca).expect("the warning verifies");
    openssl_verify(&final_notice[0], &ca).expect("the final notice verifies");
    for notice in [&warning[0], &final_notice[0]] {
        let d = daticert_of(notice);
        assert!(
            d.destinatari.iter().any(|r| r.address == anna),
            "the notice names the recipient"
        );
    }
    // Nothing more: one warning, one final notice.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        p.a.find("mario", "X-Ricevuta: preavviso-errore-consegna")
            .len(),
        1
    );
    assert_eq!(p.a.find("mario", "X-Ricevuta: errore-consegna").len(), 1);
}

#[test]
fn eicar_is_refused_with_a_virus_notice_and_kept_in_quarantine() {
    let p = Pair::start();
    let mario = p.mario();
    let anna = p.anna();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_mail(
        &mario,
        &[&anna],
        &with_attachment(&mario, &anna, "Allegato", EICAR.as_bytes()),
    );
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("virus"), "{text}");
    let notice =
        p.a.wait_for_mail("mario", "X-Ricevuta: non-accettazione", 1);
    openssl_verify(&notice[0], &p.ca_file()).expect("notice verifies");
    assert_eq!(daticert_of(&notice[0]).errore.as_str(), "virus");
    assert_eq!(p.a.quarantined(), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        p.b.mailbox("anna").is_empty(),
        "nothing infected is delivered"
    );
}

#[test]
fn oversize_gets_the_non_acceptance_notice() {
    let p = Pair::start();
    let mario = p.mario();
    let anna = p.anna();
    // Announced with SIZE: refused before any byte is sent.
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.cmd(&format!("MAIL FROM:<{mario}> SIZE=300000"));
    assert_eq!(code, 552, "{text}");
    // Not announced: read, refused after DATA, with a signed notice.
    let big = "x".repeat(990);
    let body = std::iter::repeat_n(big.as_str(), 250)
        .collect::<Vec<_>>()
        .join("\r\n");
    let (code, text) = c.send_message(&mario, &[&anna], "Grande", &body);
    assert_eq!(code, 552, "{text}");
    let notice =
        p.a.wait_for_mail("mario", "X-Ricevuta: non-accettazione", 1);
    openssl_verify(&notice[0], &p.ca_file()).expect("notice verifies");
    // The session goes on after a refusal.
    c.expect("NOOP", 250);
}

#[test]
fn formal_errors_are_refused_with_a_reply_and_a_notice() {
    let p = Pair::start();
    let mario = p.mario();
    let anna = p.anna();
    let bruno = format!("bruno@{}", p.db.name);
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (anna, bruno) = (anna.as_str(), bruno.as_str());
    let cases: Vec<(&str, Vec<&str>, String)> = vec![
        (
            "Bcc",
            vec![anna],
            format!("From: {mario}\r\nTo: {anna}\r\nBcc: {bruno}\r\nSubject: b\r\n\r\nx\r\n"),
        ),
        (
            "From",
            vec![anna],
            format!(
                "From: other@{}\r\nTo: {anna}\r\nSubject: f\r\n\r\nx\r\n",
                p.da.name
            ),
        ),
        (
            "neither To nor Cc",
            vec![anna, bruno],
            format!("From: {mario}\r\nTo: {anna}\r\nSubject: r\r\n\r\nx\r\n"),
        ),
        (
            "no valid To",
            vec![anna],
            format!("From: {mario}\r\nSubject: t\r\n\r\nx\r\n"),
        ),
    ];
    for (n, (what, rcpts, msg)) in cases.iter().enumerate() {
        let (code, text) = c.send_mail(&mario, rcpts, msg);
        assert_eq!(code, 550, "{what}: {text}");
        p.a.wait_for_mail("mario", "X-Ricevuta: non-accettazione", n + 1);
    }
    // The reverse path must be the logged-in mailbox.
    let (code, text) = c.cmd(&format!("MAIL FROM:<luigi@{}>", p.da.name));
    assert_eq!(code, 553, "{text}");
    // Header injection through an address never gets past the parser.
    let (code, _) = c.cmd(&format!("MAIL FROM:<{mario}>\rRCPT TO:<x@evil.test>"));
    assert!(code >= 500, "CR in a command is refused");
    assert!(p.b.mailbox("anna").is_empty());
}

#[test]
fn the_smtp_dialogue_refuses_abuse() {
    let p = Pair::start();
    let anna = p.anna();
    // Unknown command, relaying, MAIL before EHLO.
    let mut c = Client::plain(p.b.smtp);
    assert_eq!(c.cmd("FOO bar").0, 500);
    assert_eq!(c.cmd("MAIL FROM:<x@y.test>").0, 503);
    c.expect("EHLO peer.test", 250);
    c.expect("MAIL FROM:<x@y.test>", 250);
    assert_eq!(
        c.cmd("RCPT TO:<someone@elsewhere.test>").0,
        550,
        "no open relay"
    );
    // Too many recipients.
    for i in 0..5 {
        c.expect(&format!("RCPT TO:<r{i}@{}>", p.db.name), 250);
    }
    assert_eq!(c.cmd(&format!("RCPT TO:<r9@{}>", p.db.name)).0, 452);
    c.expect("RSET", 250);
    // Pipelining abuse: the message sent along with DATA, before 354.
    c.expect("MAIL FROM:<x@y.test>", 250);
    c.expect(&format!("RCPT TO:<{anna}>"), 250);
    c.send(b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");

    // AUTH needs TLS: on port 25 it is not offered.
    let mut c = Client::plain(p.b.smtp);
    c.expect("EHLO peer.test", 250);
    assert_eq!(c.cmd("AUTH PLAIN AGZvbwBiYXI=").0, 502);

    // An idle client is dropped (the test config says 3 s).
    let mut c = Client::plain(p.b.smtp);
    let (code, text) = c.reply();
    assert_eq!(code, 421, "idle client: {text}");

    // A client that trickles its message past the DATA deadline (5 s) is dropped.
    let mut c = Client::plain(p.b.smtp);
    c.expect("EHLO peer.test", 250);
    c.expect("MAIL FROM:<x@y.test>", 250);
    c.expect(&format!("RCPT TO:<{anna}>"), 250);
    c.expect("DATA", 354);
    let started = std::time::Instant::now();
    let mut code = 0;
    while started.elapsed() < Duration::from_secs(15) {
        // A line a second keeps the idle timer happy, never the DATA deadline.
        if c.try_send(b"X-Slow: a\r\n").is_err() {
            break;
        }
        // The gateway speaks during DATA only when it gives up.
        if let Some((got, _)) = c.reply_within(Duration::from_secs(1)) {
            code = got;
            break;
        }
    }
    assert_eq!(code, 421, "a trickling DATA is cut off");
}

#[test]
fn failed_logins_are_rate_limited_and_never_logged() {
    let p = Pair::start();
    let mario = p.mario();
    let mut c = Client::tls(p.a.submissions);
    c.expect("EHLO client.test", 250);
    let bad = |pw: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("\0{mario}\0{pw}"))
    };
    for _ in 0..3 {
        assert_eq!(
            c.cmd(&format!("AUTH PLAIN {}", bad("wrong-password-123")))
                .0,
            535
        );
    }
    // Locked out now, even with the right password.
    let (code, text) = c.cmd(&format!("AUTH PLAIN {}", bad(MARIO_PASSWORD)));
    assert_eq!(code, 454, "{text}");
    // Unauthenticated submission is refused.
    assert_eq!(c.cmd(&format!("MAIL FROM:<{mario}>")).0, 530);
    let log = p.a.output();
    assert!(
        !log.contains("wrong-password-123") && !log.contains(MARIO_PASSWORD),
        "a password reached the log"
    );
    let (_, _, metrics) = p.a.http_get("/metrics");
    assert!(
        metrics.contains("pec_gateway_auth_failures_total 3"),
        "{metrics}"
    );
}

#[test]
fn plain_mail_from_outside_becomes_an_anomaly_envelope() {
    let p = Pair::start();
    let anna = p.anna();
    let mut c = Client::plain(p.b.smtp);
    c.expect("EHLO mx.example.test", 250);
    let (code, text) = c.send_mail(
        "someone@example.test",
        &[&anna],
        &message("someone@example.test", &[&anna], "Ciao", "plain mail"),
    );
    assert_eq!(code, 250, "{text}");
    let anomaly = p.b.wait_for_mail("anna", "X-Trasporto: errore", 1);
    assert!(header_block(&anomaly[0]).contains("ANOMALIA MESSAGGIO: Ciao"));
    openssl_verify(&anomaly[0], &p.ca_file()).expect("anomaly envelope verifies");
}

/// A transmission from `from` to `to` with identifier `id`.
fn transmission(
    id: &str,
    from: &str,
    to: &str,
    subject: &str,
) -> pec_gateway::pec::compose::Transmission {
    use pec_gateway::pec::daticert;
    pec_gateway::pec::compose::Transmission {
        identificativo: id.to_string(),
        msgid: format!("{}@client.test", id.replace('@', ".")),
        mittente: from.to_string(),
        destinatari: vec![daticert::Destinatario {
            address: to.to_string(),
            tipo: daticert::TipoDestinatario::Certificato,
        }],
        oggetto: subject.to_string(),
        tipo_ricevuta: daticert::TipoRicevuta::Completa,
    }
}

/// A transport envelope from domain A to Anna, signed by `key_id` with
/// certificate `cert_pem` (valid, unknown or tampered as the test wants).
fn forged_envelope(p: &Pair, key_id: &str, cert_pem: &str, tamper: bool) -> Vec<u8> {
    let (mario, anna) = (p.mario(), p.anna());
    let original = message(&mario, &[&anna], "Forged", "x");
    envelope_signed_by(p, key_id, cert_pem, &original, tamper)
}

/// A transport envelope from domain A to Anna carrying `original`, signed
/// by `key_id` with certificate `cert_pem`, tampered after signing if
/// `tamper`.
fn envelope_signed_by(
    p: &Pair,
    key_id: &str,
    cert_pem: &str,
    original: &str,
    tamper: bool,
) -> Vec<u8> {
    use pec_gateway::pec::compose;
    let mario = p.mario();
    let anna = p.anna();
    let id = format!(
        "opec.forged.{}.{}@{}",
        std::process::id(),
        unique(),
        p.da.name
    );
    let t = transmission(&id, &mario, &anna, "Forged");
    let issuer = compose::Issuer {
        domain: &p.da.name,
        gestore: "test",
    };
    let mut composed = compose::transport_envelope(
        &t,
        original.as_bytes(),
        std::slice::from_ref(&anna),
        issuer,
        pec_gateway::clock::now(),
    );
    let cert = pec_core::smime::SignerCertificate::from_pem(cert_pem).expect("cert");
    let sig = pec_core::smime::sign_detached(
        &composed.entity,
        &cert,
        pec_gateway::clock::system_now(),
        |d| token().sign(key_id, d),
    )
    .expect("sign");
    if tamper {
        let pos = composed
            .entity
            .windows(1)
            .position(|w| w == b"x")
            .expect("a byte to change");
        composed.entity[pos] = b'y';
    }
    pec_core::smime::multipart_signed(&composed.headers, &composed.entity, &sig, "forged-boundary")
}

#[test]
fn unknown_signers_and_tampered_envelopes_become_anomalies() {
    let p = Pair::start();
    let anna = p.anna();
    // A key certified by the same CA but absent from the providers' index.
    let (rogue_id, rogue_spki) = token().new_key("rogue");
    let rogue_cert = pki().signing_cert(&rogue_spki, &p.da.name);
    for (what, msg) in [
        (
            "UnknownSigner",
            forged_envelope(&p, &rogue_id, &rogue_cert, false),
        ),
        (
            "altered",
            forged_envelope(&p, &p.da.key_id, &p.da.cert_pem, true),
        ),
    ] {
        let mut c = Client::plain(p.b.smtp);
        c.expect("EHLO peer.test", 250);
        let text = String::from_utf8(msg).expect("ascii");
        let (code, reply) =
            c.send_mail(&format!("posta-certificata@{}", p.da.name), &[&anna], &text);
        assert_eq!(code, 250, "{what}: {reply}");
        let anomalies = p.b.wait_for_mail("anna", "X-Trasporto: errore", 1);
        let body = String::from_utf8_lossy(anomalies.last().expect("one"));
        assert!(body.contains(what), "{what} named in the anomaly: {body}");
        std::fs::remove_dir_all(p.b.dir.join("mailboxes/anna")).expect("clear mailbox");
    }
    assert!(
        p.b.find("anna", "X-Trasporto: posta-certificata")
            .is_empty(),
        "nothing forged is delivered as certified"
    );
    // The same envelope, properly signed, is delivered.
    let good = forged_envelope(&p, &p.da.key_id, &p.da.cert_pem, false);
    let mut c = Client::plain(p.b.smtp);
    c.expect("EHLO peer.test", 250);
    let (code, _) = c.send_mail(
        &format!("posta-certificata@{}", p.da.name),
        &[&anna],
        &String::from_utf8(good).expect("ascii"),
    );
    assert_eq!(code, 250);
    p.b.wait_for_mail("anna", "X-Trasporto: posta-certificata", 1);
}

/// A delivery receipt for `t` to its sender, issued and signed by B's key
/// as B would: `(its Message-ID, the message)`.
fn receipt_from_b(
    p: &Pair,
    t: &pec_gateway::pec::compose::Transmission,
    rcpt: &str,
) -> (String, String) {
    let composed = delivered_by_b(p, t, rcpt, None);
    (composed.message_id.clone(), signed_by_b(p, &composed))
}

/// The delivery receipt B composes for `t` and `rcpt`, carrying `original`
/// when `t` asks for complete receipts.
fn delivered_by_b(
    p: &Pair,
    t: &pec_gateway::pec::compose::Transmission,
    rcpt: &str,
    original: Option<&[u8]>,
) -> pec_gateway::pec::compose::Composed {
    use pec_gateway::pec::compose;
    let issuer = compose::Issuer {
        domain: &p.db.name,
        gestore: "B",
    };
    compose::receipt(
        t,
        compose::Notice::Delivered(rcpt),
        &t.mittente,
        issuer,
        pec_gateway::clock::now(),
        original,
    )
}

/// `composed` signed with B's key, as a message.
fn signed_by_b(p: &Pair, composed: &pec_gateway::pec::compose::Composed) -> String {
    let cert = pec_core::smime::SignerCertificate::from_pem(&p.db.cert_pem).expect("cert");
    let sig = pec_core::smime::sign_detached(
        &composed.entity,
        &cert,
        pec_gateway::clock::system_now(),
        |d| token().sign(&p.db.key_id, d),
    )
    .expect("sign");
    let msg = pec_core::smime::multipart_signed(&composed.headers, &composed.entity, &sig, "b");
    String::from_utf8(msg).expect("ascii")
}

/// Sends `message` to A's incoming point as provider B does.
fn send_as_b(p: &Pair, to: &str, message: &str) -> (u16, String) {
    let mut c = Client::plain(p.a.smtp);
    c.expect("EHLO peer.test", 250);
    c.send_mail(&format!("posta-certificata@{}", p.db.name), &[to], message)
}

#[test]
fn a_receipt_for_a_message_never_sent_is_an_anomaly() {
    let p = Pair::start();
    let mario = p.mario();
    let anna = p.anna();
    let t = transmission(
        &format!("opec.never-sent@{}", p.da.name),
        &mario,
        &anna,
        "Mai inviato",
    );
    let (_, msg) = receipt_from_b(&p, &t, &anna);
    let (code, _) = send_as_b(&p, &mario, &msg);
    assert_eq!(code, 250);
    let anomaly = p.a.wait_for_mail("mario", "X-Trasporto: errore", 1);
    assert!(String::from_utf8_lossy(&anomaly[0]).contains("never sent"));
    assert!(
        p.a.find("mario", "X-Ricevuta: avvenuta-consegna")
            .is_empty()
    );
}

/// A receipt for a message sent here is recorded and in the sender's
/// mailbox before its 250, not queued; sent again (as a provider does that
/// heard no reply), it is answered alike and delivered once.
#[test]
fn a_receipt_is_delivered_before_its_250_and_once_when_sent_again() {
    let p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Ricevuta", "Prova.");
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
    let first =
        p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
    let sent = daticert_of(&first[0]);
    let mut t = transmission(&sent.identificativo, &mario, &anna, "Ricevuta");
    t.msgid = sent.msgid.clone();

    // Another delivery receipt for the same transmission, as B signs it;
    // for another address, so it is not the one B sent (a receipt's
    // Message-ID derives from its transmission, kind and address).
    let other = format!("bruno@{}", p.db.name);
    let (message_id, receipt) = receipt_from_b(&p, &t, &other);
    for attempt in ["first", "again"] {
        let (code, text) = send_as_b(&p, &mario, &receipt);
        assert_eq!(code, 250, "{attempt}: {text}");
        assert!(
            text.contains("recorded"),
            "{attempt}: settled, not queued: {text}"
        );
        assert_eq!(
            p.a.find("mario", &message_id).len(),
            1,
            "{attempt}: in the mailbox once, when the 250 came"
        );
    }
    assert_eq!(
        p.a.find("mario", "X-Ricevuta: avvenuta-consegna").len(),
        2,
        "the gateway's own receipt and the one sent twice"
    );
}

/// A complete delivery receipt carries back the original A scanned at
/// submission: clamd reads the rest of it, not that original again. A
/// virus in the rest, or an original that differs, is still found.
#[test]
fn a_returned_original_is_not_scanned_again_but_the_rest_of_the_receipt_is() {
    let mut p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let original = message(&mario, &[&anna], "Andata e ritorno", "Prova.");
    let t = waiting_transmission(&mut p, &original, "Andata e ritorno");
    let known_bytes = |p: &Pair| -> u64 {
        let (_, _, metrics) = p.a.http_get("/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("pec_gateway_antivirus_known_bytes_total "))
            .and_then(|v| v.parse().ok())
            .expect("the counter is exported")
    };
    assert_eq!(known_bytes(&p), 0);

    // For addresses that are not recipients, so none settles the
    // transmission and it keeps waiting.
    let to = |name: &str| format!("{name}@{}", p.db.name);
    let back = delivered_by_b(&p, &t, &to("bruno"), Some(original.as_bytes()));
    // Addressed to Luigi too: a receipt goes to its transmission's sender
    // only.
    let luigi = format!("luigi@{}", p.da.name);
    let mut c = Client::plain(p.a.smtp);
    c.expect("EHLO peer.test", 250);
    let (code, text) = c.send_mail(
        &format!("posta-certificata@{}", p.db.name),
        &[&mario, &luigi],
        &signed_by_b(&p, &back),
    );
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("recorded"), "settled at once: {text}");
    assert_eq!(
        known_bytes(&p),
        original.len() as u64,
        "the original was skipped"
    );
    assert_eq!(p.a.find("mario", &back.message_id).len(), 1);
    assert!(p.a.mailbox("luigi").is_empty(), "only the sender gets it");

    let mut infected = delivered_by_b(&p, &t, &to("carla"), Some(original.as_bytes()));
    infected.entity = with_part(&infected.entity, EICAR.as_bytes());
    let (code, text) = send_as_b(&p, &mario, &signed_by_b(&p, &infected));
    assert_eq!(code, 554, "a virus beside the returned original: {text}");
    assert_eq!(p.a.quarantined(), 1);
    assert_eq!(known_bytes(&p), 2 * original.len() as u64);

    let other = with_attachment(&mario, &anna, "Andata e ritorno", EICAR.as_bytes());
    let swapped = delivered_by_b(&p, &t, &to("dario"), Some(other.as_bytes()));
    let (code, text) = send_as_b(&p, &mario, &signed_by_b(&p, &swapped));
    assert_eq!(code, 554, "an original other than the one sent: {text}");
    assert_eq!(p.a.quarantined(), 2);
    assert_eq!(known_bytes(&p), 2 * original.len() as u64, "scanned whole");
}

/// The recipient's provider that finds a virus in a valid transport
/// envelope keeps it, delivers nothing, and tells the sending provider with
/// a signed virus detection notice.
#[test]
fn an_infected_envelope_is_kept_and_the_sending_provider_notified() {
    let p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let infected = with_attachment(&mario, &anna, "Infetto", EICAR.as_bytes());
    let envelope = envelope_signed_by(&p, &p.da.key_id, &p.da.cert_pem, &infected, false);
    let mut c = Client::plain(p.b.smtp);
    c.expect("EHLO peer.test", 250);
    let (code, text) = c.send_mail(
        &format!("posta-certificata@{}", p.da.name),
        &[&anna],
        &String::from_utf8(envelope).expect("ascii"),
    );
    assert_eq!(code, 250, "taken, to be answered with a notice: {text}");
    assert!(text.contains("virus"), "{text}");
    assert_eq!(p.b.quarantined(), 1);
    // The notice reaches A signed by B; A never sent this (forged)
    // transmission, so it delivers the notice to Mario as an anomaly.
    let anomaly = p.a.wait_for_mail("mario", "X-Trasporto: errore", 1);
    let text = String::from_utf8_lossy(&anomaly[0]);
    assert!(text.contains("X-Ricevuta: rilevazione-virus"), "{text}");
    assert!(
        text.contains("never sent"),
        "a valid receipt, not a bad one: {text}"
    );
    assert!(
        p.b.mailbox("anna").is_empty(),
        "nothing infected is delivered"
    );
}

/// A virus detection notice from the recipient's provider becomes this
/// provider's own signed non-delivery notice (`errore="virus"`) to the
/// sender, once, and settles the recipient.
#[test]
fn a_virus_detection_notice_becomes_a_non_delivery_notice_for_the_sender() {
    let mut p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let original = message(&mario, &[&anna], "Virus", "Prova.");
    let t = waiting_transmission(&mut p, &original, "Virus");
    let issuer = pec_gateway::pec::compose::Issuer {
        domain: &p.db.name,
        gestore: "B",
    };
    let notice = signed_by_b(
        &p,
        &pec_gateway::pec::compose::receipt(
            &t,
            pec_gateway::pec::compose::Notice::VirusDetected("Eicar-Test-Signature"),
            &t.mittente,
            issuer,
            pec_gateway::clock::now(),
            None,
        ),
    );
    for attempt in ["first", "again"] {
        let (code, text) = send_as_b(&p, &mario, &notice);
        assert_eq!(code, 250, "{attempt}: {text}");
        let failed = p.a.wait_for_mail("mario", "X-Ricevuta: errore-consegna", 1);
        assert_eq!(failed.len(), 1, "{attempt}: one notice");
        let d = daticert_of(&failed[0]);
        assert_eq!(d.errore.as_str(), "virus");
        assert_eq!(d.consegna.as_deref(), Some(anna.as_str()));
        openssl_verify(&failed[0], &p.ca_file()).expect("the notice verifies");
    }
    assert!(
        p.a.find("mario", "X-Ricevuta: rilevazione-virus")
            .is_empty(),
        "the other provider's notice is recorded, not delivered"
    );
}

/// Stops B, then has Mario submit `original` (with `subject`) to Anna: the
/// transmission A then waits on, for receipts that only the test sends as
/// B.
fn waiting_transmission(
    p: &mut Pair,
    original: &str,
    subject: &str,
) -> pec_gateway::pec::compose::Transmission {
    let (mario, anna) = (p.mario(), p.anna());
    p.b.kill9();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_mail(&mario, &[&anna], original);
    assert_eq!(code, 250, "{text}");
    let accepted = p.a.wait_for_mail("mario", "X-Ricevuta: accettazione", 1);
    let sent = daticert_of(&accepted[0]);
    let mut t = transmission(&sent.identificativo, &mario, &anna, subject);
    t.msgid = sent.msgid.clone();
    t
}

/// `entity` (a `multipart/mixed` body) with one more part: `content` as a
/// base64 attachment.
fn with_part(entity: &[u8], content: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let text = String::from_utf8(entity.to_vec()).expect("ascii");
    let boundary = text
        .split("boundary=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a boundary");
    let last = format!("--{boundary}--");
    let b64 = base64::engine::general_purpose::STANDARD.encode(content);
    let part = format!(
        "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"file.com\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n{last}"
    );
    assert!(text.contains(&last), "{text}");
    text.replacen(&last, &part, 1).into_bytes()
}

#[test]
fn clamd_down_gives_a_temporary_failure_and_not_ready_then_recovers() {
    let mut clamd = Clamd::start();
    let p = Pair::start_with(&clamd.address(), &[]);
    let mario = p.mario();
    let anna = p.anna();
    clamd.stop();
    wait_for(Duration::from_secs(30), "gateway A not ready", || {
        !p.a.ready()
    });
    let (_, _, body) = p.a.http_get("/readyz");
    assert!(body.contains("antivirus"), "{body}");
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Durante", "x");
    assert_eq!(code / 100, 4, "fail closed, temporarily: {text}");
    clamd.restart();
    p.a.wait_ready();
    let (code, text) = c.send_message(&mario, &[&anna], "Dopo", "x");
    assert_eq!(code, 250, "{text}");
    p.b.wait_for_mail("anna", "X-Trasporto: posta-certificata", 1);
}

#[test]
fn a_gateway_killed_during_data_after_the_250_and_before_the_relay_loses_and_duplicates_nothing() {
    let mut p = Pair::start_with(&shared_clamd(), &[]);
    let mario = p.mario();
    let anna = p.anna();

    // 1. Killed during DATA: the client never hears 250, nothing is kept.
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    c.begin_data(
        &mario,
        &anna,
        &format!("From: {mario}\r\nTo: {anna}\r\nSubject: half\r\n\r\npart"),
    );
    std::thread::sleep(Duration::from_millis(200));
    p.a.kill9();
    p.a.restart();

    // 2. Killed right before relaying: the 250 was given, the envelope is queued.
    p.a.set_env("PEC_GATEWAY_CRASH_AT", Some("before-relay"));
    p.a.restart();
    p.a.wait_ready();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Uno", "primo");
    assert_eq!(code, 250, "{text}");
    let status = p.a.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        p.a.output().contains("crash point before-relay"),
        "it died at the named step"
    );
    assert!(p.b.mailbox("anna").is_empty(), "not relayed yet");
    p.a.set_env("PEC_GATEWAY_CRASH_AT", None);
    p.a.restart();

    // Replayed after the restart: one envelope, one acceptance, one delivery receipt.
    p.b.wait_for_mail("anna", "X-Trasporto: posta-certificata", 1);
    p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
    // Kill and restart once more: nothing is sent again.
    p.a.restart();
    p.a.wait_ready();
    // Both queues empty (the gauge is refreshed every 2 s): nothing is left to send.
    for g in [&p.a, &p.b] {
        g.wait_until(Duration::from_secs(30), "drained", |g| {
            g.http_get("/metrics")
                .2
                .contains("pec_gateway_queue_depth 0")
        });
    }
    assert_eq!(
        p.b.find("anna", "X-Trasporto: posta-certificata").len(),
        1,
        "one envelope"
    );
    assert_eq!(
        p.a.find("mario", "X-Ricevuta: accettazione").len(),
        1,
        "one acceptance"
    );
    assert_eq!(
        p.a.find("mario", "X-Ricevuta: avvenuta-consegna").len(),
        1,
        "one delivery receipt"
    );
    assert!(
        p.b.find("anna", "Subject: POSTA CERTIFICATA: half")
            .is_empty(),
        "the half message was never accepted"
    );
}

#[test]
fn a_rotated_key_signs_from_the_next_start_and_both_generations_verify() {
    let mut p = Pair::start();
    let ca = p.ca_file();
    let mario = p.mario();
    let anna = p.anna();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    assert_eq!(c.send_message(&mario, &[&anna], "Prima", "g1").0, 250);
    let before = p.a.wait_for_mail("mario", "ACCETTAZIONE: Prima", 1);
    let g1 = p.da.cert_pem.clone();

    // Generation 2: a new key and certificate, published in the index.
    p.da.rotate(2);
    std::fs::write(p.providers.join("a-g2.pem"), &p.da.cert_pem).expect("index");
    let config = p.da.config(
        &p.clamd,
        &p.providers,
        &[(&p.db.name, p.db.smtp)],
        &p.pin_file,
    );
    p.a.rewrite_config(&config);
    p.a.restart();
    p.a.wait_ready();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    assert_eq!(c.send_message(&mario, &[&anna], "Dopo", "g2").0, 250);
    let after = p.a.wait_for_mail("mario", "ACCETTAZIONE: Dopo", 1);
    assert_eq!(
        pem_der(&openssl_verify(&before[0], &ca).expect("g1 receipt")),
        pem_der(&g1)
    );
    assert_eq!(
        pem_der(&openssl_verify(&after[0], &ca).expect("g2 receipt")),
        pem_der(&p.da.cert_pem)
    );
    // B trusts both generations: the envelope signed with generation 2 is delivered.
    p.b.wait_for_mail("anna", "POSTA CERTIFICATA: Dopo", 1);
}

#[test]
fn a_wrong_pin_keeps_the_gateway_unready_until_fixed() {
    let root = tempfile::tempdir().expect("tempdir");
    let pin_file = root.path().join("pin");
    std::fs::write(&pin_file, "0000-wrong").expect("pin");
    let clamd = shared_clamd();
    let domain = Domain::new(root.path(), "pec-pin.test", &[("carla", "c")]);
    let g = Gateway::start(
        &domain,
        &domain.config(&clamd, root.path(), &[], &pin_file),
        &[],
    );
    // SoftHSM2's file store can briefly look empty to one process while
    // another writes it (TokenNotFound): wait for the verdict on the PIN.
    g.wait_until(Duration::from_secs(30), "refused by the token", |g| {
        g.http_get("/readyz").2.contains("HsmLoginFailed")
    });
    let (code, _, _) = g.http_get("/readyz");
    assert_eq!(code, 503);
    // Mail is refused temporarily while the gateway cannot sign, on both ports.
    let carla = format!("carla@{}", domain.name);
    let mut c = Client::login(domain.submissions, &carla, "c");
    let (code, text) = c.send_message(&carla, &[&carla], "Senza firma", "x");
    assert_eq!(code, 451, "{text}");
    let mut p25 = Client::plain(domain.smtp);
    p25.expect("EHLO peer.test", 250);
    let (code, text) = p25.send_mail(
        "x@peer.test",
        &[&carla],
        &message("x@peer.test", &[&carla], "s", "x"),
    );
    assert_eq!(code, 451, "{text}");
    std::fs::write(&pin_file, &token().pin).expect("pin");
    g.wait_ready();
    // A new session: the first one has idled out (3 s in the test configuration).
    let mut c = Client::login(domain.submissions, &carla, "c");
    let (code, text) = c.send_message(&carla, &[&carla], "Con firma", "x");
    assert_eq!(code, 250, "accepted once it can sign: {text}");
    g.wait_for_mail("carla", "X-Ricevuta: avvenuta-consegna", 1);
    assert!(
        !g.output().contains("0000-wrong") && !g.output().contains(&token().pin),
        "the PIN never reaches the log"
    );
}

#[test]
fn sigterm_finishes_the_session_in_flight_and_exits_in_time() {
    let mut p = Pair::start();
    let mario = p.mario();
    let anna = p.anna();
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    c.begin_data(
        &mario,
        &anna,
        &format!("From: {mario}\r\nTo: {anna}\r\nSubject: in volo\r\n\r\n"),
    );
    let client = std::thread::spawn(move || {
        // SIGTERM lands while the message is half sent.
        std::thread::sleep(Duration::from_millis(500));
        c.send(b"body\r\n.\r\n");
        let done = c.reply();
        let next = c.cmd("NOOP");
        (done, next)
    });
    let (status, took) = p.a.sigterm();
    let ((code, text), (next, _)) = client.join().expect("client");
    assert_eq!(code, 250, "the transaction in flight completes: {text}");
    assert_eq!(next, 421, "then the session is told to go");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        took < Duration::from_secs(10),
        "within the grace period: {took:?}"
    );
    p.a.restart();
    p.b.wait_for_mail("anna", "POSTA CERTIFICATA: in volo", 1);
}

#[test]
fn during_the_shutdown_delay_the_gateway_is_unready_but_still_takes_mail() {
    let mut p = Pair::start();
    let config =
        p.da.config(
            &p.clamd,
            &p.providers,
            &[(&p.db.name, p.db.smtp)],
            &p.pin_file,
        )
        .replace("shutdownDelaySeconds: 0", "shutdownDelaySeconds: 3");
    p.a.rewrite_config(&config);
    p.a.restart();
    p.a.wait_ready();
    let mario = p.mario();
    let anna = p.anna();

    let started = std::time::Instant::now();
    p.a.term();
    wait_for(Duration::from_secs(2), "/readyz to say not ready", || {
        !p.a.ready()
    });
    // A connection the Service's rules still send is served in full.
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    let (code, text) = c.send_message(&mario, &[&anna], "Ultima", "ciao");
    assert_eq!(code, 250, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the session must fall inside the delay: {:?}",
        started.elapsed()
    );
    drop(c);
    let status = p.a.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "exited before the delay was over: {:?}",
        started.elapsed()
    );
    // Accepted means delivered, once the gateway is back.
    p.a.restart();
    p.b.wait_for_mail("anna", "POSTA CERTIFICATA: Ultima", 1);
}

#[test]
fn metrics_and_probes_answer_with_content_types() {
    let p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    assert_eq!(c.send_message(&mario, &[&anna], "Metriche", "x").0, 250);
    p.a.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
    let (code, head, body) = p.a.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for family in [
        "pec_gateway_messages_total",
        "pec_gateway_signing_seconds",
        "pec_gateway_queue_depth",
        "pec_gateway_antivirus_verdicts_total",
        "pec_gateway_build_info",
    ] {
        assert!(body.contains(family), "{family} missing");
    }
    assert!(
        body.contains("pec_gateway_messages_total{kind=\"accettazione\",outcome=\"accepted\"} 1"),
        "{body}"
    );
    // The submission and the receipts coming back were all scanned.
    assert!(
        !body.contains("pec_gateway_antivirus_verdicts_total{verdict=\"clean\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("pec_gateway_antivirus_verdicts_total{verdict=\"infected\"} 0"),
        "{body}"
    );
    let signed: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("pec_gateway_signing_seconds_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("signing count");
    assert!(signed >= 2, "acceptance and envelope were signed: {signed}");
    assert_eq!(p.a.http_get("/healthz").0, 200);
    assert_eq!(p.a.http_get("/readyz").0, 200);
}

#[test]
fn a_receive_only_domain_has_no_access_point_but_receives_certified_mail() {
    let root = tempfile::tempdir().expect("tempdir");
    let clamd = shared_clamd();
    let mut ufficio = Domain::new(root.path(), "ufficio-ro.test", &[("protocollo", "")]);
    ufficio.receive_only = true;
    let sender = Domain::new(
        root.path(),
        "pec-ro-sender.test",
        &[("mario", MARIO_PASSWORD)],
    );
    let providers = root.path().join("providers");
    std::fs::create_dir_all(&providers).expect("providers");
    std::fs::write(providers.join("u.pem"), &ufficio.cert_pem).expect("u.pem");
    std::fs::write(providers.join("s.pem"), &sender.cert_pem).expect("s.pem");
    let pin = root.path().join("pin");
    std::fs::write(&pin, &token().pin).expect("pin");
    let u = Gateway::start(
        &ufficio,
        &ufficio.config(&clamd, &providers, &[(&sender.name, sender.smtp)], &pin),
        &[],
    );
    let s = Gateway::start(
        &sender,
        &sender.config(&clamd, &providers, &[(&ufficio.name, ufficio.smtp)], &pin),
        &[],
    );
    u.wait_ready();
    s.wait_ready();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ufficio.submissions)).is_err(),
        "no listener on the submission port of a receive-only domain"
    );
    let mario = format!("mario@{}", sender.name);
    let protocollo = format!("protocollo@{}", ufficio.name);
    let mut c = Client::login(sender.submissions, &mario, MARIO_PASSWORD);
    assert_eq!(
        c.send_message(&mario, &[&protocollo], "Istanza", "x").0,
        250
    );
    u.wait_for_mail("protocollo", "X-Trasporto: posta-certificata", 1);
    s.wait_for_mail("mario", "X-Ricevuta: avvenuta-consegna", 1);
}

#[test]
fn mailbox_owners_read_and_remove_their_mail_over_the_message_api() {
    let p = Pair::start();
    let (mario, anna) = (p.mario(), p.anna());
    let mut c = Client::login(p.a.submissions, &mario, MARIO_PASSWORD);
    assert_eq!(c.send_message(&mario, &[&anna], "Via API", "x").0, 250);
    let delivered =
        p.b.wait_for_mail("anna", "X-Trasporto: posta-certificata", 1);

    let anna_login = Some((anna.as_str(), "anna-secret"));
    let (code, list) = https_request(p.db.https, "GET", "/api/v1/messages", anna_login);
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_slice(&list).expect("JSON list");
    let entries = list.as_array().expect("array");
    assert_eq!(entries.len(), 1, "{list}");
    let id = entries[0]["id"].as_str().expect("id").to_string();
    let (code, fetched) = https_request(
        p.db.https,
        "GET",
        &format!("/api/v1/messages/{id}"),
        anna_login,
    );
    assert_eq!(code, 200);
    assert_eq!(
        fetched, delivered[0],
        "the API returns the stored message byte for byte"
    );
    openssl_verify(&fetched, &p.ca_file()).expect("what the API returns verifies");

    // Others get nothing: no credentials, a wrong password, another mailbox, a path outside.
    assert_eq!(
        https_request(p.db.https, "GET", "/api/v1/messages", None).0,
        401
    );
    assert_eq!(
        https_request(
            p.db.https,
            "GET",
            "/api/v1/messages",
            Some((anna.as_str(), "wrong"))
        )
        .0,
        401
    );
    let bruno = format!("bruno@{}", p.db.name);
    let bruno_login = Some((bruno.as_str(), "bruno-secret"));
    assert_eq!(
        https_request(
            p.db.https,
            "GET",
            &format!("/api/v1/messages/{id}"),
            bruno_login
        )
        .0,
        404
    );
    assert_eq!(
        https_request(
            p.db.https,
            "GET",
            "/api/v1/messages/..%2f..%2fgateway.yaml",
            anna_login
        )
        .0,
        404
    );
    assert_eq!(
        https_request(
            p.db.https,
            "GET",
            "/api/v1/messages/../gateway.yaml",
            anna_login
        )
        .0,
        404
    );

    let keys = p.b.dir.join("mailboxes/.keys/anna");
    let markers = || std::fs::read_dir(&keys).map_or(0, Iterator::count);
    assert_eq!(markers(), 1, "the delivery's key is in {keys:?}");
    assert_eq!(
        https_request(
            p.db.https,
            "DELETE",
            &format!("/api/v1/messages/{id}"),
            anna_login
        )
        .0,
        204
    );
    let (_, list) = https_request(p.db.https, "GET", "/api/v1/messages", anna_login);
    assert_eq!(String::from_utf8_lossy(&list), "[]");
    assert!(p.b.mailbox("anna").is_empty());
    assert_eq!(markers(), 0, "deleting the message forgot its key");
}
