//! Push-notification decisions, without I/O.
//!
//! Items that deserve a push (1:1 chat messages, group messages) are stored in `inbox.<user>`
//! with the header [`PUSH_HEADER`]. The notifier ([`crate::notifier`]) feeds their stream
//! sequences here, together with whether the user has a live device ([`OnlineView`]), and
//! publishes the [`PushEvent`]s that [`PushDebouncer`] decides on.
//!
//! **Debouncing, per user.** The first pushable item for an offline user yields an event at once
//! (leading edge: the phone rings without delay). Items arriving within the next
//! `window` are counted, not announced; when the window ends with items counted and the user
//! still offline, one more event carries their count (trailing edge), and a new window starts.
//! So a user gets at most one event per window, and every pushable item is covered by exactly one
//! event (unless the user came online first, or was evicted): `pending` is the number of items
//! since the previous event, `first_seq..=last_seq` their range of stream sequences. A window
//! that ends with nothing counted forgets the user, so only users with an event in the last
//! window are tracked; a cap bounds them (the oldest are evicted first).
//!
//! **Online.** A user is online while a presence record says "online" on a gateway whose
//! heartbeat is younger than the presence timeout: the same rule as the gateways' `combine`
//! (gateway/src/presence.rs). An item for an online user is not announced, and what was counted
//! for that user is dropped: the user's devices are getting it.

use std::collections::{HashMap, VecDeque};

use protocol::groups::{GatewayBeat, PresenceRecord};

/// Header on an `inbox.<user>` message that deserves a push notification (value `1`). Set by the
/// gateway on 1:1 chat messages and by the router on group message copies; never on receipts,
/// copies for the sender's devices, read marks or group events.
pub use protocol::subjects::PUSH_HEADER;

/// Whether a message's `Chat-Push` header value asks for a push.
pub fn wants_push(value: &str) -> bool {
    value == "1"
}

/// The event published on core NATS `push.<user>` (JSON, [`PushEvent::to_json`]), for a push
/// provider adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    pub user: String,
    /// Pushable items stored for the user since its previous event (at least 1).
    pub pending: u64,
    /// INBOX stream sequences of the first and the last of those items.
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the event was decided, ms since the epoch.
    pub ts: u64,
}

impl PushEvent {
    /// `{"user":"bob","pending":3,"first_seq":41,"last_seq":44,"ts":1700000000000}`.
    pub fn to_json(&self) -> Vec<u8> {
        // A string always serialises (escaped as JSON requires).
        let user = serde_json::to_string(&self.user).unwrap_or_default();
        format!(
            r#"{{"user":{user},"pending":{},"first_seq":{},"last_seq":{},"ts":{}}}"#,
            self.pending, self.first_seq, self.last_seq, self.ts
        )
        .into_bytes()
    }
}

/// Why a presence or heartbeat change was ignored (the buckets are written by other services).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("presence key is not <user>.<gateway>")]
    BadKey,
    #[error("value is not valid JSON of the expected shape")]
    BadValue,
}

/// Who has a live device: the online records of KV `presence` and the beats of KV `gateways`.
/// Only online records are held, so memory follows the number of connected users.
#[derive(Debug)]
pub struct OnlineView {
    /// Per user, the gateways with a record saying "online".
    online: HashMap<Box<str>, Vec<Box<str>>>,
    records: usize,
    /// Per gateway, its last heartbeat (ms since the epoch, the gateway's clock).
    beats: HashMap<Box<str>, u64>,
    timeout_ms: u64,
}

impl OnlineView {
    /// `timeout_ms`: a gateway whose beat is at least this old is dead (the gateways' presence
    /// timeout).
    pub fn new(timeout_ms: u64) -> Self {
        OnlineView { online: HashMap::new(), records: 0, beats: HashMap::new(), timeout_ms }
    }

    /// Forgets everything, before the buckets are loaded again.
    pub fn reset(&mut self) {
        *self = Self::new(self.timeout_ms);
    }

