//! One SMTP session: read a command, decide the reply, write it.
//!
//! The loop owns the socket and the timeouts; each command's reply is
//! decided by its step module from the [`State`]. Abuse is answered, then
//! the connection closed: a line longer than 4096 bytes, ten bad commands,
//! input sent ahead of a 354 or of a STARTTLS reply (command injection
//! across the TLS boundary), an idle client, a DATA transfer that trickles
//! past its deadline.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use smtp_proto::Request;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use super::{Listener, Reply, auth, data, ehlo, mail};
use crate::gateway::Gateway;

/// The longest command line accepted (RFC 5321 asks for at least 512).
pub const MAX_LINE: usize = 4096;
const MAX_BAD_COMMANDS: u32 = 10;

/// What a session knows between commands.
pub struct State {
    /// Which point this is.
    pub listener: Listener,
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The client.
    pub peer: SocketAddr,
    /// Whether the connection is encrypted.
    pub secure: bool,
    /// Whether STARTTLS can be offered.
    pub can_starttls: bool,
    /// The EHLO/HELO name, once greeted.
    pub helo: Option<String>,
    /// The authenticated mailbox (local part), on 465.
    pub user: Option<String>,
    /// The reverse path of the open transaction.
    pub mail_from: Option<String>,
    /// The size the client announced with SIZE (0 if none).
    pub declared_size: usize,
    /// The forward paths of the open transaction.
    pub rcpts: Vec<String>,
    /// Commands refused as unknown or out of sequence.
    pub bad_commands: u32,
}

impl State {
    fn new(
        listener: Listener,
        gateway: Arc<Gateway>,
        peer: SocketAddr,
        secure: bool,
        can_starttls: bool,
    ) -> Self {
        Self {
            listener,
            gateway,
            peer,
            secure,
            can_starttls,
            helo: None,
            user: None,
            mail_from: None,
            declared_size: 0,
            rcpts: Vec::new(),
            bad_commands: 0,
        }
    }

    /// Forgets the open transaction (RSET, after DATA).
    pub fn reset(&mut self) {
        self.mail_from = None;
        self.declared_size = 0;
        self.rcpts.clear();
    }
}

enum Outcome<S> {
    Closed,
    StartTls(S),
}

/// Runs a session on an accepted connection.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    shutdown: watch::Receiver<bool>,
) {
    let handshake = Duration::from_secs(30);
    let result = match (listener, tls) {
        (Listener::Submission, Some(acceptor)) => {
            match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    let state = State::new(listener, gateway, peer, true, false);
                    converse(tls_stream, state, shutdown, true)
                        .await
                        .map(|_| ())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(()),
            }
        }
        (Listener::Submission, None) => {
            // The configuration check refuses this; never serve 465 in clear.
            Ok(())
        }
        (Listener::Incoming, tls) => {
            let state = State::new(listener, gateway.clone(), peer, false, tls.is_some());
            match converse(stream, state, shutdown.clone(), true).await {
                Ok(Outcome::StartTls(stream)) => match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                            Ok(Ok(tls_stream)) => {
                                // RFC 3207: after STARTTLS the session starts over.
                                let state = State::new(listener, gateway, peer, true, false);
                                converse(tls_stream, state, shutdown, false)
                                    .await
                                    .map(|_| ())
                            }
                            Ok(Err(e)) => Err(e),
                            Err(_) => Ok(()),
                        }
                    }
                    None => Ok(()),
                },
                Ok(Outcome::Closed) => Ok(()),
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "session ended with an I/O error");
    }
}

async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    gateway: &Gateway,
    listener: Listener,
    reply: &Reply,
) -> std::io::Result<()> {
    gateway.metrics.smtp_reply(listener.label(), reply.code);
    stream.write_all(&reply.to_wire()).await
}

/// Reads one line ending in LF, at most `max` bytes. `Ok(None)` at end of
/// stream; an over-long line is consumed and reported as `Err(TooLong)`.
pub(crate) async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Result<Option<Vec<u8>>, TooLong>> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() && !too_long {
                Ok(None)
            } else if too_long {
                Err(TooLong)
            } else {
                Ok(Some(line))
            });
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        if !too_long {
            if line.len() + chunk.len() > max {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let n = chunk.len();
        reader.consume(n);
        if done {
            return Ok(if too_long {
                Err(TooLong)
            } else {
                Ok(Some(line))
            });
        }
    }
}

/// A line over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLong;

