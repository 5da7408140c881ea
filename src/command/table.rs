//! The command table: what upstream says about every command it knows.
//!
//! This file owns turning one framed `COMMAND` reply (Redis 7 format: name,
//! arity, flags, first key, last key, step, ACL categories, tips, key specs,
//! subcommands) into a [`CommandTable`], and answering two questions from it
//! without a hand-kept list: does a request read or write, and which keys does
//! it touch ([`CommandTable::keys`], Redis's own `getKeysUsingKeySpecs`
//! algorithm). It does no I/O and holds no session state: the caller sends
//! `COMMAND` on a RESP2 upstream connection, frames the reply and hands the
//! bytes over. It must not touch the cache; callers decide what an
//! [`Keys::Unknown`] means for L1 (flush conservatively).
//!
//! Upstream is trusted for what commands mean, but not for being well formed:
//! nothing here indexes out of bounds, loops without a bound or allocates in
//! proportion to a number read from the reply or from a client's arguments.

use std::collections::HashMap;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;

use crate::protocol::parse::string2ll as redis_int;
use crate::protocol::{FrameError, ReplyFramer};

/// How deep the `COMMAND` reply may nest. Redis 7 needs 8 (reply → entry →
/// subcommands → entry → key specs → spec → begin_search → spec); the cap
/// exists because redis-protocol's decoder recurses once per level without a
/// bound, so tierd's own framer checks the depth before it decodes.
const MAX_REPLY_DEPTH: usize = 16;

/// Command names up to this length are lowercased into a stack buffer for
/// lookup. Redis's longest is 25 bytes; only a module with a longer name
/// makes a lookup allocate, and only for names that long.
const STACK_NAME: usize = 64;

/// The `COMMAND` reply could not be turned into a table. Always the
/// upstream's fault (or the caller's, for handing over the wrong bytes);
/// retrying against the same server gives the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The bytes end before the reply does.
    #[error("COMMAND reply is truncated")]
    Incomplete,
    /// Bytes follow the reply frame.
    #[error("COMMAND reply is followed by {0} more bytes")]
    TrailingBytes(usize),
    /// Not RESP, or nested deeper than a COMMAND reply ever is.
    #[error("COMMAND reply is not a valid RESP frame: {0}")]
    Frame(#[from] FrameError),
    /// Framed, but not RESP2. A RESP3 reply (from a connection after
    /// `HELLO 3`) sends flags, key specs and subcommands as sets, which the
    /// decoder turns into unordered hash sets; fetch `COMMAND` on RESP2.
    #[error("COMMAND reply is not RESP2: {0}")]
    Decode(String),
    /// Upstream answered `COMMAND` with an error (e.g. `-NOPERM`).
    #[error("upstream refused COMMAND: {0}")]
    Upstream(String),
    /// The reply is RESP2 but not shaped like a `COMMAND` reply.
    #[error("COMMAND reply entry {entry}: {what}")]
    Malformed {
        /// The command's name, or `#n` for the n-th entry when the name
        /// itself is unreadable.
        entry: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Two entries with the same (case-insensitive) name.
    #[error("COMMAND reply lists {0:?} twice")]
    Duplicate(String),
}

impl TableError {
    /// A short stable label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            TableError::Incomplete => "incomplete",
            TableError::TrailingBytes(_) => "trailing_bytes",
            TableError::Frame(_) => "frame",
            TableError::Decode(_) => "decode",
            TableError::Upstream(_) => "upstream_error",
            TableError::Malformed { .. } => "malformed",
            TableError::Duplicate(_) => "duplicate",
        }
    }
}

/// What tierd knows about every upstream command, read from `COMMAND`.
///
/// Lookups are case-insensitive and do not allocate: names are stored
/// lowercase and a looked-up name is lowercased into a stack buffer.
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    /// Top-level commands by lowercase name. Subcommands live inside their
    /// container ([`Command::subcommands`]).
    /// Hashed with ahash (quick_cache's default): every cacheable request
    /// looks its command up here, and ahash is several times cheaper than
    /// std's SipHash on short names.
    commands: HashMap<Box<[u8]>, Command, quick_cache::DefaultHashBuilder>,
    /// The longest name in `commands`: anything longer is unknown without
    /// looking, so a hostile 1 MB "command name" costs nothing.
    max_name_len: usize,
}

/// One entry of the `COMMAND` reply (a command, or a subcommand such as
/// `config|get`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// As upstream spells it: lowercase, subcommands as `container|sub`.
    pub name: String,
    /// Redis's arity: exactly `n` arguments (name included) if positive, at
    /// least `-n` if negative.
    pub arity: i64,
    /// The command flags.
    pub flags: Flags,
    /// Legacy key range: index of the first key (0: no keys).
    pub first_key: i64,
    /// Legacy key range: index of the last key, negative counting from the
    /// end. Only the key specs are exact; this is kept for pre-7 servers.
    pub last_key: i64,
    /// Legacy key range: distance between keys.
    pub step: i64,
    /// ACL categories (`@read`, `@dangerous` …), in upstream's order.
    pub acl_categories: Vec<String>,
    /// Command tips (Redis 7).
    pub tips: Tips,
    /// Key specs (Redis 7), in upstream's order, which is also the order
    /// [`Command::keys`] reports keys in.
    pub key_specs: Vec<KeySpec>,
    /// Subcommands (Redis 7), e.g. `config|get` inside `config`.
    pub subcommands: Vec<Command>,
}

/// Command flags from the third field of a `COMMAND` entry. Flags tierd does
/// not name are kept in `other`, so that a newer server's additions are seen
/// rather than lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // One bool per upstream flag is the honest shape.
pub struct Flags {
    /// `write`: may modify the keyspace.
    pub write: bool,
    /// `readonly`: never modifies keys.
    pub readonly: bool,
    /// `denyoom`: refused when over `maxmemory`.
    pub denyoom: bool,
    /// `module`: provided by a module.
    pub module: bool,
    /// `admin`: administrative.
    pub admin: bool,
    /// `pubsub`: Pub/Sub related.
    pub pubsub: bool,
    /// `noscript`: not allowed in scripts.
    pub noscript: bool,
    /// `blocking`: may block the client.
    pub blocking: bool,
    /// `loading`: allowed while the dataset loads.
    pub loading: bool,
    /// `stale`: allowed on a replica with stale data.
    pub stale: bool,
    /// `skip_monitor`: not shown in `MONITOR`.
    pub skip_monitor: bool,
    /// `skip_slowlog`: not shown in the slow log.
    pub skip_slowlog: bool,
    /// `asking`: cluster `ASKING` related.
    pub asking: bool,
    /// `fast`: O(1) or O(log N).
    pub fast: bool,
    /// `no_auth`: allowed before authentication.
    pub no_auth: bool,
    /// `may_replicate`: may be replicated even if it writes nothing.
    pub may_replicate: bool,
    /// `no_mandatory_keys`: may take no keys at all (`EVAL s 0`).
    pub no_mandatory_keys: bool,
    /// `no_async_loading`: refused during async loading.
    pub no_async_loading: bool,
    /// `no_multi`: not allowed inside `MULTI`.
    pub no_multi: bool,
    /// `movablekeys`: key positions depend on the arguments; the legacy
    /// range is not enough (the key specs are).
    pub movablekeys: bool,
    /// `allow_busy`: allowed while a script is busy.
    pub allow_busy: bool,
    /// `random` (before Redis 7, now the `nondeterministic_output` tip).
    pub random: bool,
    /// `sort_for_script` (before Redis 7, now the `nondeterministic_output_order` tip).
    pub sort_for_script: bool,
    /// Flags not named above, as upstream spells them.
    pub other: Vec<String>,
}

