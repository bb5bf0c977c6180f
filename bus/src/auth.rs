//! NATS authorization: one identity per service role, each allowed only the subjects its service
//! uses, rendered as a nats-server config section (`chatctl nats-config`, testkit).
//!
//! The services live in account [`CHAT_ACCOUNT`]; the load generator's `baseline` scenario (which
//! creates and deletes scratch streams) gets an account of its own, [`BENCH_ACCOUNT`], so that it
//! can do what it needs without any right over the system's streams. Identities are nkeys: the
//! server config holds only public keys, each service holds its seed in a file
//! (`--nats-nkey-file`).
//!
//! Every service uses its own inbox prefix (`_INBOX.<role>`, see [`Role::inbox_prefix`]) for
//! request replies, JetStream API answers and watch deliveries, so that a role may subscribe to its
//! own replies and to no one else's.
//!
//! The allow-lists below are written from what the code does (see each role); SECURITY.md sums them
//! up. A change of the code that needs a new subject must add it here, and the system tests with
//! authorization (`e2e/tests/system/nats_auth.rs`) are what finds a missing one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use protocol::subjects;

use crate::streams::{self, kv_stream};

/// The account of the services.
pub const CHAT_ACCOUNT: &str = "CHAT";
/// The account of the load generator's backbone benchmark, isolated from [`CHAT_ACCOUNT`].
pub const BENCH_ACCOUNT: &str = "BENCH";
/// The file `chatctl nats-config` writes the accounts section to.
pub const CONFIG_FILE: &str = "auth.conf";