    /// Applies a change of presence key `<user>.<gateway>`: a new value, or `None` when the key
    /// was deleted or purged.
    pub fn presence(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), Rejected> {
        let (user, gw) = key.split_once('.').filter(|(u, g)| !u.is_empty() && !g.is_empty()).ok_or(Rejected::BadKey)?;
        let online = match value {
            Some(v) => serde_json::from_slice::<PresenceRecord>(v).map_err(|_| Rejected::BadValue)?.online,
            None => false,
        };
        if online {
            let gws = self.online.entry(user.into()).or_default();
            if !gws.iter().any(|g| &**g == gw) {
                gws.push(gw.into());
                self.records += 1;
            }
        } else if let Some(gws) = self.online.get_mut(user) {
            if let Some(i) = gws.iter().position(|g| &**g == gw) {
                gws.swap_remove(i);
                self.records -= 1;
            }
            if gws.is_empty() {
                self.online.remove(user);
            }
        }
        Ok(())
    }

    /// Applies a change of gateway key `gateway`: a new beat, or `None` when it was deleted (a
    /// reaped gateway).
    pub fn beat(&mut self, gateway: &str, value: Option<&[u8]>) -> Result<(), Rejected> {
        match value {
            Some(v) => {
                let at = serde_json::from_slice::<GatewayBeat>(v).map_err(|_| Rejected::BadValue)?.at;
                self.beats.insert(gateway.into(), at);
            }
            None => {
                self.beats.remove(gateway);
            }
        }
        Ok(())
    }

    /// Whether `user` has a record saying "online" on a gateway that is alive at `now_ms`.
    pub fn is_online(&self, user: &str, now_ms: u64) -> bool {
        self.online.get(user).is_some_and(|gws| {
            gws.iter().any(|g| self.beats.get(g).is_some_and(|at| now_ms.saturating_sub(*at) < self.timeout_ms))
        })
    }

    /// Presence records saying "online" that are held.
    pub fn online_records(&self) -> usize {
        self.records
    }

    /// Gateways with a heartbeat.
    pub fn gateways(&self) -> usize {
        self.beats.len()
    }
}

/// Debouncer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceConfig {
    /// At most one event per user per window, ms (at least 1).
    pub window_ms: u64,
    /// Most users tracked at once; the one with the oldest event is evicted beyond it.
    pub max_users: usize,
}

/// What became of one pushable item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Announce it now.
    Event(PushEvent),
    /// Within the user's window: counted for the next event.
    Debounced,
    /// The user has a live device: nothing to announce.
    Online,
}

#[derive(Debug)]
struct Slot {
    /// When the user's last event was decided: its window runs from here.
    emitted: u64,
    /// Items since that event, and their sequence range.
    pending: u64,
    first_seq: u64,
    last_seq: u64,
}

/// Per user, when its last event went out and what arrived since. See the module docs.
#[derive(Debug)]
pub struct PushDebouncer {
    cfg: DebounceConfig,
    slots: HashMap<Box<str>, Slot>,
    /// `(emitted, user)` in the order the events were decided, so oldest first: windows end in
    /// this order, and eviction takes the front. An entry whose user has a newer event (or was
    /// evicted) is stale and skipped; each stale entry is due already, so it goes at the next
    /// [`due`](Self::due).
    order: VecDeque<(u64, Box<str>)>,
    /// The latest time seen: time never goes backwards here, so `order` stays sorted.
    clock: u64,
    evictions: u64,
}

impl PushDebouncer {
    pub fn new(cfg: DebounceConfig) -> Self {
        let cfg = DebounceConfig { window_ms: cfg.window_ms.max(1), max_users: cfg.max_users.max(1) };
        PushDebouncer { cfg, slots: HashMap::new(), order: VecDeque::new(), clock: 0, evictions: 0 }
    }

    fn advance(&mut self, now_ms: u64) -> u64 {
        self.clock = self.clock.max(now_ms);
        self.clock
    }