impl Flags {
    fn set(&mut self, flag: &[u8]) {
        let slot = match flag {
            b"write" => &mut self.write,
            b"readonly" => &mut self.readonly,
            b"denyoom" => &mut self.denyoom,
            b"module" => &mut self.module,
            b"admin" => &mut self.admin,
            b"pubsub" => &mut self.pubsub,
            b"noscript" => &mut self.noscript,
            b"blocking" => &mut self.blocking,
            b"loading" => &mut self.loading,
            b"stale" => &mut self.stale,
            b"skip_monitor" => &mut self.skip_monitor,
            b"skip_slowlog" => &mut self.skip_slowlog,
            b"asking" => &mut self.asking,
            b"fast" => &mut self.fast,
            b"no_auth" => &mut self.no_auth,
            b"may_replicate" => &mut self.may_replicate,
            b"no_mandatory_keys" => &mut self.no_mandatory_keys,
            b"no_async_loading" => &mut self.no_async_loading,
            b"no_multi" => &mut self.no_multi,
            b"movablekeys" => &mut self.movablekeys,
            b"allow_busy" => &mut self.allow_busy,
            b"random" => &mut self.random,
            b"sort_for_script" => &mut self.sort_for_script,
            _ => {
                self.other.push(lossy(flag));
                return;
            }
        };
        *slot = true;
    }
}

/// Command tips (Redis 7), the eighth field of a `COMMAND` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tips {
    /// The reply may differ between two calls on the same data (`TIME`,
    /// `RANDOMKEY`, `SPOP` …): never cache it.
    pub nondeterministic_output: bool,
    /// Same elements, but their order may differ (`SMEMBERS`, `HGETALL`).
    /// Any one such reply is a valid answer, so this does not stop caching.
    pub nondeterministic_output_order: bool,
    /// `request_policy:<policy>` (cluster fan-out), the part after the colon.
    pub request_policy: Option<String>,
    /// `response_policy:<policy>` (cluster reply merging), after the colon.
    pub response_policy: Option<String>,
    /// Tips not named above, as upstream spells them.
    pub other: Vec<String>,
}

impl Tips {
    fn set(&mut self, tip: &[u8]) {
        match tip {
            b"nondeterministic_output" => self.nondeterministic_output = true,
            b"nondeterministic_output_order" => self.nondeterministic_output_order = true,
            _ => {
                if let Some(policy) = tip.strip_prefix(b"request_policy:") {
                    self.request_policy = Some(lossy(policy));
                } else if let Some(policy) = tip.strip_prefix(b"response_policy:") {
                    self.response_policy = Some(lossy(policy));
                } else {
                    self.other.push(lossy(tip));
                }
            }
        }
    }
}

/// One key spec: where to start looking for keys, how to find them from
/// there, and what the command does to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Upstream's explanation, when it gives one (often why a spec is
    /// `unknown` or `incomplete`).
    pub notes: Option<String>,
    /// What the command does to these keys.
    pub flags: KeyFlags,
    /// Where the search starts.
    pub begin_search: BeginSearch,
    /// How keys are found from there.
    pub find_keys: FindKeys,
}

impl KeySpec {
    /// Whether this spec alone says exactly which arguments are keys: not
    /// `incomplete`, and neither step is `unknown`. (`not_key` specs are
    /// complete; they just name no keys.)
    pub fn is_complete(&self) -> bool {
        !self.flags.incomplete
            && self.begin_search != BeginSearch::Unknown
            && self.find_keys != FindKeys::Unknown
    }
}

/// Where a key spec's search starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginSearch {
    /// At this argument index (the command name is index 0).
    Index(i64),
    /// One past the first argument equal (case-insensitively) to `keyword`,
    /// searching forward from `startfrom` if it is positive, else backwards
    /// from `argc + startfrom`.
    Keyword {
        /// The keyword, e.g. `STREAMS`.
        keyword: String,
        /// Where the search starts.
        startfrom: i64,
    },
    /// Upstream cannot say (`SORT … BY/GET/STORE`), or a type tierd does not
    /// know.
    Unknown,
}

/// How a key spec finds its keys, from where the search began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindKeys {
    /// Keys from `first` to `first + lastkey` every `step`. A negative
    /// `lastkey` counts from the end of the arguments, or, with a `limit`,
    /// covers `1/limit` of the remaining arguments (`XREAD … STREAMS k1 k2
    /// id1 id2`).
    Range {
        /// Last key, relative to the first; negative from the end.
        lastkey: i64,
        /// Distance between keys.
        step: i64,
        /// With a negative `lastkey`: the remaining arguments are divided
        /// by this. 0 for none.
        limit: i64,
    },
    /// The argument at `first + keynumidx` says how many keys follow,
    /// starting at `first + firstkey`, every `step`.
    Keynum {
        /// Where the key count is, relative to the search start.
        keynumidx: i64,
        /// Where the first key is, relative to the search start.
        firstkey: i64,
        /// Distance between keys.
        step: i64,
    },
    /// Upstream cannot say, or a type tierd does not know.
    Unknown,
}

/// Key spec flags: what the command does to the keys a spec finds. See
/// Redis's "key specifications" documentation for the exact meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // One bool per upstream flag is the honest shape.
pub struct KeyFlags {
    /// `RO`: read-only access.
    pub ro: bool,
    /// `RW`: read and modified.
    pub rw: bool,
    /// `OW`: overwritten without being read.
    pub ow: bool,
    /// `RM`: deleted.
    pub rm: bool,
    /// `access`: the user data is returned, copied or used.
    pub access: bool,
    /// `update`: the value is updated or overwritten.
    pub update: bool,
    /// `insert`: data is added, nothing changed or deleted.
    pub insert: bool,
    /// `delete`: data is deleted.
    pub delete: bool,
    /// `not_key`: the "key" is not a key (a shard channel).
    pub not_key: bool,
    /// `incomplete`: the spec may miss keys.
    pub incomplete: bool,
    /// `variable_flags`: the flags depend on the arguments (`SET … GET`);
    /// the ones listed are the most a call can do.
    pub variable_flags: bool,
}

impl KeyFlags {
    fn set(&mut self, flag: &[u8]) {
        // Unknown flags are dropped: they can only add detail to what the
        // four access flags (RO/RW/OW/RM) already say.
        match flag {
            b"RO" => self.ro = true,
            b"RW" => self.rw = true,
            b"OW" => self.ow = true,
            b"RM" => self.rm = true,
            b"access" => self.access = true,
            b"update" => self.update = true,
            b"insert" => self.insert = true,
            b"delete" => self.delete = true,
            b"not_key" => self.not_key = true,
            b"incomplete" => self.incomplete = true,
            b"variable_flags" => self.variable_flags = true,
            _ => {}
        }
    }

