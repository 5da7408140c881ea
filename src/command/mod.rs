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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The current command table, shared by every session and replaced by the
/// control plane each time it reads `COMMAND` again (at start and on every
/// reconnect of its link). Sessions keep their own `Arc` and check
/// [`TableCell::generation`], one relaxed load, before each use, so the lock
/// is taken only when the table changed.
#[derive(Debug, Default)]
pub struct TableCell {
    generation: AtomicU64,
    /// Sync lock, held only to clone or replace the `Arc`.
    table: parking_lot::RwLock<Option<Arc<CommandTable>>>,
}

impl TableCell {
    /// Installs a freshly read table.
    pub fn set(&self, table: CommandTable) {
        *self.table.write() = Some(Arc::new(table));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Bumped by every [`TableCell::set`]; 0 until the first.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current table, if one was read yet.
    pub fn get(&self) -> Option<Arc<CommandTable>> {
        self.table.read().clone()
    }
}
