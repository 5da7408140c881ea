//! Realistic JSON documents for the compression benches
//! (`benches/compression.rs`, `benches/compress_codec.rs`), generated from a
//! fixed seed so every run compresses exactly the same bytes.
//!
//! Two kinds, alternating by index, each a page of records with the field
//! names repeated in every record, as an API response or a cached listing
//! is:
//!
//! - **user pages**: `{"kind":"user_page","page":…,"items":[user, …]}`,
//!   each user with `id` (a UUID), `name`, `email`, `created_at`,
//!   `last_login_at`, `tags`, `settings{theme, locale, timezone,
//!   notifications{…}, beta_features}`, an optional `bio` and a few
//!   `projects[{id, name, role, stars, updated_at}]`;
//! - **project pages**: projects with `description`, an `owner`, `stats{…}`,
//!   `members[…]`, `labels[{name, color}]` and an `activity[…]` log.
//!
//! UUIDs, ids, counters, colours and milliseconds are uniformly random;
//! names, words, tags and settings come from small vocabularies. In the
//! [`Profile::Typical`] profile (the one the benches store) their popularity
//! is skewed, most users keep default settings and timestamps cluster
//! before the page's own time; [`Profile::HighEntropy`] makes every choice
//! uniform, as a pessimistic reference. Either way: the compressibility of
//! real JSON, not of filler. Sizes are log-uniform between 4 KB and 64 KB
//! (median about 16 KB), cut at record boundaries, so every document is
//! valid JSON.
//!
//! Included with `#[path]` by each bench; not every bench uses every item.
#![allow(dead_code)]

/// Smallest and largest document, bytes.
pub const MIN_DOC: usize = 4 * 1024;
pub const MAX_DOC: usize = 64 * 1024;

/// The seed of [`corpus`].
pub const SEED: u64 = 0x7133_5eed_c0de_2026;

/// SplitMix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    pub fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Ines", "Jonas", "Kira",
    "Lukas", "Maria", "Noah", "Olivia", "Paul", "Quinn", "Rosa", "Samuel", "Tara", "Umar", "Vera",
    "William", "Xenia", "Yusuf", "Zoe", "Aiko", "Bruno", "Chen", "Dmitri", "Emma", "Farah",
];
const LAST: &[&str] = &[
    "Schmidt",
    "Smith",
    "Garcia",
    "Müller",
    "Nguyen",
    "Kowalski",
    "Rossi",
    "Johansson",
    "Silva",
    "Tanaka",
    "Okafor",
    "Dubois",
    "Novak",
    "Hansen",
    "Fischer",
    "Lopez",
    "Kim",
    "Patel",
    "Martin",
    "Weber",
    "Ivanova",
    "Costa",
    "Yilmaz",
    "Brown",
    "Wagner",
    "Moreau",
    "Sato",
    "Jensen",
];
const DOMAINS: &[&str] = &[
    "example.com",
    "acme.io",
    "mail.example.org",
    "corp.example.net",
    "labs.example.dev",
];
const TAGS: &[&str] = &[
    "admin",
    "beta",
    "billing",
    "design",
    "enterprise",
    "free",
    "mobile",
    "ml",
    "ops",
    "pro",
    "research",
    "sales",
    "security",
    "support",
    "trial",
    "vip",
    "annotator",
    "reviewer",
    "imaging",
    "radiology",
    "pathology",
    "segmentation",
    "qa",
    "export",
    "api",
    "sso",
    "europe",
    "us-east",
    "apac",
    "legacy",
];
const WORDS: &[&str] = &[
    "image",
    "dataset",
    "label",
    "review",
    "model",
    "training",
    "batch",
    "export",
    "import",
    "quality",
    "annotation",
    "mask",
    "polygon",
    "bounding",
    "box",
    "class",
    "version",
    "pipeline",
    "upload",
    "slide",
    "scan",
    "region",
    "cell",
    "tumor",
    "organ",
    "study",
    "patient",
    "anonymized",
    "validated",
    "pending",
    "approved",
    "rejected",
    "the",
    "a",
    "of",
    "for",
    "with",
    "and",
    "to",
    "in",
    "new",
    "final",
    "draft",
    "shared",
    "team",
    "weekly",
];
const THEMES: &[&str] = &["light", "dark", "system", "high-contrast"];
const LOCALES: &[&str] = &[
    "en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "ja-JP", "pt-BR", "it-IT",
];
const ZONES: &[&str] = &[
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Tokyo",
    "Asia/Singapore",
    "Australia/Sydney",
    "UTC",
];
const DIGESTS: &[&str] = &["daily", "weekly", "never"];
const ROLES: &[&str] = &["owner", "admin", "editor", "annotator", "viewer"];
const FEATURES: &[&str] = &[
    "new-editor",
    "smart-polygon",
    "auto-label",
    "bulk-export",
    "dark-launch",
    "3d-viewer",
];
const VISIBILITY: &[&str] = &["private", "internal", "public"];
const ACTIONS: &[&str] = &[
    "annotated",
    "reviewed",
    "approved",
    "rejected",
    "uploaded",
    "exported",
    "commented",
    "assigned",
];