    /// The key may change: `RW`, `OW`, `RM`, `insert`, `update` or `delete`.
    pub fn writes(&self) -> bool {
        self.rw || self.ow || self.rm || self.insert || self.update || self.delete
    }

    /// The key's data is read: `RO`, `RW` or `access`.
    pub fn reads(&self) -> bool {
        self.ro || self.rw || self.access
    }
}

/// The keys a request touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys<'a> {
    /// Exactly these, in key-spec order (Redis's `COMMAND GETKEYS` order).
    /// A key may appear more than once (`EXISTS a a`).
    Known(Vec<KeyRef<'a>>),
    /// They cannot be told from the arguments: the command is not in the
    /// table, a spec is `incomplete` or `unknown`, or the arguments do not
    /// fit the specs (an out-of-range or non-numeric key count). Callers
    /// must assume any key.
    Unknown,
}

impl<'a> Keys<'a> {
    /// The keys, if known.
    pub fn known(&self) -> Option<&[KeyRef<'a>]> {
        match self {
            Keys::Known(keys) => Some(keys),
            Keys::Unknown => None,
        }
    }
}

/// One key argument of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRef<'a> {
    /// The key's bytes, borrowed from the request.
    pub key: &'a [u8],
    /// Its index in the arguments (the command name is 0).
    pub index: usize,
    /// The spec says the key may change ([`KeyFlags::writes`]). A command
    /// can change state hanging off a key its spec calls `RO` (`XREADGROUP`
    /// moves the group's pending list), so invalidate every key of a
    /// [`Command::is_write`] command, not only these.
    pub write: bool,
    /// The spec says the key's data is read ([`KeyFlags::reads`]).
    pub read: bool,
    /// The spec's flags in full.
    pub flags: KeyFlags,
}

impl CommandTable {
    /// Builds the table from one complete `COMMAND` reply frame, exactly as
    /// upstream sent it on a RESP2 connection.
    ///
    /// # Errors
    ///
    /// A [`TableError`] if the bytes are not exactly one well-formed RESP2
    /// `COMMAND` reply (truncated, trailing bytes, nested deeper than 16,
    /// RESP3, an error reply, an entry missing its name, arity, flags or key
    /// range, a field of the wrong type, or a name listed twice).
    pub fn from_command_reply(frame: &[u8]) -> Result<CommandTable, TableError> {
        // Frame first: it checks completeness and caps the depth without
        // recursing, so the recursive decoder below only ever sees a
        // complete reply at most MAX_REPLY_DEPTH deep.
        let len = ReplyFramer::new(MAX_REPLY_DEPTH)
            .frame(frame)?
            .ok_or(TableError::Incomplete)?;
        if len != frame.len() {
            return Err(TableError::TrailingBytes(frame.len().saturating_sub(len)));
        }
        let decoded = redis_protocol::resp2::decode::decode(frame)
            .map_err(|e| TableError::Decode(e.to_string()))?;
        let Some((reply, _)) = decoded else {
            return Err(TableError::Incomplete);
        };
        let entries = match reply {
            OwnedFrame::Array(entries) => entries,
            OwnedFrame::Error(msg) => return Err(TableError::Upstream(msg)),
            _ => {
                return Err(TableError::Malformed {
                    entry: "reply".into(),
                    what: "not an array",
                })
            }
        };
        let mut table = CommandTable {
            commands: HashMap::with_capacity_and_hasher(entries.len(), Default::default()),
            max_name_len: 0,
        };
        for (n, entry) in entries.iter().enumerate() {
            let command = parse_command(entry, n)?;
            let key: Box<[u8]> = command.name.to_ascii_lowercase().into_bytes().into();
            table.max_name_len = table.max_name_len.max(key.len());
            if let Some(previous) = table.commands.insert(key, command) {
                return Err(TableError::Duplicate(previous.name));
            }
        }
        Ok(table)
    }

    /// The top-level command called `name`, case-insensitively.
    pub fn get(&self, name: &[u8]) -> Option<&Command> {
        if name.len() > self.max_name_len {
            return None;
        }
        let mut buf = [0u8; STACK_NAME];
        match buf.get_mut(..name.len()) {
            Some(lower) => {
                for (dst, src) in lower.iter_mut().zip(name) {
                    *dst = src.to_ascii_lowercase();
                }
                self.commands.get(&*lower)
            }
            // Only reachable when upstream itself has a name this long.
            None => self.commands.get(name.to_ascii_lowercase().as_slice()),
        }
    }

    /// The command a request runs: `args[0]`, or for a command with
    /// subcommands the one named by `args[1]` (`CONFIG GET` → `config|get`).
    /// A container without its subcommand argument resolves to the container
    /// (Redis then refuses it for arity). `None` for an unknown command or
    /// subcommand, which Redis would refuse too.
    pub fn resolve<'t>(&'t self, args: &[Bytes]) -> Option<&'t Command> {
        let command = self.get(args.first()?)?;
        if command.subcommands.is_empty() {
            return Some(command);
        }
        match args.get(1) {
            Some(sub) => command.subcommand(sub),
            None => Some(command),
        }
    }

    /// The keys a request touches, from its command's key specs; see
    /// [`Command::keys`]. [`Keys::Unknown`] when the command is unknown.
    pub fn keys<'a>(&self, args: &'a [Bytes]) -> Keys<'a> {
        match self.resolve(args) {
            Some(command) => command.keys(args),
            None => Keys::Unknown,
        }
    }

    /// How many top-level commands the table has (subcommands not counted).
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether the table has no commands at all.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Every top-level command, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Command> {
        self.commands.values()
    }
}

impl Command {
    /// Whether the command may modify data: the `write` flag, or a key spec
    /// that may change its keys.
    ///
    /// The second half matters for two families on Redis 7.0. `EVAL`,
    /// `EVALSHA` and `FCALL` carry neither `write` nor `readonly` but declare
    /// their keys `RW`. `PFCOUNT` is flagged `readonly` but its key is `RW`:
    /// it rewrites the cardinality cached in the HyperLogLog, which changes
    /// the bytes a `GET` of that key returns, so a cached `GET` must die.
    pub fn is_write(&self) -> bool {
        self.flags.write
            || self
                .key_specs
                .iter()
                .any(|spec| !spec.flags.not_key && spec.flags.writes())
    }

    /// Whether the command only reads: the `readonly` flag and not
    /// [`Command::is_write`].
    pub fn is_read_only(&self) -> bool {
        self.flags.readonly && !self.is_write()
    }

    /// Whether two calls on the same data give the same reply: no
    /// `nondeterministic_output` tip and no (pre-7) `random` flag. A
    /// `nondeterministic_output_order` reply (`SMEMBERS`) still counts: any
    /// order is a reply Redis could have given.
    pub fn is_deterministic(&self) -> bool {
        !self.tips.nondeterministic_output && !self.flags.random
    }