/// Who connects to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// WebSocket gateways.
    Gateway,
    /// The storage service: owns the streams and buckets, purges inboxes, aggregates group
    /// receipts, emits push events.
    Storage,
    /// The router: group membership service and group fan-out.
    Router,
    /// Operators: `chatctl revoke` / `unrevoke`, and read-only JetStream inspection.
    Admin,
    /// A push-notification provider adapter: reads `push.>` and nothing else.
    Push,
    /// `loadgen baseline`: anything, but only in its own account.
    Bench,
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Gateway, Role::Storage, Role::Router, Role::Admin, Role::Push, Role::Bench];

    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Storage => "storage",
            Role::Router => "router",
            Role::Admin => "admin",
            Role::Push => "push",
            Role::Bench => "bench",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    fn description(self) -> &'static str {
        match self {
            Role::Gateway => "WebSocket gateways",
            Role::Storage => "storage: provisioning, inbox purges, history, group receipts, push events",
            Role::Router => "router: membership service (svc.groups) and the GROUPS fan-out",
            Role::Admin => "operators: chatctl revoke/unrevoke, read-only JetStream inspection",
            Role::Push => "push provider adapters: push.> only",
            Role::Bench => "loadgen baseline: its own account, no access to the chat's subjects",
        }
    }

    /// The prefix of this role's reply subjects (`ConnectOptions::custom_inbox_prefix`).
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX.{}", self.name())
    }

    /// The account this role's identity lives in.
    pub fn account(self) -> &'static str {
        match self {
            Role::Bench => BENCH_ACCOUNT,
            _ => CHAT_ACCOUNT,
        }
    }

    /// The file (in the `chatctl nats-config` directory) holding this role's nkey seed.
    pub fn seed_file(self) -> String {
        format!("{}.nk", self.name())
    }

    /// What this role may publish and subscribe to in its account; `None`: everything (the bench
    /// role, alone in its account).
    pub fn permissions(self) -> Option<Permissions> {
        let inbox = format!("{}.>", self.inbox_prefix());
        let p = match self {
            Role::Gateway => Permissions {
                publish: [
                    // 1:1 sends, delivery receipts, copies for the sender's devices, read marks.
                    vec![subjects::INBOX_SUBJECTS.to_owned()],
                    // Group sends and group delivered/read receipts.
                    vec![subjects::GROUP_SUBJECTS.to_owned(), subjects::RECEIPT_SUBJECTS.to_owned()],
                    // Typing (ephemeral live frames) and presence change announcements.
                    vec![format!("{}.*", subjects::LIVE_PREFIX), "presence.*".to_owned()],
                    // Requests to the router and to storage.
                    vec![subjects::GROUP_SERVICE.to_owned(), subjects::RECEIPT_QUERY_SERVICE.to_owned()],
                    kv_write(&[
                        subjects::CURSORS_BUCKET,
                        subjects::PRESENCE_BUCKET,
                        subjects::GATEWAYS_BUCKET,
                        subjects::SETTINGS_BUCKET,
                    ]),
                    // Inbox drains, history pages, cursors, group state, settings, presence.
                    direct_get(&[subjects::INBOX_STREAM, subjects::HISTORY_STREAM]),
                    direct_get(&kv_streams(&[
                        subjects::CURSORS_BUCKET,
                        subjects::GROUPS_BUCKET,
                        subjects::SETTINGS_BUCKET,
                        subjects::PRESENCE_BUCKET,
                        subjects::GATEWAYS_BUCKET,
                    ])),
                    // Watches of group state (membership cache) and revocations.
                    watch(&kv_streams(&[subjects::GROUPS_BUCKET, subjects::REVOCATIONS_BUCKET])),
                    stream_info(),
                ]
                .concat(),
                subscribe: vec![format!("{}.*", subjects::LIVE_PREFIX), "presence.*".to_owned(), inbox],
                allow_responses: false,
            },
            Role::Storage => {
                let all = streams::all_stream_names();
                Permissions {
                    publish: [
                        // Provisioning: create or update every stream and bucket, never delete.
                        all.iter()
                            .flat_map(|s| [js(&format!("STREAM.CREATE.{s}")), js(&format!("STREAM.UPDATE.{s}"))])
                            .collect(),
                        stream_info(),
                        // Account info: creating a bucket reads the account's limits first.
                        vec![js("INFO")],
                        // Removal of delivered messages.
                        vec![js(&format!("STREAM.PURGE.{}", subjects::INBOX_STREAM))],
                        // Group receipt ticks to senders, history copies, push events.
                        vec![
                            subjects::INBOX_SUBJECTS.to_owned(),
                            subjects::HISTORY_SUBJECTS.to_owned(),
                            "push.*".to_owned(),
                        ],
                        // Reading inboxes to move delivered items to history.
                        direct_get(&[subjects::INBOX_STREAM]),
                        // The push notifier's durable consumer on INBOX (headers only, no acks).
                        durable(subjects::INBOX_STREAM, subjects::PUSH_NOTIFIER_CONSUMER),
                        // Ordered consumers: RECEIPTS, and the watches of cursors, presence,
                        // gateway beats and settings.
                        watch(&[subjects::RECEIPTS_STREAM]),
                        watch(&kv_streams(&[
                            subjects::CURSORS_BUCKET,
                            subjects::PRESENCE_BUCKET,
                            subjects::GATEWAYS_BUCKET,
                            subjects::SETTINGS_BUCKET,
                        ])),
                    ]
                    .concat(),
                    subscribe: vec![subjects::RECEIPT_QUERY_SERVICE.to_owned(), inbox],
                    // Answers to svc.receipts.
                    allow_responses: true,
                }
            }
            Role::Router => {
                let groups = subjects::GROUPS_STREAM;
                Permissions {
                    publish: [
                        // Fan-out copies, Sent receipt events, membership events.
                        vec![
                            subjects::INBOX_SUBJECTS.to_owned(),
                            subjects::RECEIPT_SUBJECTS.to_owned(),
                            subjects::GROUP_SUBJECTS.to_owned(),
                        ],
                        kv_write(&[subjects::GROUPS_BUCKET, subjects::MEMBERSHIPS_BUCKET]),
                        direct_get(&kv_streams(&[subjects::GROUPS_BUCKET, subjects::MEMBERSHIPS_BUCKET])),
                        // The fan-out's durable pull consumers (one per partition), created,
                        // rebound (deleted and created again), pulled and acked; membership events
                        // looked up by sequence.
                        vec![
                            js(&format!("CONSUMER.CREATE.{groups}.>")),
                            js(&format!("CONSUMER.DELETE.{groups}.*")),
                            js(&format!("CONSUMER.INFO.{groups}.*")),
                            js(&format!("CONSUMER.MSG.NEXT.{groups}.*")),
                            format!("$JS.ACK.{groups}.>"),
                            js(&format!("STREAM.MSG.GET.{groups}")),
                        ],
                        stream_info(),
                    ]
                    .concat(),
                    subscribe: vec![subjects::GROUP_SERVICE.to_owned(), inbox],
                    // Answers to svc.groups.
                    allow_responses: true,
                }
            }
            Role::Admin => Permissions {
                publish: [
                    kv_write(&[subjects::REVOCATIONS_BUCKET]),
                    stream_info(),
                    ["INFO", "STREAM.NAMES", "STREAM.LIST", "CONSUMER.NAMES.*", "CONSUMER.LIST.*", "CONSUMER.INFO.*.*"]
                        .map(js)
                        .into(),
                ]
                .concat(),
                subscribe: vec![inbox],
                allow_responses: false,
            },
            Role::Push => {
                Permissions { publish: Vec::new(), subscribe: vec!["push.>".to_owned()], allow_responses: false }
            }
            Role::Bench => return None,
        };
        Some(p)
    }
}

