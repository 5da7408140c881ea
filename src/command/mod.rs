//! Classifies requests by what the session must do with them.
//!
//! This module reads command names (and, for a handful of commands, their
//! arguments) and nothing else: no I/O, no session state, no cache. Names are
//! matched with `eq_ignore_ascii_case` and never allocated. Everything tierd
//! does not interpret is [`Kind::Plain`] and is forwarded as raw bytes.

pub mod classify;
pub mod table;

pub use classify::{classify, ClientSub, Kind};
pub use table::{Command, CommandTable, KeyRef, Keys, TableError};