    /// The one key of a request whose reply tierd may cache, or `None`.
    ///
    /// Cacheable means: [`Command::is_read_only`], [`Command::is_deterministic`]
    /// (which rules out `TTL`, `PTTL`, `OBJECT …`, `SRANDMEMBER`, `SCAN` …),
    /// not blocking or pub/sub, and exactly one key by a single key spec that
    /// starts at an index (`GET k`, `HGETALL k`, `EXISTS k`, but not `EXISTS
    /// a b` or `MGET a b`, which tierd splits itself). `TOUCH` is excluded
    /// although it only reads: its whole point is its side effect on the
    /// key's access time, which a cached reply would skip. So is `XINFO`,
    /// whose reply changes without a tracking invalidation (see below), and
    /// so are scripts (`EVAL_RO`, `FCALL_RO` …): a script may read keys it
    /// did not declare, or the time.
    pub fn cacheable_key<'a>(&self, args: &'a [Bytes]) -> Option<&'a [u8]> {
        if !self.is_read_only()
            || !self.is_deterministic()
            || self.flags.blocking
            || self.flags.pubsub
            // Scripts (EVAL_RO, FCALL_RO …) may read keys they did not
            // declare, or the clock; their keys move with the arguments.
            || self.flags.movablekeys
            || self.acl_categories.iter().any(|c| c == "@scripting")
            || self.name == "touch"
            // Consumer-group changes (XGROUP, XREADGROUP, XACK …) and
            // XSETID change what XINFO shows without Redis 7 sending a
            // tracking invalidation for the stream, so a cached XINFO
            // could not be kept coherent.
            || self.name.starts_with("xinfo")
            || !self.arity_allows(args.len())
        {
            return None;
        }
        let [spec] = self.key_specs.as_slice() else {
            return None;
        };
        if spec.flags.not_key
            || spec.flags.incomplete
            || !matches!(spec.begin_search, BeginSearch::Index(_))
        {
            return None;
        }
        let argc = i64::try_from(args.len()).ok()?;
        match spec_range(spec, args, argc) {
            Found::Range { first, last, .. } if first == last => {
                args.get(usize::try_from(first).ok()?).map(|k| &k[..])
            }
            _ => None,
        }
    }

    /// The subcommand called `name` (`get` finds `config|get`),
    /// case-insensitively. A linear scan: the largest container (`CLIENT`)
    /// has about twenty.
    pub fn subcommand(&self, name: &[u8]) -> Option<&Command> {
        self.subcommands.iter().find(|sub| {
            let full = sub.name.as_bytes();
            let short = match full.iter().position(|&b| b == b'|') {
                Some(bar) => full.get(bar + 1..).unwrap_or_default(),
                None => full,
            };
            short.eq_ignore_ascii_case(name)
        })
    }

    /// Whether Redis accepts `argc` arguments (name included) for this
    /// command. Arity 0 is not something Redis sends; it is read as "any".
    pub fn arity_allows(&self, argc: usize) -> bool {
        let argc = i64::try_from(argc).unwrap_or(i64::MAX);
        match self.arity {
            0 => true,
            n if n > 0 => argc == n,
            n => argc >= n.saturating_neg(),
        }
    }

    /// The keys `args` (the full request, name first) touches, by Redis's
    /// `getKeysUsingKeySpecs`: for each spec, find where the search begins
    /// (an index, or a keyword), then the keys (a range, or a count read from
    /// the arguments), bounds-checked against the arguments.
    ///
    /// It differs from Redis where Redis's own answer would be less useful
    /// to a cache, never where it would miss a key:
    /// - wrong arity: `Known` and empty, because Redis refuses the request
    ///   before it runs, so it touches nothing;
    /// - a key count of 0 (`EVAL s 0`): no keys from that spec, as
    ///   `COMMAND GETKEYS` reports (Redis's spec walk calls it invalid and
    ///   falls back to the command's own key finder, which says none);
    /// - `Unknown` wherever Redis would fall back to a command's hand-written
    ///   key finder: an `unknown` or `incomplete` spec, or arguments that do
    ///   not fit the specs;
    /// - `not_key` specs (shard channels) name no keys.
    ///
    /// Commands without key specs (servers before 7.0) use the legacy range,
    /// and are `Unknown` if they have `movablekeys`.
    pub fn keys<'a>(&self, args: &'a [Bytes]) -> Keys<'a> {
        if !self.arity_allows(args.len()) {
            return Keys::Known(Vec::new());
        }
        if self.key_specs.is_empty() {
            return self.legacy_keys(args);
        }
        let Ok(argc) = i64::try_from(args.len()) else {
            return Keys::Unknown;
        };
        let mut keys = Vec::new();
        for spec in &self.key_specs {
            if spec.flags.not_key {
                continue;
            }
            if spec.flags.incomplete {
                return Keys::Unknown;
            }
            match spec_range(spec, args, argc) {
                Found::Range { first, last, step } => {
                    push_range(&mut keys, args, first, last, step, spec.flags);
                }
                Found::Nothing => {}
                Found::Invalid => return Keys::Unknown,
            }
        }
        Keys::Known(keys)
    }

    /// Keys from the legacy (first, last, step) range, for servers that send
    /// no key specs. The range has no access flags, so keys are taken as
    /// written exactly when the command has the `write` flag.
    fn legacy_keys<'a>(&self, args: &'a [Bytes]) -> Keys<'a> {
        if self.flags.movablekeys {
            return Keys::Unknown;
        }
        if self.first_key == 0 {
            return Keys::Known(Vec::new());
        }
        let Ok(argc) = i64::try_from(args.len()) else {
            return Keys::Unknown;
        };
        let first = self.first_key;
        let last = if self.last_key >= 0 {
            self.last_key
        } else {
            argc.saturating_add(self.last_key)
        };
        if first < 1 || first >= argc || last < first || last >= argc || self.step < 1 {
            return Keys::Unknown;
        }
        let write = self.flags.write;
        let flags = KeyFlags {
            ro: !write,
            rw: write,
            access: true,
            ..KeyFlags::default()
        };
        let mut keys = Vec::new();
        push_range(&mut keys, args, first, last, self.step, flags);
        Keys::Known(keys)
    }
}

/// What one key spec finds in a request.
enum Found {
    /// Keys at `first..=last` every `step`, all within the arguments.
    Range { first: i64, last: i64, step: i64 },
    /// No keys: the keyword is absent, or the key count is 0.
    Nothing,
    /// The spec cannot say, or the arguments do not fit it.
    Invalid,
}