fn js(api: &str) -> String {
    format!("$JS.API.{api}")
}

fn kv_streams(buckets: &[&str]) -> Vec<String> {
    buckets.iter().map(|b| kv_stream(b)).collect()
}

/// Puts, creates, compare-and-set updates and deletes of keys (all are publishes to `$KV.<b>.<key>`).
fn kv_write(buckets: &[&str]) -> Vec<String> {
    buckets.iter().map(|b| format!("$KV.{b}.>")).collect()
}

/// Direct gets: batched ones (`$JS.API.DIRECT.GET.<stream>`) and last-by-subject ones (KV gets,
/// `$JS.API.DIRECT.GET.<stream>.<subject>`).
fn direct_get<S: AsRef<str>>(streams: &[S]) -> Vec<String> {
    streams
        .iter()
        .flat_map(|s| {
            let s = s.as_ref();
            [js(&format!("DIRECT.GET.{s}")), js(&format!("DIRECT.GET.{s}.>"))]
        })
        .collect()
}

/// Ordered (ephemeral push) consumers, as KV watches use: created unnamed, re-created under a name
/// (with the filter in the subject) after the old one is deleted, with flow-control replies.
fn watch<S: AsRef<str>>(streams: &[S]) -> Vec<String> {
    streams
        .iter()
        .flat_map(|s| {
            let s = s.as_ref();
            [
                js(&format!("CONSUMER.CREATE.{s}")),
                js(&format!("CONSUMER.CREATE.{s}.>")),
                js(&format!("CONSUMER.DELETE.{s}.*")),
                format!("$JS.FC.{s}.>"),
            ]
        })
        .collect()
}

/// One named durable pull consumer: created (or updated), read, and its info.
fn durable(stream: &str, name: &str) -> Vec<String> {
    vec![
        js(&format!("CONSUMER.CREATE.{stream}.{name}")),
        js(&format!("CONSUMER.CREATE.{stream}.{name}.>")),
        js(&format!("CONSUMER.INFO.{stream}.{name}")),
        js(&format!("CONSUMER.MSG.NEXT.{stream}.{name}")),
    ]
}

/// Stream info of every stream of the system: every service waits until all exist.
fn stream_info() -> Vec<String> {
    streams::all_stream_names().iter().map(|s| js(&format!("STREAM.INFO.{s}"))).collect()
}

/// Allow-lists of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (empty: none).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer requests it received (publish once to their reply subject).
    pub allow_responses: bool,
}

impl Permissions {
    /// Whether a publish to `subject` is allowed (not counting replies to requests received).
    pub fn may_publish(&self, subject: &str) -> bool {
        self.publish.iter().any(|p| subject_matches(p, subject))
    }