async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    mut state: State,
    mut shutdown: watch::Receiver<bool>,
    greet: bool,
) -> std::io::Result<Outcome<S>> {
    let gw = state.gateway.clone();
    let listener = state.listener;
    let limits = gw.config.smtp.clone();
    let idle = Duration::from_secs(limits.idle_timeout_seconds);
    let mut io = BufReader::new(stream);
    if greet {
        let hello = Reply::new(220, "", format!("{} ESMTP PEC gateway", gw.config.domain));
        write(io.get_mut(), &gw, listener, &hello).await?;
    }
    loop {
        if io.buffer().is_empty() {
            io.get_mut().flush().await?;
        }
        let line = tokio::select! {
            biased;
            () = stopping(&mut shutdown), if state.mail_from.is_none() => {
                let bye = Reply::new(421, "4.3.2", "shutting down, try again later");
                write(io.get_mut(), &gw, listener, &bye).await?;
                io.get_mut().flush().await?;
                return Ok(Outcome::Closed);
            }
            line = tokio::time::timeout(idle, read_line(&mut io, MAX_LINE)) => line,
        };
        let line = match line {
            Err(_) => {
                let bye = Reply::new(421, "4.4.2", "idle too long, closing");
                write(io.get_mut(), &gw, listener, &bye).await?;
                io.get_mut().flush().await?;
                return Ok(Outcome::Closed);
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Err(TooLong))) => {
                let reply = Reply::new(500, "5.5.2", "line too long");
                write(io.get_mut(), &gw, listener, &reply).await?;
                state.bad_commands += 1;
                if state.bad_commands >= MAX_BAD_COMMANDS {
                    return close(io, &gw, listener, "too many errors").await;
                }
                continue;
            }
            Ok(Ok(Ok(None))) => return Ok(Outcome::Closed),
            Ok(Ok(Ok(Some(line)))) => line,
        };
        let request = Request::parse(&mut line.iter());
        let reply = match request {
            Err(e) => syntax_error(e),
            Ok(Request::Ehlo { host }) => ehlo::ehlo(&mut state, &host, true),
            Ok(Request::Helo { host }) => ehlo::ehlo(&mut state, &host, false),
            Ok(Request::Lhlo { .. }) => Reply::new(500, "5.5.1", "LHLO is for LMTP"),
            Ok(Request::StartTls) => {
                if !state.can_starttls || state.secure {
                    Reply::new(502, "5.5.1", "STARTTLS not available")
                } else if !io.buffer().is_empty() {
                    // Commands pipelined after STARTTLS would cross into the
                    // encrypted session: refuse and hang up.
                    return close(io, &gw, listener, "improper pipelining after STARTTLS").await;
                } else {
                    write(
                        io.get_mut(),
                        &gw,
                        listener,
                        &Reply::new(220, "2.0.0", "ready to start TLS"),
                    )
                    .await?;
                    io.get_mut().flush().await?;
                    return Ok(Outcome::StartTls(io.into_inner()));
                }
            }
            Ok(Request::Auth {
                mechanism,
                initial_response,
            }) => {
                let initial = initial_response.into_owned();
                auth::auth(&mut state, &mut io, mechanism, initial).await?
            }
            Ok(Request::Mail { from }) => mail::mail_from(&mut state, from.into_owned()),
            Ok(Request::Rcpt { to }) => mail::rcpt_to(&mut state, to.into_owned()),
            Ok(Request::Data) => {
                if let Some(refusal) = data::can_start(&state) {
                    refusal
                } else if !io.buffer().is_empty() {
                    return close(
                        io,
                        &gw,
                        listener,
                        "improper pipelining: data sent before the 354 reply",
                    )
                    .await;
                } else {
                    write(
                        io.get_mut(),
                        &gw,
                        listener,
                        &Reply::new(354, "", "end data with <CR><LF>.<CR><LF>"),
                    )
                    .await?;
                    io.get_mut().flush().await?;
                    let deadline = Duration::from_secs(limits.data_timeout_seconds);
                    match tokio::time::timeout(
                        deadline,
                        data::read_body(&mut io, gw.config.max_message_bytes.max(0) as usize),
                    )
                    .await
                    {
                        Err(_) => return close(io, &gw, listener, "DATA took too long").await,
                        Ok(body) => data::finish(&mut state, body?).await,
                    }
                }
            }
            Ok(Request::Bdat { .. }) => Reply::new(502, "5.5.1", "CHUNKING is not offered"),
            Ok(Request::Rset) => {
                state.reset();
                Reply::new(250, "2.0.0", "reset")
            }
            Ok(Request::Noop { .. }) => Reply::new(250, "2.0.0", "ok"),
            Ok(Request::Vrfy { .. }) => {
                Reply::new(252, "2.5.2", "cannot verify, but will try delivery")
            }
            Ok(Request::Expn { .. }) => Reply::new(502, "5.5.1", "EXPN is not offered"),
            Ok(Request::Help { .. }) => Reply::new(214, "2.0.0", "see RFC 5321 and RFC 6109"),
            Ok(Request::Quit) => {
                write(
                    io.get_mut(),
                    &gw,
                    listener,
                    &Reply::new(221, "2.0.0", "bye"),
                )
                .await?;
                io.get_mut().flush().await?;
                return Ok(Outcome::Closed);
            }
            Ok(_) => Reply::new(502, "5.5.1", "command not implemented"),
        };
        // Syntax and sequence errors count towards the limit; refusals of
        // a message's content do not.
        if (500..=504).contains(&reply.code) {
            state.bad_commands += 1;
        }
        write(io.get_mut(), &gw, listener, &reply).await?;
        if reply.closes() {
            io.get_mut().flush().await?;
            return Ok(Outcome::Closed);
        }
        if state.bad_commands >= MAX_BAD_COMMANDS {
            return close(io, &gw, listener, "too many errors").await;
        }
    }
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: BufReader<S>,
    gw: &Gateway,
    listener: Listener,
    why: &str,
) -> std::io::Result<Outcome<S>> {
    let reply = Reply::new(421, "4.7.0", format!("{why}, closing"));
    write(io.get_mut(), gw, listener, &reply).await?;
    io.get_mut().flush().await?;
    let _ = io.get_mut().shutdown().await;
    Ok(Outcome::Closed)
}

/// Resolves once the gateway is shutting down.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

fn syntax_error(e: smtp_proto::Error) -> Reply {
    use smtp_proto::Error;
    match e {
        Error::UnknownCommand => Reply::new(500, "5.5.1", "unknown command"),
        Error::InvalidSenderAddress => Reply::new(501, "5.1.7", "invalid sender address"),
        Error::InvalidRecipientAddress => Reply::new(501, "5.1.3", "invalid recipient address"),
        Error::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("syntax: {syntax}")),
        Error::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("invalid parameter {param}"))
        }
        Error::UnsupportedParameter { .. } => Reply::new(504, "5.5.4", "unsupported parameter"),
        _ => Reply::new(500, "5.5.2", "syntax error"),
    }
}