/// One step of Redis's `getKeysUsingKeySpecs`, with every index checked.
/// Arithmetic is `i64` and checked, where Redis uses `int`: a hostile key
/// count or spec can overflow neither.
fn spec_range(spec: &KeySpec, args: &[Bytes], argc: i64) -> Found {
    let first = match &spec.begin_search {
        BeginSearch::Index(index) => *index,
        BeginSearch::Keyword { keyword, startfrom } => {
            match find_keyword(args, argc, keyword.as_bytes(), *startfrom) {
                Some(first) => first,
                None => return Found::Nothing,
            }
        }
        BeginSearch::Unknown => return Found::Invalid,
    };
    let (first, last, step) = match &spec.find_keys {
        FindKeys::Range {
            lastkey,
            step,
            limit,
        } => {
            let last = if *lastkey >= 0 {
                first.checked_add(*lastkey)
            } else if *limit == 0 {
                argc.checked_add(*lastkey)
            } else if *limit > 0 {
                // XREAD … STREAMS k1 k2 id1 id2: the keys are the first
                // 1/limit of what follows the keyword.
                argc.checked_sub(first)
                    .map(|rest| rest / limit)
                    .and_then(|n| n.checked_add(*lastkey))
                    .and_then(|n| first.checked_add(n))
            } else {
                None
            };
            match last {
                Some(last) => (first, last, *step),
                None => return Found::Invalid,
            }
        }
        FindKeys::Keynum {
            keynumidx,
            firstkey,
            step,
        } => {
            let count = first
                .checked_add(*keynumidx)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| args.get(at))
                .and_then(|arg| redis_int(arg));
            let Some(count) = count.filter(|&n| n >= 0) else {
                return Found::Invalid;
            };
            if count == 0 {
                return Found::Nothing;
            }
            let keys_from = first.checked_add(*firstkey);
            let last = keys_from
                .and_then(|f| f.checked_add(count))
                .and_then(|l| l.checked_sub(1));
            match (keys_from, last) {
                (Some(keys_from), Some(last)) => (keys_from, last, *step),
                _ => return Found::Invalid,
            }
        }
        FindKeys::Unknown => return Found::Invalid,
    };
    // Out of bounds means a syntax error Redis will reply to; index 0 would
    // make the command name a key, and a step below 1 would never advance.
    if first < 1 || first >= argc || last < first || last >= argc || step < 1 {
        return Found::Invalid;
    }
    Found::Range { first, last, step }
}

/// Redis's keyword search: forward from `startfrom` up to (not including)
/// the last argument, or backwards from `argc + startfrom` down to (not
/// including) index 1. Returns the index after the keyword. At most `argc`
/// steps, since every step stays within `1..argc`.
fn find_keyword(args: &[Bytes], argc: i64, keyword: &[u8], startfrom: i64) -> Option<i64> {
    let (start, end) = if startfrom > 0 {
        (startfrom, argc - 1)
    } else {
        (argc.checked_add(startfrom)?, 1)
    };
    let forward = start <= end;
    let mut i = start;
    while i != end {
        if i >= argc || i < 1 {
            return None;
        }
        let arg = usize::try_from(i).ok().and_then(|i| args.get(i))?;
        if arg.eq_ignore_ascii_case(keyword) {
            return Some(i + 1);
        }
        i = if forward { i + 1 } else { i - 1 };
    }
    None
}

/// Appends the keys at `first..=last` every `step`. The caller has checked
/// the bounds; an index that still falls outside is skipped, not indexed.
fn push_range<'a>(
    keys: &mut Vec<KeyRef<'a>>,
    args: &'a [Bytes],
    first: i64,
    last: i64,
    step: i64,
    flags: KeyFlags,
) {
    let mut i = first;
    while i <= last {
        if let Some((index, key)) = usize::try_from(i)
            .ok()
            .and_then(|index| Some((index, args.get(index)?)))
        {
            keys.push(KeyRef {
                key,
                index,
                write: flags.writes(),
                read: flags.reads(),
                flags,
            });
        }
        match i.checked_add(step) {
            Some(next) => i = next,
            None => break,
        }
    }
}

/// One `COMMAND` entry (recursively, its subcommands). Recursion is bounded
/// by the framer's depth cap.
fn parse_command(frame: &OwnedFrame, n: usize) -> Result<Command, TableError> {
    let unnamed = || format!("#{n}");
    let fields = list(frame).ok_or_else(|| malformed(unnamed(), "not an array"))?;
    let name = fields
        .first()
        .and_then(text)
        .filter(|name| !name.is_empty())
        .map(lossy)
        .ok_or_else(|| malformed(unnamed(), "no name"))?;
    let int_at = |i: usize, what: &'static str| {
        fields
            .get(i)
            .and_then(int)
            .ok_or_else(|| malformed(name.clone(), what))
    };
    let arity = int_at(1, "no arity")?;
    let first_key = int_at(3, "no first key")?;
    let last_key = int_at(4, "no last key")?;
    let step = int_at(5, "no key step")?;

    let mut flags = Flags::default();
    for flag in strings(fields.get(2), &name, "flags are not strings")? {
        flags.set(flag);
    }
    // Fields 6.. arrived over the versions (ACL categories in 6.0; tips, key
    // specs and subcommands in 7.0): absent means none.
    let acl_categories = strings(fields.get(6), &name, "ACL categories are not strings")?
        .into_iter()
        .map(lossy)
        .collect();
    let mut tips = Tips::default();
    for tip in strings(fields.get(7), &name, "tips are not strings")? {
        tips.set(tip);
    }
    let key_specs = match fields.get(8) {
        None => Vec::new(),
        Some(specs) => list(specs)
            .ok_or_else(|| malformed(name.clone(), "key specs are not an array"))?
            .iter()
            .map(|spec| parse_key_spec(spec, &name))
            .collect::<Result<_, _>>()?,
    };
    let subcommands = match fields.get(9) {
        None => Vec::new(),
        Some(subs) => list(subs)
            .ok_or_else(|| malformed(name.clone(), "subcommands are not an array"))?
            .iter()
            .enumerate()
            .map(|(i, sub)| parse_command(sub, i))
            .collect::<Result<_, _>>()?,
    };
    Ok(Command {
        name,
        arity,
        flags,
        first_key,
        last_key,
        step,
        acl_categories,
        tips,
        key_specs,
        subcommands,
    })
}

/// One key spec: a flat RESP2 map (`flags`, `begin_search`, `find_keys`,
/// optional `notes`). A search step of a type tierd does not know, or one
/// missing its parameters, becomes `Unknown` rather than an error: that only
/// makes [`Command::keys`] conservative for that command, where an error
/// would leave tierd without any table.
fn parse_key_spec(frame: &OwnedFrame, name: &str) -> Result<KeySpec, TableError> {
    let fields = list(frame).ok_or_else(|| malformed(name.into(), "key spec is not an array"))?;
    let mut flags = KeyFlags::default();
    for flag in strings(
        field(fields, "flags"),
        name,
        "key spec flags are not strings",
    )? {
        flags.set(flag);
    }
    let notes = field(fields, "notes").and_then(text).map(lossy);

    let begin = field(fields, "begin_search").and_then(list);
    let begin_spec = begin.and_then(|b| field(b, "spec")).and_then(list);
    let begin_search = match begin.and_then(|b| field(b, "type")).and_then(text) {
        Some(b"index") => begin_spec
            .and_then(|s| field(s, "index"))
            .and_then(int)
            .map_or(BeginSearch::Unknown, BeginSearch::Index),
        Some(b"keyword") => {
            let keyword = begin_spec.and_then(|s| field(s, "keyword")).and_then(text);
            let startfrom = begin_spec.and_then(|s| field(s, "startfrom")).and_then(int);
            match (keyword, startfrom) {
                (Some(keyword), Some(startfrom)) => BeginSearch::Keyword {
                    keyword: lossy(keyword),
                    startfrom,
                },
                _ => BeginSearch::Unknown,
            }
        }
        _ => BeginSearch::Unknown,
    };

    let find = field(fields, "find_keys").and_then(list);
    let find_spec = find.and_then(|f| field(f, "spec")).and_then(list);
    let param = |key: &str| find_spec.and_then(|s| field(s, key)).and_then(int);
    let find_keys = match find.and_then(|f| field(f, "type")).and_then(text) {
        Some(b"range") => match (param("lastkey"), param("keystep"), param("limit")) {
            (Some(lastkey), Some(step), Some(limit)) => FindKeys::Range {
                lastkey,
                step,
                limit,
            },
            _ => FindKeys::Unknown,
        },
        Some(b"keynum") => match (param("keynumidx"), param("firstkey"), param("keystep")) {
            (Some(keynumidx), Some(firstkey), Some(step)) => FindKeys::Keynum {
                keynumidx,
                firstkey,
                step,
            },
            _ => FindKeys::Unknown,
        },
        _ => FindKeys::Unknown,
    };
    Ok(KeySpec {
        notes,
        flags,
        begin_search,
        find_keys,
    })
}