    /// One pushable item, stream sequence `seq`, stored for `user`, who is `online` or not.
    pub fn offer(&mut self, user: &str, seq: u64, online: bool, now_ms: u64) -> Outcome {
        let now = self.advance(now_ms);
        if online {
            // The user's devices are getting what was counted, too.
            if let Some(s) = self.slots.get_mut(user) {
                s.pending = 0;
            }
            return Outcome::Online;
        }
        let window = self.cfg.window_ms;
        if let Some(s) = self.slots.get_mut(user) {
            if now < s.emitted.saturating_add(window) {
                if s.pending == 0 {
                    s.first_seq = seq;
                }
                s.pending += 1;
                s.last_seq = seq;
                return Outcome::Debounced;
            }
            // The window is over but its trailing event was not decided yet: one event covers
            // what was counted and this item.
            let first_seq = if s.pending > 0 { s.first_seq } else { seq };
            let ev = PushEvent { user: user.to_owned(), pending: s.pending + 1, first_seq, last_seq: seq, ts: now };
            *s = Slot { emitted: now, pending: 0, first_seq: 0, last_seq: 0 };
            self.order.push_back((now, user.into()));
            return Outcome::Event(ev);
        }
        while self.slots.len() >= self.cfg.max_users {
            self.evict_oldest();
        }
        self.slots.insert(user.into(), Slot { emitted: now, pending: 0, first_seq: 0, last_seq: 0 });
        self.order.push_back((now, user.into()));
        Outcome::Event(PushEvent { user: user.to_owned(), pending: 1, first_seq: seq, last_seq: seq, ts: now })
    }

    fn evict_oldest(&mut self) {
        while let Some((at, user)) = self.order.pop_front() {
            if self.slots.get(&user).is_some_and(|s| s.emitted == at) {
                self.slots.remove(&user);
                self.evictions += 1;
                return;
            }
        }
    }

    /// Ends the windows over at `now_ms`: a user with items counted and not `online` gets its
    /// trailing event (appended to `out`) and a new window; any other user is forgotten.
    pub fn due(&mut self, now_ms: u64, online: impl Fn(&str) -> bool, out: &mut Vec<PushEvent>) {
        let now = self.advance(now_ms);
        let window = self.cfg.window_ms;
        while self.order.front().is_some_and(|(at, _)| at.saturating_add(window) <= now) {
            let Some((at, user)) = self.order.pop_front() else { break };
            let Some(s) = self.slots.get_mut(&user) else { continue };
            if s.emitted != at {
                continue;
            }
            if s.pending == 0 || online(&user) {
                self.slots.remove(&user);
                continue;
            }
            out.push(PushEvent {
                user: user.to_string(),
                pending: s.pending,
                first_seq: s.first_seq,
                last_seq: s.last_seq,
                ts: now,
            });
            *s = Slot { emitted: now, pending: 0, first_seq: 0, last_seq: 0 };
            self.order.push_back((now, user));
        }
    }

    /// Users tracked (an event in their current window).
    pub fn tracked_users(&self) -> usize {
        self.slots.len()
    }

    /// Users evicted for the cap so far (what was counted for them is not announced).
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 30_000;

    fn deb(max_users: usize) -> PushDebouncer {
        PushDebouncer::new(DebounceConfig { window_ms: W, max_users })
    }

    fn ev(user: &str, pending: u64, first_seq: u64, last_seq: u64, ts: u64) -> PushEvent {
        PushEvent { user: user.into(), pending, first_seq, last_seq, ts }
    }

    fn due(d: &mut PushDebouncer, now: u64) -> Vec<PushEvent> {
        let mut out = Vec::new();
        d.due(now, |_| false, &mut out);
        out
    }

    #[test]
    fn first_item_is_announced_at_once_and_the_rest_of_the_window_once_at_its_end() {
        let mut d = deb(100);
        assert_eq!(d.offer("bob", 41, false, 1_000), Outcome::Event(ev("bob", 1, 41, 41, 1_000)));
        assert_eq!(d.offer("bob", 42, false, 2_000), Outcome::Debounced);
        assert_eq!(d.offer("bob", 44, false, 30_999), Outcome::Debounced);
        assert_eq!(d.tracked_users(), 1);
        assert!(due(&mut d, 30_999).is_empty());
        assert_eq!(due(&mut d, 31_000), vec![ev("bob", 2, 42, 44, 31_000)]);
        // A new window started with that event.
        assert_eq!(d.offer("bob", 50, false, 40_000), Outcome::Debounced);
        assert_eq!(due(&mut d, 61_000), vec![ev("bob", 1, 50, 50, 61_000)]);
        // A window with nothing counted forgets the user; the next item is announced at once.
        assert!(due(&mut d, 91_000).is_empty());
        assert_eq!(d.tracked_users(), 0);
        assert_eq!(d.offer("bob", 60, false, 95_000), Outcome::Event(ev("bob", 1, 60, 60, 95_000)));
        assert_eq!(d.queued(), 1);
    }