    /// Whether a subscription to `subject` (which may hold wildcards) is allowed: NATS requires it
    /// to be contained in an allowed one.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        self.subscribe.iter().any(|p| subject_matches(p, subject))
    }
}

/// Whether NATS subject pattern `pattern` (with `*` and `>` wildcards) covers `subject`. A
/// wildcard in `subject` is only covered by the same or a wider wildcard in the pattern.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A role's identity: its nkey seed (the secret) and public key (what the server knows).
pub struct Identity {
    pub role: Role,
    seed: String,
    pub public_key: String,
}

impl Identity {
    /// A new random user nkey.
    pub fn generate(role: Role) -> anyhow::Result<Identity> {
        let kp = nkeys::KeyPair::new_user();
        let seed = kp.seed().map_err(|e| anyhow::anyhow!("encoding an nkey seed: {e}"))?;
        Ok(Identity { role, seed, public_key: kp.public_key() })
    }

    /// The identity whose seed is `seed` (a user nkey seed, `SU…`).
    pub fn from_seed(role: Role, seed: &str) -> anyhow::Result<Identity> {
        let seed = seed.trim();
        let kp = nkeys::KeyPair::from_seed(seed).map_err(|e| anyhow::anyhow!("not an nkey seed: {e}"))?;
        if kp.key_pair_type() != nkeys::KeyPairType::User {
            bail!("not a user nkey seed (it should start with SU)");
        }
        Ok(Identity { role, seed: seed.to_owned(), public_key: kp.public_key() })
    }

    pub fn seed(&self) -> &str {
        &self.seed
    }
}

/// The accounts section of a nats-server config: account [`CHAT_ACCOUNT`] (JetStream enabled)
/// with one user per role and its permissions, and account [`BENCH_ACCOUNT`] for the bench
/// role. `unrestricted` adds users of [`CHAT_ACCOUNT`] without permissions (the test harness's
/// inspector; never for production).
pub fn render(identities: &[Identity], unrestricted: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# NATS authorization of the chat backend, generated by `chatctl nats-config`.");
    let _ = writeln!(out, "# Include it from the server config; run the generator again (it keeps the keys");
    let _ = writeln!(out, "# it finds beside this file) after an upgrade rather than editing it.");
    out.push_str("accounts {\n");
    for account in [CHAT_ACCOUNT, BENCH_ACCOUNT] {
        let _ = writeln!(out, "  {account} {{\n    jetstream: enabled\n    users: [");
        for id in identities.iter().filter(|i| i.role.account() == account) {
            let _ = writeln!(out, "      # {}: {}", id.role.name(), id.role.description());
            let _ = write!(out, "      {{\n        nkey: {}\n", quote(&id.public_key));
            if let Some(p) = id.role.permissions() {
                render_permissions(&mut out, &p);
            }
            out.push_str("      },\n");
        }
        if account == CHAT_ACCOUNT {
            for key in unrestricted {
                let _ = writeln!(out, "      # unrestricted (test harness)\n      {{ nkey: {} }},", quote(key));
            }
        }
        out.push_str("    ]\n  }\n");
    }
    out.push_str("}\n");
    out
}

fn render_permissions(out: &mut String, p: &Permissions) {
    let list = |items: &[String]| {
        let mut s = String::from("[\n");
        for i in items {
            let _ = writeln!(s, "              {},", quote(i));
        }
        s.push_str("            ]");
        s
    };
    out.push_str("        permissions: {\n");
    if p.publish.is_empty() {
        out.push_str("          publish: { deny: [\">\"] }\n");
    } else {
        let _ = writeln!(out, "          publish: {{\n            allow: {}\n          }}", list(&p.publish));
    }
    let _ = writeln!(out, "          subscribe: {{\n            allow: {}\n          }}", list(&p.subscribe));
    if p.allow_responses {
        out.push_str("          allow_responses: true\n");
    }
    out.push_str("        }\n");
}

