//! DATA: the message itself, its size limit, and handing it to the gateway.

use tokio::io::AsyncBufReadExt;

use super::{
    Listener, Reply,
    session::{MAX_LINE, State, read_line},
};
use crate::pec::checks::{Refusal, SmtpEnvelope};

/// The body of a DATA transfer.
pub struct Body {
    /// The message, dot-unstuffed, up to the limit.
    pub bytes: Vec<u8>,
    /// Bytes the client sent in all (more than `bytes` when over the limit).
    pub total: usize,
}

/// Refuses DATA before MAIL and RCPT.
pub fn can_start(state: &State) -> Option<Reply> {
    if state.mail_from.is_none() || state.rcpts.is_empty() {
        return Some(Reply::new(503, "5.5.1", "MAIL FROM and RCPT TO first"));
    }
    None
}

/// Reads lines up to the lone dot, keeping at most `limit` bytes; the rest
/// is read and dropped so the dialogue stays in step.
pub async fn read_body<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    limit: usize,
) -> std::io::Result<Body> {
    let mut bytes = Vec::new();
    let mut total = 0usize;
    loop {
        // A message line may be longer than a command line (RFC 5322 allows
        // 998 characters; tolerate much more, but never unbounded).
        let line = match read_line(reader, MAX_LINE * 64).await? {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed in DATA",
                ));
            }
            Err(_) => {
                // An absurd line: count it as over the limit.
                total = total.saturating_add(limit + 1);
                continue;
            }
        };
        if line == b".\r\n" || line == b".\n" {
            return Ok(Body { bytes, total });
        }
        let content = line.strip_prefix(b".").unwrap_or(&line);
        total += content.len();
        if total <= limit {
            bytes.extend_from_slice(content);
        }
    }
}

/// Hands a complete message to the gateway and ends the transaction.
pub async fn finish(state: &mut State, body: Body) -> Reply {
    let envelope = SmtpEnvelope {
        reverse_path: state.mail_from.clone().unwrap_or_default(),
        forward_paths: state.rcpts.clone(),
    };
    state.reset();
    let gw = state.gateway.clone();
    let limit = gw.config.max_message_bytes.max(0) as usize;
    if body.total > limit {
        let refusal = Refusal {
            reason: "TooLarge",
            detail: format!(
                "the message is {} bytes, more than the {limit} allowed",
                body.total
            ),
        };
        return match state.listener {
            Listener::Submission => gw.refuse_submission(&envelope, &body.bytes, &refusal).await,
            Listener::Incoming => Reply::new(552, "5.3.4", refusal.detail),
        };
    }
    match state.listener {
        Listener::Submission => gw.submit(envelope, body.bytes).await,
        Listener::Incoming => {
            gw.receive(&state.peer.to_string(), envelope, body.bytes)
                .await
        }
    }
}