fn malformed(entry: String, what: &'static str) -> TableError {
    TableError::Malformed { entry, what }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn text(frame: &OwnedFrame) -> Option<&[u8]> {
    match frame {
        OwnedFrame::SimpleString(s) | OwnedFrame::BulkString(s) => Some(s),
        _ => None,
    }
}

fn int(frame: &OwnedFrame) -> Option<i64> {
    match frame {
        OwnedFrame::Integer(i) => Some(*i),
        _ => None,
    }
}

fn list(frame: &OwnedFrame) -> Option<&[OwnedFrame]> {
    match frame {
        OwnedFrame::Array(items) => Some(items),
        _ => None,
    }
}

/// The value after `key` in a flat RESP2 map (`key, value, key, value …`).
fn field<'f>(pairs: &'f [OwnedFrame], key: &str) -> Option<&'f OwnedFrame> {
    pairs
        .chunks_exact(2)
        .find(|pair| pair.first().and_then(text) == Some(key.as_bytes()))
        .and_then(|pair| pair.get(1))
}

/// The strings of an optional array field; absent is empty, anything else
/// that is not an array of strings is `what`.
fn strings<'f>(
    frame: Option<&'f OwnedFrame>,
    name: &str,
    what: &'static str,
) -> Result<Vec<&'f [u8]>, TableError> {
    let Some(frame) = frame else {
        return Ok(Vec::new());
    };
    list(frame)
        .ok_or_else(|| malformed(name.into(), what))?
        .iter()
        .map(|item| text(item).ok_or_else(|| malformed(name.into(), what)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny RESP2 writer for hand-built `COMMAND` replies.
    enum R {
        S(&'static str),
        B(&'static str),
        I(i64),
        A(Vec<R>),
    }
    use R::{A, B, I, S};

    fn encode(r: &R, out: &mut Vec<u8>) {
        match r {
            S(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            B(s) => out.extend_from_slice(format!("${}\r\n{s}\r\n", s.len()).as_bytes()),
            I(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            A(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    encode(item, out);
                }
            }
        }
    }

    fn bytes(r: &R) -> Vec<u8> {
        let mut out = Vec::new();
        encode(r, &mut out);
        out
    }

    fn strs(items: &[&'static str]) -> R {
        A(items.iter().copied().map(S).collect())
    }

    fn index(i: i64) -> R {
        A(vec![
            B("type"),
            B("index"),
            B("spec"),
            A(vec![B("index"), I(i)]),
        ])
    }

    fn keyword(k: &'static str, from: i64) -> R {
        A(vec![
            B("type"),
            B("keyword"),
            B("spec"),
            A(vec![B("keyword"), B(k), B("startfrom"), I(from)]),
        ])
    }

    fn range(lastkey: i64, step: i64, limit: i64) -> R {
        A(vec![
            B("type"),
            B("range"),
            B("spec"),
            A(vec![
                B("lastkey"),
                I(lastkey),
                B("keystep"),
                I(step),
                B("limit"),
                I(limit),
            ]),
        ])
    }

    fn keynum(idx: i64, first: i64, step: i64) -> R {
        A(vec![
            B("type"),
            B("keynum"),
            B("spec"),
            A(vec![
                B("keynumidx"),
                I(idx),
                B("firstkey"),
                I(first),
                B("keystep"),
                I(step),
            ]),
        ])
    }

    fn unknown() -> R {
        A(vec![B("type"), B("unknown"), B("spec"), A(vec![])])
    }

    fn spec(flags: &[&'static str], begin: R, find: R) -> R {
        A(vec![
            B("flags"),
            strs(flags),
            B("begin_search"),
            begin,
            B("find_keys"),
            find,
        ])
    }

    fn cmd(name: &'static str, arity: i64, flags: &[&'static str], specs: Vec<R>) -> R {
        cmd_with(name, arity, flags, &[], specs, vec![])
    }

    fn cmd_with(
        name: &'static str,
        arity: i64,
        flags: &[&'static str],
        tips: &[&'static str],
        specs: Vec<R>,
        subs: Vec<R>,
    ) -> R {
        A(vec![
            B(name),
            I(arity),
            strs(flags),
            I(0),
            I(0),
            I(0),
            strs(&["@slow"]),
            A(tips.iter().copied().map(B).collect()),
            A(specs),
            A(subs),
        ])
    }

    /// A few real Redis 7.0 entries, abridged to what the table reads.
    fn reply() -> Vec<u8> {
        bytes(&A(vec![
            cmd(
                "get",
                2,
                &["readonly", "fast"],
                vec![spec(&["RO", "access"], index(1), range(0, 1, 0))],
            ),
            cmd(
                "mset",
                -3,
                &["write", "denyoom"],
                vec![spec(&["OW", "update"], index(1), range(-1, 2, 0))],
            ),
            cmd(
                "zunionstore",
                -4,
                &["write", "movablekeys"],
                vec![
                    spec(&["OW", "update"], index(1), range(0, 1, 0)),
                    spec(&["RO", "access"], index(2), keynum(0, 1, 1)),
                ],
            ),
            cmd(
                "eval",
                -3,
                &["noscript", "no_mandatory_keys", "movablekeys"],
                vec![spec(&["RW", "access", "update"], index(2), keynum(0, 1, 1))],
            ),
            cmd(
                "xread",
                -4,
                &["readonly", "blocking", "movablekeys"],
                vec![spec(
                    &["RO", "access"],
                    keyword("STREAMS", 1),
                    range(-1, 1, 2),
                )],
            ),
            cmd(
                "migrate",
                -6,
                &["write", "movablekeys"],
                vec![
                    spec(&["RW", "delete"], index(3), range(0, 1, 0)),
                    spec(
                        &["RW", "delete", "incomplete"],
                        keyword("KEYS", -2),
                        range(-1, 1, 0),
                    ),
                ],
            ),
            cmd(
                "sort",
                -2,
                &["write", "movablekeys"],
                vec![
                    spec(&["RO", "access"], index(1), range(0, 1, 0)),
                    spec(&["OW", "update"], unknown(), unknown()),
                ],
            ),
            cmd(
                "spublish",
                3,
                &["pubsub"],
                vec![spec(&["not_key"], index(1), range(0, 1, 0))],
            ),
            cmd(
                "georadius",
                -6,
                &["write", "movablekeys"],
                vec![
                    spec(&["RO", "access"], index(1), range(0, 1, 0)),
                    spec(&["OW", "update"], keyword("STORE", 6), range(0, 1, 0)),
                ],
            ),
            cmd(
                "pfcount",
                -2,
                &["readonly"],
                vec![spec(&["RW", "access"], index(1), range(-1, 1, 0))],
            ),
            cmd_with(
                "randomkey",
                1,
                &["readonly"],
                &["nondeterministic_output"],
                vec![],
                vec![],
            ),
            cmd_with(
                "config",
                -2,
                &[],
                &[],
                vec![],
                vec![cmd("config|get", -3, &["admin"], vec![])],
            ),
            cmd_with(
                "object",
                -2,
                &[],
                &[],
                vec![],
                vec![cmd(
                    "object|encoding",
                    3,
                    &["readonly"],
                    vec![spec(&["RO"], index(2), range(0, 1, 0))],
                )],
            ),
            // A Redis 6 entry: no tips, key specs or subcommands.
            A(vec![
                B("rename6"),
                I(3),
                strs(&["write"]),
                I(1),
                I(2),
                I(1),
                strs(&["@write"]),
            ]),
        ]))
    }

    fn table() -> CommandTable {
        CommandTable::from_command_reply(&reply()).unwrap()
    }

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    /// The key names `keys` finds, or `None` for `Unknown`.
    fn key_names(table: &CommandTable, words: &[&str]) -> Option<Vec<String>> {
        let args = args(words);
        let keys = table.keys(&args);
        keys.known().map(|keys| {
            keys.iter()
                .map(|k| {
                    assert_eq!(&args[k.index][..], k.key);
                    String::from_utf8(k.key.to_vec()).unwrap()
                })
                .collect()
        })
    }

    fn known(words: &[&str]) -> Vec<String> {
        key_names(&table(), words).unwrap_or_else(|| panic!("{words:?} is Unknown"))
    }

    #[test]
    fn parses_entries_and_looks_up_case_insensitively() {
        let t = table();
        assert_eq!(t.len(), 14);
        let get = t.get(b"GeT").unwrap();
        assert_eq!(get.name, "get");
        assert_eq!(get.arity, 2);
        assert!(get.flags.readonly && get.flags.fast && !get.flags.write);
        assert_eq!(get.acl_categories, vec!["@slow".to_string()]);
        assert!(get.is_read_only() && !get.is_write() && get.is_deterministic());
        assert!(t.get(b"nosuch").is_none());
        assert!(t.get(&[b'g'; 1000]).is_none());
        assert!(t.get(b"").is_none());
        let rk = t.get(b"RANDOMKEY").unwrap();
        assert!(rk.tips.nondeterministic_output && !rk.is_deterministic());
    }

    #[test]
    fn write_means_flag_or_writing_key_spec() {
        let t = table();
        assert!(t.get(b"mset").unwrap().is_write());
        // No write flag, but the keys are RW.
        assert!(t.get(b"eval").unwrap().is_write());
        // readonly, but it rewrites the HLL's cached cardinality.
        let pfcount = t.get(b"pfcount").unwrap();
        assert!(pfcount.is_write() && !pfcount.is_read_only());
        // not_key specs don't make a command a writer.
        assert!(!t.get(b"spublish").unwrap().is_write());
    }

    #[test]
    fn resolves_subcommands() {
        let t = table();
        let get = t.resolve(&args(&["CONFIG", "get", "maxmemory"])).unwrap();
        assert_eq!(get.name, "config|get");
        assert!(get.flags.admin);
        assert_eq!(t.resolve(&args(&["config"])).unwrap().name, "config");
        assert!(t.resolve(&args(&["config", "nosuch"])).is_none());
        assert!(t.resolve(&args(&[])).is_none());
        // Commands without subcommands ignore args[1].
        assert_eq!(t.resolve(&args(&["get", "k"])).unwrap().name, "get");
        assert_eq!(known(&["OBJECT", "ENCODING", "k"]), ["k"]);
    }

    #[test]
    fn keys_from_index_and_range() {
        assert_eq!(known(&["GET", "k"]), ["k"]);
        assert_eq!(known(&["MSET", "a", "1", "b", "2"]), ["a", "b"]);
        // Odd MSET: the range still stops inside the arguments.
        assert_eq!(known(&["MSET", "a", "1", "b"]), ["a", "b"]);
        let t = table();
        let args = args(&["MSET", "a", "1"]);
        let Keys::Known(keys) = t.keys(&args) else {
            panic!()
        };
        assert_eq!(keys[0].index, 1);
        assert!(keys[0].write && !keys[0].read && keys[0].flags.ow);
    }

    #[test]
    fn keys_from_keynum() {
        assert_eq!(known(&["ZUNIONSTORE", "d", "2", "a", "b"]), ["d", "a", "b"]);
        assert_eq!(
            known(&["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"]),
            ["d", "a", "b"]
        );
        assert_eq!(known(&["EVAL", "s", "0"]), Vec::<String>::new());
        assert_eq!(known(&["EVAL", "s", "2", "a", "b", "x"]), ["a", "b"]);
        let t = table();
        for bad in [
            &["EVAL", "s", "3", "a", "b"][..],
            &["EVAL", "s", "-1", "a"],
            &["EVAL", "s", "x", "a"],
            &["EVAL", "s", "01", "a"],
            &["EVAL", "s", "999999999", "a"],
            &["EVAL", "s", "9223372036854775807", "a"],
            &["EVAL", "s", "99999999999999999999999", "a"],
        ] {
            assert_eq!(key_names(&t, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_from_keyword() {
        assert_eq!(known(&["XREAD", "STREAMS", "a", "0"]), ["a"]);
        assert_eq!(
            known(&["XREAD", "COUNT", "1", "streams", "a", "b", "0", "0"]),
            ["a", "b"]
        );
        // Keyword missing: the spec finds nothing.
        assert_eq!(known(&["XREAD", "COUNT", "1", "x"]), Vec::<String>::new());
        // The keyword as the last argument is not searched (no key follows).
        assert_eq!(
            known(&["GEORADIUS", "k", "0", "0", "1", "km", "STORE"]),
            ["k"]
        );
        assert_eq!(
            known(&["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"]),
            ["k", "d"]
        );
        // The search starts at `startfrom`: a STORE before it is a value.
        assert_eq!(
            known(&["GEORADIUS", "k", "STORE", "0", "1", "km", "ASC"]),
            ["k"]
        );
    }

    #[test]
    fn unknown_when_specs_cannot_say() {
        let t = table();
        assert_eq!(key_names(&t, &["SORT", "k"]), None);
        assert_eq!(key_names(&t, &["SORT", "k", "STORE", "d"]), None);
        assert_eq!(key_names(&t, &["MIGRATE", "h", "1", "k", "0", "10"]), None);
        assert_eq!(key_names(&t, &["NOSUCH", "k"]), None);
        assert_eq!(key_names(&t, &["CONFIG", "NOSUCH"]), None);
    }

    #[test]
    fn wrong_arity_touches_nothing_and_not_key_is_skipped() {
        assert_eq!(known(&["GET"]), Vec::<String>::new());
        assert_eq!(known(&["GET", "a", "b"]), Vec::<String>::new());
        assert_eq!(known(&["ZUNIONSTORE", "d", "1"]), Vec::<String>::new());
        assert_eq!(known(&["SPUBLISH", "ch", "msg"]), Vec::<String>::new());
        assert_eq!(known(&["CONFIG"]), Vec::<String>::new());
    }

    #[test]
    fn legacy_range_for_servers_without_key_specs() {
        assert_eq!(known(&["RENAME6", "a", "b"]), ["a", "b"]);
        let t = table();
        let args = args(&["rename6", "a", "b"]);
        let keys = t.keys(&args);
        assert!(keys.known().unwrap().iter().all(|k| k.write));
    }

    #[test]
    fn reply_errors() {
        let ok = reply();
        assert_eq!(
            CommandTable::from_command_reply(&ok[..ok.len() - 1]).unwrap_err(),
            TableError::Incomplete
        );
        let mut trailing = ok.clone();
        trailing.extend_from_slice(b"+OK\r\n");
        assert_eq!(
            CommandTable::from_command_reply(&trailing).unwrap_err(),
            TableError::TrailingBytes(5)
        );
        assert_eq!(
            CommandTable::from_command_reply(b"-NOPERM no\r\n").unwrap_err(),
            TableError::Upstream("NOPERM no".into())
        );
        assert!(matches!(
            CommandTable::from_command_reply(b":1\r\n").unwrap_err(),
            TableError::Malformed { .. }
        ));
        // Deep nesting is refused by the framer before the recursive decoder
        // ever sees it.
        let deep = b"*1\r\n".repeat(100_000);
        assert!(matches!(
            CommandTable::from_command_reply(&deep).unwrap_err(),
            TableError::Frame(FrameError::DepthExceeded(_))
        ));
        // RESP3 sets are not RESP2.
        let resp3 = b"*1\r\n*6\r\n$3\r\nget\r\n:2\r\n~1\r\n+readonly\r\n:1\r\n:1\r\n:1\r\n";
        assert!(matches!(
            CommandTable::from_command_reply(resp3).unwrap_err(),
            TableError::Decode(_)
        ));
        let dup = bytes(&A(vec![
            cmd("get", 2, &[], vec![]),
            cmd("GET", 2, &[], vec![]),
        ]));
        assert!(matches!(
            CommandTable::from_command_reply(&dup).unwrap_err(),
            TableError::Duplicate(_)
        ));
        let short = bytes(&A(vec![A(vec![B("get"), I(2), strs(&[])])]));
        assert_eq!(
            CommandTable::from_command_reply(&short).unwrap_err(),
            TableError::Malformed {
                entry: "get".into(),
                what: "no first key"
            }
        );
        let bad_flags = bytes(&A(vec![A(vec![
            B("get"),
            I(2),
            A(vec![I(1)]),
            I(1),
            I(1),
            I(1),
        ])]));
        assert!(matches!(
            CommandTable::from_command_reply(&bad_flags).unwrap_err(),
            TableError::Malformed { .. }
        ));
        let empty = CommandTable::from_command_reply(b"*0\r\n").unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn odd_specs_become_unknown_not_errors() {
        // A future begin_search type, and a range missing its parameters.
        let odd = bytes(&A(vec![cmd(
            "future",
            -2,
            &["write"],
            vec![spec(
                &["RW", "shiny_new_flag"],
                A(vec![B("type"), B("teleport"), B("spec"), A(vec![])]),
                A(vec![B("type"), B("range"), B("spec"), A(vec![])]),
            )],
        )]));
        let t = CommandTable::from_command_reply(&odd).unwrap();
        let future = t.get(b"future").unwrap();
        assert_eq!(future.key_specs[0].begin_search, BeginSearch::Unknown);
        assert_eq!(future.key_specs[0].find_keys, FindKeys::Unknown);
        assert!(!future.key_specs[0].is_complete());
        assert_eq!(key_names(&t, &["future", "k"]), None);
    }

    /// Commands with hostile key specs: steps that never advance, indexes at
    /// the ends of i64, limits that divide by zero or go negative.
    fn hostile_command(begin: BeginSearch, find: FindKeys) -> Command {
        Command {
            name: "hostile".into(),
            arity: -1,
            flags: Flags::default(),
            first_key: 0,
            last_key: 0,
            step: 0,
            acl_categories: Vec::new(),
            tips: Tips::default(),
            key_specs: vec![KeySpec {
                notes: None,
                flags: KeyFlags {
                    rw: true,
                    ..KeyFlags::default()
                },
                begin_search: begin,
                find_keys: find,
            }],
            subcommands: Vec::new(),
        }
    }

    fn any_begin() -> impl Strategy<Value = BeginSearch> {
        prop_oneof![
            edge().prop_map(BeginSearch::Index),
            edge().prop_map(|startfrom| BeginSearch::Keyword {
                keyword: "K".into(),
                startfrom
            }),
            Just(BeginSearch::Unknown),
        ]
    }

    /// Small numbers, and the ends of i64.
    fn edge() -> impl Strategy<Value = i64> + Clone {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(-1i64),
            Just(0i64),
            -10i64..10
        ]
    }

    fn any_find() -> impl Strategy<Value = FindKeys> {
        prop_oneof![
            (edge(), edge(), edge()).prop_map(|(lastkey, step, limit)| FindKeys::Range {
                lastkey,
                step,
                limit
            }),
            (edge(), edge(), edge()).prop_map(|(keynumidx, firstkey, step)| {
                FindKeys::Keynum {
                    keynumidx,
                    firstkey,
                    step,
                }
            }),
            Just(FindKeys::Unknown),
        ]
    }

    fn any_args() -> impl Strategy<Value = Vec<Bytes>> {
        let word = prop_oneof![
            Just("K"),
            Just("k"),
            Just("0"),
            Just("1"),
            Just("3"),
            Just("-1"),
            Just("999999999"),
            Just("9223372036854775807"),
            Just("STREAMS"),
            Just("STORE"),
            Just("x"),
        ];
        proptest::collection::vec(word, 0..10).prop_map(|words| {
            words
                .into_iter()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect()
        })
    }

    proptest! {
        /// Whatever the specs and arguments: no panic, every key is the
        /// argument at its index, and there are never more keys than
        /// arguments.
        #[test]
        fn hostile_specs_and_args_stay_in_bounds(
            begin in any_begin(),
            find in any_find(),
            args in any_args(),
        ) {
            let command = hostile_command(begin, find);
            if let Keys::Known(keys) = command.keys(&args) {
                prop_assert!(keys.len() <= args.len());
                for k in keys {
                    prop_assert!(k.index >= 1);
                    prop_assert_eq!(&args[k.index][..], k.key);
                }
            }
        }

        /// The same against the real-shaped table, with any command name.
        #[test]
        fn any_request_against_the_table_stays_in_bounds(
            name in prop_oneof![
                Just("get"), Just("MSET"), Just("zunionstore"), Just("eval"),
                Just("xread"), Just("georadius"), Just("config"), Just("object"),
                Just("rename6"), Just("sort"),
            ],
            rest in any_args(),
        ) {
            let t = table();
            let mut args = vec![Bytes::from_static(name.as_bytes())];
            args.extend(rest);
            if let Keys::Known(keys) = t.keys(&args) {
                for k in keys {
                    prop_assert_eq!(&args[k.index][..], k.key);
                }
            }
        }
    }
}
