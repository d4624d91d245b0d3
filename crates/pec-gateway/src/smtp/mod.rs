//! The SMTP server: the incoming point on port 25 (STARTTLS when a
//! certificate is configured) and the access point on port 465 (implicit
//! TLS, AUTH required; `Standard` domains only).
//!
//! One module per protocol step, each deciding the reply to one command of
//! the session state machine in [`session`]: [`ehlo`], [`auth`], [`mail`]
//! (MAIL and RCPT) and [`data`]. Command parsing is smtp-proto's; what
//! follows DATA is [`crate::gateway::Gateway`]'s.

pub mod auth;
pub mod data;
pub mod ehlo;
pub mod mail;
pub mod session;

use std::sync::Arc;

use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;

/// An SMTP reply: code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The enhanced status code, empty for greetings and EHLO.
    pub enhanced: &'static str,
    /// The text; several lines become a multi-line reply.
    pub text: String,
}

impl Reply {
    /// A reply.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced,
            text: text.into(),
        }
    }

    /// Whether the client should hang up after it (421).
    pub fn closes(&self) -> bool {
        self.code == 421
    }

    /// The reply on the wire.
    pub fn to_wire(&self) -> Vec<u8> {
        let lines: Vec<&str> = self
            .text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            // Never let a text (which may quote a client) break the framing.
            let clean: String = line.chars().filter(|c| !c.is_control()).collect();
            if self.enhanced.is_empty() {
                out.push_str(&format!("{}{sep}{clean}\r\n", self.code));
            } else {
                out.push_str(&format!("{}{sep}{} {clean}\r\n", self.code, self.enhanced));
            }
        }
        out.into_bytes()
    }
}

/// Which point a listener is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Port 25: other providers.
    Incoming,
    /// Port 465: the domain's own mailboxes.
    Submission,
}

impl Listener {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Incoming => "smtp",
            Listener::Submission => "submissions",
        }
    }
}

/// Accepts sessions until `shutdown` turns true, then waits for the
/// sessions in flight (each finishes its transaction and says 421).
pub async fn serve(
    listener: TcpListener,
    kind: Listener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let gw = gateway.clone();
                    let tls = tls.clone();
                    let stop = shutdown.clone();
                    gw.metrics.smtp_sessions.with_label_values(&[kind.label()]).inc();
                    sessions.spawn(async move { session::run(stream, peer, kind, tls, gw, stop).await });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = shutdown.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}