    #[test]
    fn users_are_debounced_independently() {
        let mut d = deb(100);
        assert!(matches!(d.offer("bob", 1, false, 0), Outcome::Event(_)));
        assert!(matches!(d.offer("carol", 2, false, 10), Outcome::Event(_)));
        assert_eq!(d.offer("bob", 3, false, 20), Outcome::Debounced);
        assert_eq!(d.offer("carol", 4, false, 20), Outcome::Debounced);
        assert_eq!(due(&mut d, W), vec![ev("bob", 1, 3, 3, W)]);
        assert_eq!(due(&mut d, W + 10), vec![ev("carol", 1, 4, 4, W + 10)]);
    }

    #[test]
    fn an_item_after_the_window_but_before_its_trailing_event_is_announced_with_what_was_counted() {
        let mut d = deb(100);
        d.offer("bob", 1, false, 0);
        d.offer("bob", 2, false, 5);
        // `due` was not called at W (the I/O loop ticks coarsely): one event for both.
        assert_eq!(d.offer("bob", 3, false, W + 100), Outcome::Event(ev("bob", 2, 2, 3, W + 100)));
        // The old window's entry is stale and goes; the new window runs from the event.
        assert!(due(&mut d, W + 100).is_empty());
        assert_eq!(d.queued(), 1);
        assert_eq!(d.offer("bob", 4, false, W + 200), Outcome::Debounced);
        assert_eq!(due(&mut d, 2 * W + 100), vec![ev("bob", 1, 4, 4, 2 * W + 100)]);
    }

    #[test]
    fn online_users_get_nothing_and_what_was_counted_is_dropped() {
        let mut d = deb(100);
        assert_eq!(d.offer("bob", 1, true, 0), Outcome::Online);
        assert_eq!(d.tracked_users(), 0, "an online user is not tracked");
        assert!(matches!(d.offer("bob", 2, false, 10), Outcome::Event(_)));
        assert_eq!(d.offer("bob", 3, false, 20), Outcome::Debounced);
        // Online again: its devices get item 3, so no trailing event for it.
        assert_eq!(d.offer("bob", 4, true, 30), Outcome::Online);
        assert!(due(&mut d, W + 10).is_empty());
        assert_eq!(d.tracked_users(), 0);

        // Counted while offline, online when the window ends: nothing either.
        d.offer("carol", 5, false, W + 100);
        d.offer("carol", 6, false, W + 200);
        let mut out = Vec::new();
        d.due(2 * W + 100, |u| u == "carol", &mut out);
        assert!(out.is_empty());
        assert_eq!(d.tracked_users(), 0);
    }

    #[test]
    fn the_cap_evicts_the_user_with_the_oldest_event() {
        let mut d = deb(2);
        d.offer("a", 1, false, 0);
        d.offer("b", 2, false, 10);
        d.offer("a", 3, false, 20); // counted for a
        assert!(matches!(d.offer("c", 4, false, 30), Outcome::Event(_)));
        assert_eq!((d.tracked_users(), d.evictions()), (2, 1));
        // `a` was evicted with what was counted: its next item is announced at once.
        assert_eq!(d.offer("a", 5, false, 40), Outcome::Event(ev("a", 1, 5, 5, 40)));
        assert_eq!((d.tracked_users(), d.evictions()), (2, 2), "b went next");
        assert!(d.queued() <= 3);
        assert!(due(&mut d, 10 * W).is_empty());
        assert_eq!((d.tracked_users(), d.queued()), (0, 0));
    }

    #[test]
    fn time_going_backwards_does_not_reopen_or_reorder_windows() {
        let mut d = deb(100);
        d.offer("bob", 1, false, 50_000);
        // A clock step back: still inside the window that started at 50 000.
        assert_eq!(d.offer("bob", 2, false, 10_000), Outcome::Debounced);
        assert!(due(&mut d, 60_000).is_empty());
        assert_eq!(due(&mut d, 50_000 + W), vec![ev("bob", 1, 2, 2, 50_000 + W)]);
    }

    #[test]
    fn memory_stays_bounded_under_many_users() {
        // More users than the cap (evictions), then fewer (windows end, trailing events, stale
        // queue entries when an item beats the `due` call).
        for users in [5000u64, 500] {
            let mut d = deb(1000);
            let mut events = 0;
            for i in 0..200_000u64 {
                let user = format!("u{}", (i * 7) % users);
                if let Outcome::Event(_) = d.offer(&user, i, false, i) {
                    events += 1;
                }
                if i % 100 == 0 {
                    events += due(&mut d, i).len();
                }
                assert!(d.tracked_users() <= 1000);
                assert!(d.queued() <= d.tracked_users() + 100, "queue {} at {i}", d.queued());
            }
            assert!(events > 0);
        }
    }

