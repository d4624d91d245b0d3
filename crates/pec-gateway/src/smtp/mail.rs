//! MAIL FROM and RCPT TO: who sends, who receives, and whether this point
//! takes it.
//!
//! On the access point the sender must be logged in and the reverse path
//! must be the mailbox it logged in as. On the incoming point only this
//! domain's addresses are accepted: the gateway is no open relay. SIZE is
//! checked against the limit as soon as the client announces it.

use smtp_proto::{MailFrom, RcptTo};

use super::{Listener, Reply, session::State};
use crate::pec::checks::{domain_of, is_address};

/// Replies to MAIL FROM.
pub fn mail_from(state: &mut State, from: MailFrom<String>) -> Reply {
    if state.helo.is_none() {
        return Reply::new(503, "5.5.1", "say EHLO first");
    }
    if state.mail_from.is_some() {
        return Reply::new(503, "5.5.1", "a transaction is already open; RSET first");
    }
    let config = &state.gateway.config;
    let address = from.address.to_ascii_lowercase();
    if state.listener == Listener::Submission {
        let Some(user) = &state.user else {
            return Reply::new(530, "5.7.0", "authentication required");
        };
        if address != format!("{user}@{}", config.domain) {
            return Reply::new(
                553,
                "5.7.1",
                format!("you may only send as {user}@{}", config.domain),
            );
        }
    } else if !address.is_empty() && !is_address(&address) {
        return Reply::new(501, "5.1.7", "invalid sender address");
    }
    if from.size > config.max_message_bytes.max(0) as usize {
        return Reply::new(
            552,
            "5.3.4",
            format!(
                "message size {} exceeds the limit of {} bytes",
                from.size, config.max_message_bytes
            ),
        );
    }
    state.declared_size = from.size;
    state.mail_from = Some(address);
    Reply::new(250, "2.1.0", "sender ok")
}

/// Replies to RCPT TO.
pub fn rcpt_to(state: &mut State, to: RcptTo<String>) -> Reply {
    if state.mail_from.is_none() {
        return Reply::new(503, "5.5.1", "MAIL FROM first");
    }
    let config = &state.gateway.config;
    let address = to.address.to_ascii_lowercase();
    if !is_address(&address) {
        return Reply::new(501, "5.1.3", "invalid recipient address");
    }
    if state.rcpts.len() >= config.max_recipients {
        return Reply::new(
            452,
            "4.5.3",
            format!("too many recipients (at most {})", config.max_recipients),
        );
    }
    let total = state.declared_size.saturating_mul(state.rcpts.len() + 1);
    if state.declared_size > 0 && total > config.max_message_bytes.max(0) as usize {
        return Reply::new(
            552,
            "5.3.4",
            format!(
                "size x recipients would be {total} bytes, more than the {} allowed",
                config.max_message_bytes
            ),
        );
    }
    if state.listener == Listener::Incoming && domain_of(&address) != config.domain {
        return Reply::new(
            550,
            "5.7.1",
            format!(
                "relaying denied: this gateway receives for {} only",
                config.domain
            ),
        );
    }
    if !state.rcpts.contains(&address) {
        state.rcpts.push(address);
    }
    Reply::new(250, "2.1.5", "recipient ok")
}
