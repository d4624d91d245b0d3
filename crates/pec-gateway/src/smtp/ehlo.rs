//! EHLO and HELO: the greeting and what this point offers.

use super::{Listener, Reply, session::State};

/// Replies to EHLO (`extended`) or HELO, starting a new session state.
pub fn ehlo(state: &mut State, host: &str, extended: bool) -> Reply {
    if host.is_empty() {
        return Reply::new(501, "5.5.4", "a domain or address literal is required");
    }
    state.reset();
    state.helo = Some(host.to_string());
    let config = &state.gateway.config;
    let greeting = format!("{} greets {host}", config.domain);
    if !extended {
        return Reply::new(250, "", greeting);
    }
    let mut lines = vec![
        greeting,
        "PIPELINING".to_string(),
        format!("SIZE {}", config.max_message_bytes),
        "8BITMIME".to_string(),
        "ENHANCEDSTATUSCODES".to_string(),
    ];
    if state.can_starttls && !state.secure {
        lines.push("STARTTLS".into());
    }
    if state.listener == Listener::Submission && state.secure {
        lines.push("AUTH PLAIN LOGIN".into());
    }
    Reply::new(250, "", lines.join("\n"))
}