    fn rec(online: bool) -> Vec<u8> {
        serde_json::to_vec(&PresenceRecord { online, at: 1 }).unwrap()
    }

    fn beat(at: u64) -> Vec<u8> {
        serde_json::to_vec(&GatewayBeat { at }).unwrap()
    }

    #[test]
    fn online_needs_an_online_record_on_a_live_gateway() {
        let mut v = OnlineView::new(30_000);
        assert!(!v.is_online("bob", 100_000), "no record");
        v.presence("bob.g1", Some(&rec(true))).unwrap();
        assert!(!v.is_online("bob", 100_000), "a gateway without a beat is dead");
        v.beat("g1", Some(&beat(90_000))).unwrap();
        assert!(v.is_online("bob", 100_000));
        assert!(v.is_online("bob", 119_999));
        assert!(!v.is_online("bob", 120_000), "beat as old as the timeout");
        // A beat from a clock ahead of ours counts as fresh.
        v.beat("g1", Some(&beat(200_000))).unwrap();
        assert!(v.is_online("bob", 120_000));
        assert_eq!((v.online_records(), v.gateways()), (1, 1));
        // A reaped gateway (beat deleted).
        v.beat("g1", None).unwrap();
        assert!(!v.is_online("bob", 120_000));
    }

    #[test]
    fn any_live_gateway_is_enough_and_offline_records_are_not_held() {
        let mut v = OnlineView::new(30_000);
        v.beat("g1", Some(&beat(0))).unwrap(); // dead at 100 000
        v.beat("g2", Some(&beat(95_000))).unwrap();
        v.presence("bob.g1", Some(&rec(true))).unwrap();
        v.presence("bob.g2", Some(&rec(true))).unwrap();
        v.presence("bob.g2", Some(&rec(true))).unwrap(); // a repeat
        assert_eq!(v.online_records(), 2);
        assert!(v.is_online("bob", 100_000));
        v.presence("bob.g2", Some(&rec(false))).unwrap();
        assert!(!v.is_online("bob", 100_000), "only on the dead gateway now");
        v.presence("bob.g1", None).unwrap();
        assert_eq!(v.online_records(), 0);
        v.presence("carol.g2", Some(&rec(false))).unwrap();
        assert_eq!(v.online_records(), 0);
        assert!(!v.is_online("carol", 100_000));
        // Other users are not affected by a gateway's records.
        v.presence("dave.g2", Some(&rec(true))).unwrap();
        assert!(v.is_online("dave", 100_000) && !v.is_online("bob", 100_000));
        v.reset();
        assert_eq!((v.online_records(), v.gateways()), (0, 0));
        assert!(!v.is_online("dave", 100_000));
    }

    #[test]
    fn bad_keys_and_values_are_rejected_and_change_nothing() {
        let mut v = OnlineView::new(30_000);
        assert_eq!(v.presence("bob", Some(&rec(true))), Err(Rejected::BadKey));
        assert_eq!(v.presence(".g1", Some(&rec(true))), Err(Rejected::BadKey));
        assert_eq!(v.presence("bob.", Some(&rec(true))), Err(Rejected::BadKey));
        assert_eq!(v.presence("bob.g1", Some(b"{")), Err(Rejected::BadValue));
        assert_eq!(v.beat("g1", Some(b"[]")), Err(Rejected::BadValue));
        assert_eq!((v.online_records(), v.gateways()), (0, 0));
    }

    #[test]
    fn event_wire_form() {
        let e = ev("bob", 3, 41, 44, 1_700_000_000_000);
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"user":"bob","pending":3,"first_seq":41,"last_seq":44,"ts":1700000000000}"#
        );
        assert!(wants_push("1") && !wants_push("0") && !wants_push(""));
        let odd = PushEvent { user: "a\"b".into(), ..e };
        let v: serde_json::Value = serde_json::from_slice(&odd.to_json()).unwrap();
        assert_eq!(v["user"], "a\"b");
        assert_eq!(v["pending"], 3);
    }
}