/// Which kind of values fill the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// As production data tends to be: names, tags and settings follow a
    /// skewed popularity (a few values are most of them), two users in
    /// three keep the default settings, and timestamps cluster: a page's
    /// records were created over a few years before its `generated_at`
    /// and logged in or updated within the month before it. UUIDs, ids,
    /// counters and milliseconds are still uniformly random.
    Typical,
    /// Every pick uniform, settings always random, timestamps uniform over
    /// eight years: a pessimistic bound on compressibility, for reference.
    HighEntropy,
}

/// The generator's state: the RNG, the profile and the current page's
/// `generated_at` (Unix seconds), which its records' timestamps lead up to.
pub struct Gen {
    pub rng: Rng,
    profile: Profile,
    now: u64,
}

/// 2024-01-01T00:00:00Z and 2026-12-31, and the high-entropy profile's
/// 2019-01-01.
const EPOCH_2019: u64 = 1_546_300_800;
const EPOCH_2024: u64 = 1_704_067_200;
const EPOCH_2027: u64 = 1_798_761_600;
const DAY: u64 = 86_400;

impl Gen {
    pub fn new(seed: u64, profile: Profile) -> Gen {
        Gen {
            rng: Rng::new(seed),
            profile,
            now: EPOCH_2024,
        }
    }

    fn typical(&self) -> bool {
        self.profile == Profile::Typical
    }

