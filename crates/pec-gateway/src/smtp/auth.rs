//! AUTH PLAIN and AUTH LOGIN on the access point, over TLS only.
//!
//! Passwords are checked against the mailbox credentials (argon2 hashes),
//! never logged or echoed. Failures are counted per client address; past
//! the allowance the address must wait out the lockout window, and every
//! attempt in that window is refused without checking the password.

use std::time::Instant;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    Listener, Reply,
    session::{MAX_LINE, State, read_line},
};

/// Runs an AUTH exchange (it may prompt the client) and returns the final reply.
pub async fn auth<S: AsyncBufReadExt + AsyncWrite + Unpin>(
    state: &mut State,
    io: &mut S,
    mechanism: u64,
    initial: String,
) -> std::io::Result<Reply> {
    if state.listener != Listener::Submission || !state.secure {
        return Ok(Reply::new(
            502,
            "5.5.1",
            "AUTH is offered on the submission port over TLS only",
        ));
    }
    if state.helo.is_none() {
        return Ok(Reply::new(503, "5.5.1", "say EHLO first"));
    }
    if state.user.is_some() {
        return Ok(Reply::new(503, "5.5.1", "already authenticated"));
    }
    let gw = state.gateway.clone();
    let ip = state.peer.ip();
    if let Err(wait) = gw.auth_limiter.check(ip, Instant::now()) {
        return Ok(Reply::new(
            454,
            "4.7.0",
            format!(
                "too many failed logins from your address; try again in {} s",
                wait.as_secs().max(1)
            ),
        ));
    }
    let credentials = if mechanism == smtp_proto::AUTH_PLAIN {
        let response = if initial.is_empty() {
            match prompt(io, "").await? {
                Some(r) => r,
                None => return Ok(Reply::new(501, "5.7.0", "authentication cancelled")),
            }
        } else {
            initial
        };
        decode(&response).and_then(|raw| {
            let mut fields = raw.split(|b| *b == 0);
            let _authzid = fields.next()?;
            let user = String::from_utf8(fields.next()?.to_vec()).ok()?;
            let pass = String::from_utf8(fields.next()?.to_vec()).ok()?;
            Some((user, pass))
        })
    } else if mechanism == smtp_proto::AUTH_LOGIN {
        let user = if initial.is_empty() {
            match prompt(io, "VXNlcm5hbWU6").await? {
                Some(r) => r,
                None => return Ok(Reply::new(501, "5.7.0", "authentication cancelled")),
            }
        } else {
            initial
        };
        let Some(pass) = prompt(io, "UGFzc3dvcmQ6").await? else {
            return Ok(Reply::new(501, "5.7.0", "authentication cancelled"));
        };
        match (decode(&user), decode(&pass)) {
            (Some(u), Some(p)) => String::from_utf8(u).ok().zip(String::from_utf8(p).ok()),
            _ => None,
        }
    } else {
        return Ok(Reply::new(
            504,
            "5.5.4",
            "unsupported mechanism; use PLAIN or LOGIN",
        ));
    };
    let Some((user, password)) = credentials else {
        return Ok(Reply::new(501, "5.5.2", "cannot decode the credentials"));
    };
    // argon2 takes tens of milliseconds by design: off the async threads.
    let verify = {
        let gw = gw.clone();
        tokio::task::spawn_blocking(move || {
            gw.credentials.verify(&user, &password, &gw.config.domain)
        })
    };
    match verify.await.ok().flatten() {
        Some(mailbox) => {
            gw.auth_limiter.succeeded(ip);
            state.user = Some(mailbox);
            Ok(Reply::new(235, "2.7.0", "authenticated"))
        }
        None => {
            gw.auth_limiter.failed(ip, Instant::now());
            gw.metrics.auth_failures.inc();
            tracing::info!(peer = %state.peer, "authentication failed");
            Ok(Reply::new(
                535,
                "5.7.8",
                "authentication credentials invalid",
            ))
        }
    }
}

/// Sends a 334 challenge and reads the answer; `None` if the client cancels.
async fn prompt<S: AsyncBufReadExt + AsyncWrite + Unpin>(
    io: &mut S,
    challenge: &str,
) -> std::io::Result<Option<String>> {
    io.write_all(format!("334 {challenge}\r\n").as_bytes())
        .await?;
    io.flush().await?;
    let line = match read_line(io, MAX_LINE).await? {
        Ok(Some(line)) => line,
        _ => return Ok(None),
    };
    let text = String::from_utf8_lossy(&line).trim_end().to_string();
    Ok((text != "*").then_some(text))
}

fn decode(b64: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
}