/// A double-quoted config string (subjects start with `$`, which unquoted would be a variable).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// What [`write_dir`] wrote.
pub struct Generated {
    /// The accounts section, to include from the server config.
    pub config: PathBuf,
    /// Each role's seed file.
    pub seeds: Vec<(Role, PathBuf)>,
    /// Roles whose seed was newly generated (the others were kept).
    pub new_keys: Vec<Role>,
}

/// Writes `dir/<role>.nk` (mode 0600) for every role that has no seed there yet, keeping the
/// existing ones, and `dir/auth.conf` with the current permissions (see [`render`]).
pub fn write_dir(dir: &Path, unrestricted: &[String]) -> anyhow::Result<Generated> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut identities = Vec::new();
    let mut seeds = Vec::new();
    let mut new_keys = Vec::new();
    for role in Role::ALL {
        let path = dir.join(role.seed_file());
        let id = match std::fs::read_to_string(&path) {
            Ok(seed) => Identity::from_seed(role, &seed).with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate(role)?;
                write_secret(&path, &format!("{}\n", id.seed()))?;
                new_keys.push(role);
                id
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        seeds.push((role, path));
        identities.push(id);
    }
    let config = dir.join(CONFIG_FILE);
    let text = render(&identities, unrestricted);
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &config).with_context(|| format!("writing {}", config.display()))?;
    Ok(Generated { config, seeds, new_keys })
}

