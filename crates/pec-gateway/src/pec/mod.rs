//! The pure PEC rules (RFC 6109): functions of a message and `now`, with no
//! socket, file or token behind them.

pub mod checks;
pub mod classify;
pub mod compose;
pub mod daticert;