    /// One of `from`: uniform, or in the typical profile skewed so that the
    /// first entries are the most common (index = n·u³).
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        if !self.typical() {
            return self.rng.pick(from);
        }
        let u = self.rng.unit();
        from[((u * u * u) * from.len() as f64) as usize]
    }

    fn bool(&mut self, p: f64) -> &'static str {
        if self.rng.chance(p) {
            "true"
        } else {
            "false"
        }
    }

    fn uuid(&mut self, out: &mut String) {
        let (a, b) = (self.rng.next_u64(), self.rng.next_u64());
        out.push_str(&format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        ));
    }

    /// A timestamp up to `within` seconds before the page's time (typical),
    /// or anywhere in 2019–2026 (high entropy), with random milliseconds.
    fn timestamp(&mut self, out: &mut String, within: u64) {
        let secs = if self.typical() {
            self.now - self.rng.below(within.min(self.now - EPOCH_2019))
        } else {
            self.rng.range(EPOCH_2019, EPOCH_2027 - 1)
        };
        let ms = self.rng.below(1000);
        iso8601(out, secs, ms);
    }

    fn words(&mut self, out: &mut String, lo: u64, hi: u64) {
        for i in 0..self.rng.range(lo, hi) {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(self.pick(WORDS));
        }
    }

    fn string_list(&mut self, out: &mut String, from: &[&str], lo: u64, hi: u64) {
        out.push('[');
        for i in 0..self.rng.range(lo, hi) {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(self.pick(from));
            out.push('"');
        }
        out.push(']');
    }

    /// `{"user_id":…,"name":…,"email":…}`: a user as other records cite one.
    fn user_summary(&mut self, out: &mut String) {
        let (first, last) = (self.pick(FIRST), self.pick(LAST));
        out.push_str(&format!(
            "{{\"user_id\":{},\"name\":\"{first} {last}\",\"email\":\"{}.{}{}@{}\"}}",
            self.rng.range(1000, 9_999_999),
            first.to_lowercase(),
            last.to_lowercase(),
            self.rng.below(100),
            self.pick(DOMAINS)
        ));
    }

    fn user(&mut self, out: &mut String) {
        let (first, last) = (self.pick(FIRST), self.pick(LAST));
        out.push_str("{\"id\":\"");
        self.uuid(out);
        out.push_str(&format!(
            "\",\"user_id\":{},\"name\":\"{first} {last}\",\"email\":\"{}.{}{}@{}\",\"created_at\":\"",
            self.rng.range(1000, 9_999_999),
            first.to_lowercase(),
            last.to_lowercase(),
            self.rng.below(100),
            self.pick(DOMAINS)
        ));
        self.timestamp(out, 3 * 365 * DAY);
        out.push_str("\",\"last_login_at\":\"");
        self.timestamp(out, 30 * DAY);
        // The links and flags a REST API's user object carries.
        let handle = format!("{}{}", first.to_lowercase(), self.rng.below(1000));
        let (read, write, admin) = (self.bool(0.98), self.bool(0.6), self.bool(0.05));
        out.push_str(&format!(
            "\",\"url\":\"https://api.example.com/v1/users/{handle}\",\
             \"avatar_url\":\"https://cdn.example.com/avatars/{handle}.png?s=128\",\
             \"permissions\":{{\"read\":{read},\"write\":{write},\"admin\":{admin}}}"
        ));
        let (active, verified) = (self.bool(0.85), self.bool(0.7));
        out.push_str(&format!(
            ",\"active\":{active},\"email_verified\":{verified},\"tags\":"
        ));
        self.string_list(out, TAGS, 0, 5);
        if self.typical() && self.rng.chance(2.0 / 3.0) {
            out.push_str(
                ",\"settings\":{\"theme\":\"system\",\"locale\":\"en-US\",\"timezone\":\"UTC\",\
                 \"notifications\":{\"email\":true,\"push\":false,\"digest\":\"weekly\"},\
                 \"beta_features\":[]}",
            );
        } else {
            let (theme, locale, zone) = (self.pick(THEMES), self.pick(LOCALES), self.pick(ZONES));
            let (email, push, digest) = (self.bool(0.8), self.bool(0.4), self.pick(DIGESTS));
            out.push_str(&format!(
                ",\"settings\":{{\"theme\":\"{theme}\",\"locale\":\"{locale}\",\"timezone\":\"{zone}\",\
                 \"notifications\":{{\"email\":{email},\"push\":{push},\"digest\":\"{digest}\"}},\
                 \"beta_features\":"
            ));
            self.string_list(out, FEATURES, 0, 3);
            out.push('}');
        }
        if self.rng.chance(0.5) {
            out.push_str(",\"bio\":\"");
            self.words(out, 6, 24);
            out.push('"');
        }
        out.push_str(",\"projects\":[");
        for i in 0..self.rng.range(0, 4) {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"id\":\"");
            self.uuid(out);
            let (a, b, role) = (self.pick(WORDS), self.pick(WORDS), self.pick(ROLES));
            out.push_str(&format!(
                "\",\"name\":\"{a}-{b}\",\"role\":\"{role}\",\"stars\":{},\"updated_at\":\"",
                self.rng.below(500)
            ));
            self.timestamp(out, 30 * DAY);
            out.push_str("\"}");
        }
        out.push_str("]}");
    }

    fn project(&mut self, out: &mut String) {
        out.push_str("{\"id\":\"");
        self.uuid(out);
        let (a, b) = (self.pick(WORDS), self.pick(WORDS));
        out.push_str(&format!(
            "\",\"project_id\":{},\"name\":\"{a} {b} {}\",\"description\":\"",
            self.rng.range(1, 999_999),
            self.rng.range(1, 99)
        ));
        self.words(out, 8, 30);
        out.push_str("\",\"owner\":");
        self.user_summary(out);
        out.push_str(",\"created_at\":\"");
        self.timestamp(out, 3 * 365 * DAY);
        out.push_str("\",\"updated_at\":\"");
        self.timestamp(out, 30 * DAY);
        let (visibility, archived) = (self.pick(VISIBILITY), self.bool(0.1));
        out.push_str(&format!(
            "\",\"visibility\":\"{visibility}\",\"archived\":{archived},\"stats\":{{\"images\":{},\
             \"annotations\":{},\"segmentations\":{},\"reviews_open\":{},\"storage_bytes\":{}}},\
             \"members\":[",
            self.rng.below(100_000),
            self.rng.below(1_000_000),
            self.rng.below(50_000),
            self.rng.below(300),
            self.rng.below(1 << 40)
        ));
        for i in 0..self.rng.range(1, 6) {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"role\":\"");
            out.push_str(self.pick(ROLES));
            out.push_str("\",\"user\":");
            self.user_summary(out);
            out.push('}');
        }
        out.push_str("],\"labels\":[");
        for i in 0..self.rng.range(1, 6) {
            if i > 0 {
                out.push(',');
            }
            let name = self.pick(TAGS);
            out.push_str(&format!(
                "{{\"name\":\"{name}\",\"color\":\"#{:06x}\"}}",
                self.rng.below(1 << 24)
            ));
        }
        out.push_str("],\"activity\":[");
        for i in 0..self.rng.range(2, 8) {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"at\":\"");
            self.timestamp(out, 30 * DAY);
            let action = self.pick(ACTIONS);
            out.push_str(&format!(
                "\",\"actor\":{},\"action\":\"{action}\",\"target\":\"image:{}\"}}",
                self.rng.range(1000, 9_999_999),
                self.rng.below(10_000_000)
            ));
        }
        out.push_str("]}");
    }

    /// Document `index` of about `target` bytes (at least [`MIN_DOC`], at
    /// most [`MAX_DOC`]): a user page for even indexes, a project page for
    /// odd ones, filled with whole records.
    pub fn document(&mut self, index: usize, target: usize) -> Vec<u8> {
        let target = target.clamp(MIN_DOC, MAX_DOC);
        let users = index % 2 == 0;
        self.now = self.rng.range(EPOCH_2024, EPOCH_2027 - 1);
        let mut out = String::with_capacity(target + 4096);
        out.push_str(&format!(
            "{{\"kind\":\"{}\",\"page\":{index},\"generated_at\":\"",
            if users { "user_page" } else { "project_page" }
        ));
        let ms = self.rng.below(1000);
        iso8601(&mut out, self.now, ms);
        out.push_str("\",\"items\":[");
        let mut record = String::with_capacity(4096);
        let mut first = true;
        loop {
            record.clear();
            if users {
                self.user(&mut record);
            } else {
                self.project(&mut record);
            }
            // Room for the comma and the closing "]}".
            let next = out.len() + record.len() + 3;
            if out.len() >= target || (next > MAX_DOC && out.len() >= MIN_DOC) {
                break;
            }
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&record);
        }
        out.push_str("]}");
        out.into_bytes()
    }
}