/// Creates `path` readable by its owner only, with `contents`.
fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(role: Role) -> Permissions {
        role.permissions().expect("restricted role")
    }

    #[test]
    fn subject_matching_follows_nats_wildcards() {
        assert!(subject_matches("inbox.*", "inbox.bob"));
        assert!(!subject_matches("inbox.*", "inbox.bob.x"));
        assert!(!subject_matches("inbox.*", "inbox"));
        assert!(subject_matches("$KV.cursors.>", "$KV.cursors.bob.phone"));
        assert!(!subject_matches("$KV.cursors.>", "$KV.cursors"));
        assert!(subject_matches("a.>", "a.*"));
        assert!(subject_matches("a.*", "a.*"));
        assert!(!subject_matches("a.*", "a.>"));
        assert!(!subject_matches("a.b", "a.*"));
        assert!(subject_matches("$JS.API.STREAM.INFO.INBOX", "$JS.API.STREAM.INFO.INBOX"));
        assert!(!subject_matches("$JS.API.STREAM.INFO.INBOX", "$JS.API.STREAM.INFO.INBOX2"));
    }

    #[test]
    fn the_gateway_cannot_administer_streams_or_touch_the_routers_consumers() {
        let g = perms(Role::Gateway);
        for allowed in [
            "inbox.bob",
            "group.g1",
            "receipts.g1",
            "live.bob",
            "presence.bob",
            "svc.groups",
            "svc.receipts",
            "$KV.cursors.bob.phone",
            "$KV.presence.bob.gw-1",
            "$KV.gateways.gw-1",
            "$KV.settings.bob",
            "$JS.API.DIRECT.GET.INBOX",
            "$JS.API.DIRECT.GET.KV_cursors.$KV.cursors.bob.phone",
            "$JS.API.STREAM.INFO.INBOX",
            "$JS.API.CONSUMER.CREATE.KV_groups",
            "$JS.FC.KV_revocations.abc.x1y2",
        ] {
            assert!(g.may_publish(allowed), "gateway may not publish {allowed}");
        }
        for refused in [
            "$JS.API.STREAM.CREATE.INBOX",
            "$JS.API.STREAM.UPDATE.INBOX",
            "$JS.API.STREAM.DELETE.INBOX",
            "$JS.API.STREAM.PURGE.INBOX",
            "$JS.API.STREAM.MSG.DELETE.INBOX",
            "$JS.API.CONSUMER.CREATE.GROUPS.fanout-p0.group.0.*",
            "$JS.API.CONSUMER.DELETE.GROUPS.fanout-p0",
            "$JS.API.CONSUMER.MSG.NEXT.GROUPS.fanout-p0",
            "$JS.ACK.GROUPS.fanout-p0.1.2.3.4.5",
            "$JS.API.CONSUMER.CREATE.INBOX.push-notifier",
            "$KV.groups.g1",
            "$KV.memberships.bob",
            "$KV.revocations.bob",
            "history.bob.d-alice",
            "push.bob",
            "$JS.API.STREAM.DELETE.KV_cursors",
        ] {
            assert!(!g.may_publish(refused), "gateway may publish {refused}");
        }
        assert!(g.may_subscribe("live.bob"));
        assert!(g.may_subscribe("_INBOX.gateway.abc.*"));
        for refused in ["$JS.API.>", "_INBOX.>", "_INBOX.router.abc", "svc.groups", "push.>", "inbox.*", ">"] {
            assert!(!g.may_subscribe(refused), "gateway may subscribe {refused}");
        }
        assert!(!g.allow_responses);
    }

    #[test]
    fn storage_owns_provisioning_and_purges_but_deletes_nothing() {
        let s = perms(Role::Storage);
        for name in streams::all_stream_names() {
            assert!(s.may_publish(&format!("$JS.API.STREAM.CREATE.{name}")), "{name}");
            assert!(s.may_publish(&format!("$JS.API.STREAM.UPDATE.{name}")), "{name}");
            assert!(!s.may_publish(&format!("$JS.API.STREAM.DELETE.{name}")), "{name}");
        }
        assert!(s.may_publish("$JS.API.STREAM.PURGE.INBOX"));
        assert!(!s.may_publish("$JS.API.STREAM.PURGE.GROUPS"));
        assert!(!s.may_publish("$JS.API.STREAM.CREATE.OTHER"));
        assert!(s.may_publish("$JS.API.CONSUMER.CREATE.INBOX.push-notifier.inbox.*"));
        assert!(!s.may_publish("$JS.API.CONSUMER.CREATE.INBOX.other"));
        assert!(!s.may_publish("$JS.API.CONSUMER.DELETE.GROUPS.fanout-p0"));
        assert!(!s.may_publish("$KV.groups.g1"));
        assert!(s.may_publish("push.bob") && s.may_publish("history.bob.d-alice") && s.may_publish("inbox.bob"));
        assert!(s.may_subscribe("svc.receipts") && !s.may_subscribe("svc.groups") && !s.may_subscribe("live.*"));
        assert!(s.allow_responses);
    }

    #[test]
    fn the_router_owns_the_group_consumers_and_membership_buckets() {
        let r = perms(Role::Router);
        for ok in [
            "$JS.API.CONSUMER.CREATE.GROUPS.fanout-p3.group.3.*",
            "$JS.API.CONSUMER.DELETE.GROUPS.fanout-p3",
            "$JS.API.CONSUMER.INFO.GROUPS.fanout-p3",
            "$JS.API.CONSUMER.MSG.NEXT.GROUPS.fanout-p3",
            "$JS.ACK.GROUPS.fanout-p3.1.7.7.1700000000.0",
            "$JS.API.STREAM.MSG.GET.GROUPS",
            "$KV.groups.g1",
            "$KV.memberships.bob",
            "inbox.bob",
            "receipts.g1",
            "group.g1",
        ] {
            assert!(r.may_publish(ok), "router may not publish {ok}");
        }
        for refused in [
            "$JS.API.STREAM.CREATE.GROUPS",
            "$JS.API.STREAM.DELETE.GROUPS",
            "$JS.API.STREAM.PURGE.INBOX",
            "$JS.API.CONSUMER.DELETE.INBOX.push-notifier",
            "$KV.cursors.bob.phone",
            "live.bob",
        ] {
            assert!(!r.may_publish(refused), "router may publish {refused}");
        }
        assert!(r.may_subscribe("svc.groups") && !r.may_subscribe("svc.receipts"));
        assert!(r.allow_responses);
    }

    #[test]
    fn admin_push_and_bench() {
        let a = perms(Role::Admin);
        assert!(a.may_publish("$KV.revocations.bob") && a.may_publish("$JS.API.STREAM.INFO.KV_revocations"));
        assert!(a.may_publish("$JS.API.CONSUMER.INFO.GROUPS.fanout-p0"));
        assert!(!a.may_publish("inbox.bob") && !a.may_publish("$JS.API.STREAM.DELETE.INBOX"));
        let p = perms(Role::Push);
        assert!(p.publish.is_empty());
        assert!(p.may_subscribe("push.bob") && p.may_subscribe("push.>") && !p.may_subscribe("inbox.*"));
        assert!(Role::Bench.permissions().is_none());
        assert_eq!(Role::Bench.account(), BENCH_ACCOUNT);
        assert!(Role::ALL.iter().filter(|r| **r != Role::Bench).all(|r| r.account() == CHAT_ACCOUNT));
    }

    #[test]
    fn every_role_subscribes_to_its_own_replies_only() {
        for role in Role::ALL.into_iter().filter(|r| !matches!(r, Role::Push | Role::Bench)) {
            let p = perms(role);
            assert!(p.may_subscribe(&format!("{}.x.*", role.inbox_prefix())), "{role:?}");
            for other in Role::ALL.into_iter().filter(|o| *o != role) {
                assert!(!p.may_subscribe(&format!("{}.x", other.inbox_prefix())), "{role:?} reads {other:?}'s replies");
            }
        }
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
        }
    }

    #[test]
    fn seeds_round_trip_and_bad_ones_are_refused() {
        let id = Identity::generate(Role::Gateway).unwrap();
        assert!(id.seed().starts_with("SU") && id.public_key.starts_with('U'));
        let again = Identity::from_seed(Role::Gateway, &format!("{}\n", id.seed())).unwrap();
        assert_eq!(again.public_key, id.public_key);
        assert!(Identity::from_seed(Role::Gateway, "not a seed").is_err());
        let account = nkeys::KeyPair::new_account().seed().unwrap();
        assert!(Identity::from_seed(Role::Gateway, &account).is_err());
    }

    #[test]
    fn rendered_config_holds_public_keys_and_permissions_only() {
        let ids: Vec<Identity> = Role::ALL.into_iter().map(|r| Identity::generate(r).unwrap()).collect();
        let text = render(&ids, &["UOBSERVER".to_owned()]);
        for id in &ids {
            assert!(text.contains(&format!("nkey: \"{}\"", id.public_key)));
            assert!(!text.contains(id.seed()), "a seed leaked into the server config");
        }
        assert!(text.contains("CHAT {") && text.contains("BENCH {"));
        assert!(text.contains("\"$JS.API.STREAM.PURGE.INBOX\""));
        assert!(text.contains("publish: { deny: [\">\"] }"), "the push role publishes nothing");
        assert_eq!(text.matches("allow_responses: true").count(), 2);
        assert!(text.contains("{ nkey: \"UOBSERVER\" }"));
        // The bench user comes after the BENCH account opens.
        let bench = ids.iter().find(|i| i.role == Role::Bench).unwrap();
        assert!(text.find(&bench.public_key).unwrap() > text.find("BENCH {").unwrap());
    }

    #[test]
    fn write_dir_keeps_existing_keys_and_protects_seeds() {
        let dir = std::env::temp_dir().join(format!("bus-auth-test-{}-{}", std::process::id(), protocol::now_ms()));
        let first = write_dir(&dir, &[]).unwrap();
        assert_eq!(first.new_keys.len(), Role::ALL.len());
        let gateway_seed = std::fs::read_to_string(dir.join("gateway.nk")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("gateway.nk")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_file(dir.join("push.nk")).unwrap();
        let second = write_dir(&dir, &[]).unwrap();
        assert_eq!(second.new_keys, vec![Role::Push]);
        assert_eq!(std::fs::read_to_string(dir.join("gateway.nk")).unwrap(), gateway_seed);
        let id = Identity::from_seed(Role::Gateway, &gateway_seed).unwrap();
        assert!(std::fs::read_to_string(&second.config).unwrap().contains(&id.public_key));
        std::fs::write(dir.join("router.nk"), "garbage").unwrap();
        assert!(write_dir(&dir, &[]).is_err(), "a corrupt seed must not be replaced silently");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