/// `secs` (Unix time) and `ms` as `2025-03-01T12:34:56.789Z`.
fn iso8601(out: &mut String, secs: u64, ms: u64) {
    // Howard Hinnant's days-to-civil.
    let days = (secs / DAY) as i64;
    let rem = secs % DAY;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    out.push_str(&format!(
        "{y}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    ));
}

/// A log-uniform size between [`MIN_DOC`] and [`MAX_DOC`].
pub fn size(rng: &mut Rng) -> usize {
    let (lo, hi) = ((MIN_DOC as f64).ln(), (MAX_DOC as f64).ln());
    (lo + (hi - lo) * rng.unit()).exp() as usize
}

/// `n` documents of log-uniform sizes, from [`SEED`].
pub fn corpus(n: usize, profile: Profile) -> Vec<Vec<u8>> {
    let mut gen = Gen::new(SEED, profile);
    (0..n)
        .map(|i| {
            let target = size(&mut gen.rng);
            gen.document(i, target)
        })
        .collect()
}

/// `n` documents of about `target` bytes each, alternating kinds (for the
/// per-size micro-benchmarks).
pub fn of_size(n: usize, target: usize) -> Vec<Vec<u8>> {
    let mut gen = Gen::new(SEED ^ target as u64, Profile::Typical);
    (0..n).map(|i| gen.document(i, target)).collect()
}

/// A cached document: its store rule (0 plain, 1 compressed), key and
/// `GET` variant.
pub type CachedDoc = (usize, Vec<u8>, tierd::cache::store::Variant);

/// An L1 store holding each document as the reply to `GET`, plain under
/// rule 0 ("plain", keys `plain:{i}`) and in its compressed frame under
/// rule 1 ("doc", keys `doc:{i}`), as tierd keeps them, for an hour from
/// `now`; and each document's rule, key and variant, in fill order.
pub fn doc_store(
    plain: &[Vec<u8>],
    framed: &[Vec<u8>],
    max_value: u64,
    now: std::time::Instant,
) -> (tierd::cache::store::Store, Vec<CachedDoc>) {
    use bytes::{Bytes, BytesMut};
    use tierd::cache::store::{RuleCap, Store, StoreConfig, Variant};
    let store = Store::new(StoreConfig {
        max_memory: 1 << 30,
        max_value_size: max_value,
        rules: ["plain", "doc"]
            .into_iter()
            .map(|name| RuleCap {
                name: name.into(),
                max_memory: None,
            })
            .collect(),
    })
    .expect("store");
    let expires = now + std::time::Duration::from_secs(3600);
    let mut keys = Vec::new();
    for (i, (p, f)) in plain.iter().zip(framed).enumerate() {
        for (rule, value) in [(0usize, p), (1, f)] {
            let key = format!("{}:{i}", ["plain", "doc"][rule]).into_bytes();
            let variant = Variant::from_args(
                0,
                tierd::protocol::Proto::Resp2,
                &[Bytes::from_static(b"GET"), Bytes::copy_from_slice(&key)],
            );
            let mut bulk = BytesMut::new();
            tierd::protocol::reply::bulk(&mut bulk, value);
            let token = store.begin_fill(&key).expect("fill token");
            assert!(store.finish_fill(token, rule, variant.clone(), bulk.freeze(), expires));
            keys.push((rule, key, variant));
        }
    }
    (store, keys)
}
