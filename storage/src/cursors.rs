//! The purge decision, without I/O.
//!
//! Every device stores in the `cursors` bucket the highest inbox sequence it has acknowledged. A
//! message in `inbox.<user>` can go once every device of the user has it, so the user's inbox may
//! be purged up to the smallest cursor over its devices. [`CursorTable`] follows the bucket
//! (fed by the watcher) and says which inboxes to purge and how far; the caller does the purging.
//!
//! A device the table does not know about (never acknowledged anything) does not hold messages
//! back: a new device starts from what is still stored.

use std::collections::{HashMap, HashSet};

use protocol::{DeviceId, UserId};

/// One purge to run: remove every message of `inbox.<user>` with a sequence up to and including
/// `up_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeAction {
    pub user: UserId,
    pub up_to: u64,
}

/// A change of one key of the `cursors` bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// A new value; `at_ms` is when it was stored (ms since the epoch), for expiry.
    Put { value: &'a [u8], at_ms: u64 },
    /// The key was deleted or purged: the device is forgotten.
    Remove,
}

/// Why a change was ignored. The bucket is written by other services (and anyone with access to
/// NATS), so bad data is reported and skipped, never trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("key is not <user>.<device> with valid ids")]
    BadKey,
    #[error("value is not an ASCII decimal sequence")]
    BadValue,
}

#[derive(Debug)]
struct Device {
    cursor: u64,
    /// When the cursor was last stored, to mirror the bucket's max age.
    stored_ms: u64,
}

#[derive(Debug, Default)]
struct User {
    devices: HashMap<DeviceId, Device>,
    /// Highest sequence already purged (or being purged) for this user.
    purged: u64,
}

impl User {
    fn min_cursor(&self) -> Option<u64> {
        self.devices.values().map(|d| d.cursor).min()
    }
}

/// Per user, the cursors of its devices and how far its inbox is purged.
#[derive(Debug, Default)]
pub struct CursorTable {
    users: HashMap<UserId, User>,
    /// Users whose minimum cursor may have risen since their last purge.
    dirty: HashSet<UserId>,
    /// False while the initial contents of the bucket are still being loaded: purging then could
    /// use a minimum over only some of a user's devices and delete what another device still needs.
    synced: bool,
    /// Purges held back while the cursors may not match the inboxes (NATS was disconnected and
    /// may have come back with new, empty streams).
    held: bool,
    devices: usize,
}

impl CursorTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything (including a hold), before the bucket is loaded again (after the watch
    /// was re-created). Purges wait for [`mark_synced`](Self::mark_synced).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// The initial contents of the bucket are loaded; purges may start.
    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    /// Holds purges back (true) or lets them go again (false). Changes are still recorded.
    pub fn hold(&mut self, held: bool) {
        self.held = held;
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Devices currently tracked.
    pub fn tracked_devices(&self) -> usize {
        self.devices
    }

    /// Applies a change of key `key` (`<user>.<device>`).
    pub fn apply(&mut self, key: &str, change: Change<'_>) -> Result<(), Rejected> {
        let (user, device) = parse_key(key).ok_or(Rejected::BadKey)?;
        match change {
            Change::Put { value, at_ms } => {
                let cursor = parse_cursor(value).ok_or(Rejected::BadValue)?;
                let u = self.users.entry(user.clone()).or_default();
                let new = Device { cursor, stored_ms: at_ms };
                if u.devices.insert(device, new).is_none() {
                    self.devices += 1;
                }
                self.dirty.insert(user);
            }
            Change::Remove => self.forget(&user, &device),
        }
        Ok(())
    }

    /// Forgets devices whose cursor was stored before `cutoff_ms`: the bucket drops them after its
    /// max age without telling watchers, so the table ages them out itself. Returns how many.
    pub fn expire(&mut self, cutoff_ms: u64) -> usize {
        let mut stale = Vec::new();
        for (user, u) in &self.users {
            for (device, d) in &u.devices {
                if d.stored_ms < cutoff_ms {
                    stale.push((user.clone(), device.clone()));
                }
            }
        }
        for (user, device) in &stale {
            self.forget(user, device);
        }
        stale.len()
    }

    fn forget(&mut self, user: &UserId, device: &DeviceId) {
        let Some(u) = self.users.get_mut(user) else {
            return;
        };
        if u.devices.remove(device).is_some() {
            self.devices -= 1;
        }
        if u.devices.is_empty() {
            // Nobody holds the inbox back and nobody said what was read: leave it alone.
            self.users.remove(user);
            self.dirty.remove(user);
        } else {
            // The minimum may have risen.
            self.dirty.insert(user.clone());
        }
    }

    /// Up to `limit` purges that became possible, each user at most once; users left over stay
    /// pending for the next call. Each returned purge is recorded as done; report a failure with
    /// [`purge_failed`](Self::purge_failed) so it is retried. Nothing while not synced or held.
    pub fn take_purges(&mut self, limit: usize) -> Vec<PurgeAction> {
        if !self.synced || self.held {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut done = Vec::new();
        for user in &self.dirty {
            if out.len() >= limit {
                break;
            }
            done.push(user.clone());
            let Some(u) = self.users.get_mut(user) else {
                continue;
            };
            match u.min_cursor() {
                Some(min) if min > u.purged => {
                    u.purged = min;
                    out.push(PurgeAction { user: user.clone(), up_to: min });
                }
                _ => {}
            }
        }
        for user in done {
            self.dirty.remove(&user);
        }
        out
    }

    /// A purge returned by [`take_purges`](Self::take_purges) failed: it will be offered again.
    pub fn purge_failed(&mut self, action: &PurgeAction) {
        if let Some(u) = self.users.get_mut(&action.user) {
            if u.purged == action.up_to {
                // What was purged before is unknown now; purging again from the start is
                // harmless (purges are idempotent), so forget the mark.
                u.purged = 0;
                self.dirty.insert(action.user.clone());
            }
        }
    }

    /// Users with a change not yet turned into a purge.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }
}

/// `<user>.<device>` with both ids valid. The user goes into a purge subject filter, so an id with
/// wildcards (`*`, `>`) must never get through.
fn parse_key(key: &str) -> Option<(UserId, DeviceId)> {
    let (user, device) = protocol::subjects::parse_cursor_key(key)?;
    Some((UserId::parse(user).ok()?, DeviceId::parse(device).ok()?))
}

/// The stored cursor: ASCII decimal digits (surrounding whitespace tolerated).
fn parse_cursor(value: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(value).ok()?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(t: &mut CursorTable, key: &str, v: &str) {
        t.apply(key, Change::Put { value: v.as_bytes(), at_ms: 1_000 }).unwrap();
    }

    fn synced() -> CursorTable {
        let mut t = CursorTable::new();
        t.mark_synced();
        t
    }

    fn purges(t: &mut CursorTable) -> Vec<(String, u64)> {
        let mut v: Vec<_> = t.take_purges(usize::MAX).into_iter().map(|a| (a.user.to_string(), a.up_to)).collect();
        v.sort();
        v
    }

    fn p(user: &str, up_to: u64) -> (String, u64) {
        (user.to_owned(), up_to)
    }

    #[test]
    fn one_device_purges_up_to_its_cursor() {
        let mut t = synced();
        put(&mut t, "alice.d1", "2");
        assert_eq!(purges(&mut t), vec![p("alice", 2)]);
        // Nothing new: nothing to do.
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.d1", "2");
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.d1", "5");
        assert_eq!(purges(&mut t), vec![p("alice", 5)]);
    }

    #[test]
    fn cursor_zero_purges_nothing() {
        let mut t = synced();
        put(&mut t, "alice.d1", "0");
        assert_eq!(purges(&mut t), vec![]);
        assert_eq!(t.tracked_devices(), 1);
    }

    #[test]
    fn the_slowest_device_decides() {
        let mut t = synced();
        put(&mut t, "alice.phone", "10");
        put(&mut t, "alice.web", "3");
        assert_eq!(purges(&mut t), vec![p("alice", 3)]);
        put(&mut t, "alice.phone", "20");
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.web", "15");
        assert_eq!(purges(&mut t), vec![p("alice", 15)]);
        put(&mut t, "alice.web", "30");
        assert_eq!(purges(&mut t), vec![p("alice", 20)]);
    }

    #[test]
    fn removing_a_device_lets_the_others_decide() {
        let mut t = synced();
        put(&mut t, "alice.phone", "10");
        put(&mut t, "alice.web", "3");
        assert_eq!(purges(&mut t), vec![p("alice", 3)]);
        t.apply("alice.web", Change::Remove).unwrap();
        assert_eq!(purges(&mut t), vec![p("alice", 10)]);
        assert_eq!(t.tracked_devices(), 1);
        // The last device gone: the user is forgotten and nothing is purged.
        t.apply("alice.phone", Change::Remove).unwrap();
        assert_eq!(purges(&mut t), vec![]);
        assert_eq!(t.tracked_devices(), 0);
        // Removing what is not there is fine.
        t.apply("alice.phone", Change::Remove).unwrap();
        t.apply("nobody.x", Change::Remove).unwrap();
        assert_eq!(t.tracked_devices(), 0);
    }

    #[test]
    fn a_lower_cursor_never_purges_backwards() {
        let mut t = synced();
        put(&mut t, "alice.d1", "10");
        assert_eq!(purges(&mut t), vec![p("alice", 10)]);
        put(&mut t, "alice.d1", "4");
        put(&mut t, "alice.d2", "7");
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.d1", "12");
        put(&mut t, "alice.d2", "11");
        assert_eq!(purges(&mut t), vec![p("alice", 11)]);
    }

    #[test]
    fn users_are_independent() {
        let mut t = synced();
        put(&mut t, "alice.d", "4");
        put(&mut t, "bob.d", "9");
        assert_eq!(purges(&mut t), vec![p("alice", 4), p("bob", 9)]);
        put(&mut t, "bob.d", "10");
        assert_eq!(purges(&mut t), vec![p("bob", 10)]);
    }

    #[test]
    fn nothing_is_purged_before_the_bucket_is_loaded() {
        let mut t = CursorTable::new();
        // The initial load delivers alice's devices one by one; purging after the first would
        // delete what the second still needs.
        put(&mut t, "alice.phone", "10");
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.web", "3");
        t.mark_synced();
        assert_eq!(purges(&mut t), vec![p("alice", 3)]);
    }

    #[test]
    fn reset_forgets_everything_and_waits_for_the_load() {
        let mut t = synced();
        put(&mut t, "alice.d", "4");
        assert_eq!(purges(&mut t), vec![p("alice", 4)]);
        t.reset();
        assert!(!t.is_synced());
        assert_eq!(t.tracked_devices(), 0);
        put(&mut t, "alice.d", "4");
        assert_eq!(purges(&mut t), vec![]);
        t.mark_synced();
        // Purged again: harmless, and the table cannot know it was done.
        assert_eq!(purges(&mut t), vec![p("alice", 4)]);
    }

    #[test]
    fn held_purges_wait_but_changes_are_kept() {
        let mut t = synced();
        put(&mut t, "alice.d", "4");
        t.hold(true);
        assert_eq!(purges(&mut t), vec![]);
        put(&mut t, "alice.d", "6");
        put(&mut t, "bob.d", "1");
        assert_eq!(purges(&mut t), vec![]);
        t.hold(false);
        assert_eq!(purges(&mut t), vec![p("alice", 6), p("bob", 1)]);
        t.hold(true);
        t.reset();
        put(&mut t, "alice.d", "8");
        t.mark_synced();
        assert_eq!(purges(&mut t), vec![p("alice", 8)]);
    }

    #[test]
    fn failed_purges_are_retried() {
        let mut t = synced();
        put(&mut t, "alice.d", "4");
        let a = t.take_purges(10);
        assert_eq!(a.len(), 1);
        assert_eq!(purges(&mut t), vec![]);
        t.purge_failed(&a[0]);
        assert_eq!(purges(&mut t), vec![p("alice", 4)]);
        // A failure report for a user that moved on or is gone changes nothing.
        t.purge_failed(&PurgeAction { user: UserId::parse("alice").unwrap(), up_to: 3 });
        assert_eq!(purges(&mut t), vec![]);
        t.apply("alice.d", Change::Remove).unwrap();
        t.purge_failed(&a[0]);
        assert_eq!(purges(&mut t), vec![]);
    }

    #[test]
    fn the_limit_spreads_purges_over_calls() {
        let mut t = synced();
        for u in ["a", "b", "c"] {
            put(&mut t, &format!("{u}.d"), "1");
        }
        assert_eq!(t.take_purges(2).len(), 2);
        assert_eq!(t.pending(), 1);
        assert_eq!(t.take_purges(2).len(), 1);
        assert_eq!(t.take_purges(2).len(), 0);
    }

    #[test]
    fn stale_devices_expire() {
        let mut t = synced();
        let at = |ms| Change::Put { value: b"8", at_ms: ms };
        t.apply("alice.old", at(100)).unwrap();
        let slow = Change::Put { value: b"2", at_ms: 100 };
        t.apply("alice.idle", slow).unwrap();
        t.apply("alice.new", at(500)).unwrap();
        t.apply("bob.old", at(100)).unwrap();
        assert_eq!(purges(&mut t), vec![p("alice", 2), p("bob", 8)]);
        assert_eq!(t.expire(200), 3);
        assert_eq!(t.tracked_devices(), 1);
        // alice's idle device no longer holds her inbox back; bob has no devices left.
        assert_eq!(purges(&mut t), vec![p("alice", 8)]);
        assert_eq!(t.expire(200), 0);
    }

    #[test]
    fn bad_keys_and_values_are_rejected_and_change_nothing() {
        let mut t = synced();
        put(&mut t, "alice.d", "4");
        assert_eq!(purges(&mut t), vec![p("alice", 4)]);
        for key in ["alice", "alice.", ".d", "a.b.c", "al*ce.d", ">.d", "a.>", "ä.d", ""] {
            let put = Change::Put { value: b"9", at_ms: 1 };
            assert_eq!(t.apply(key, put), Err(Rejected::BadKey), "{key:?}");
            assert_eq!(t.apply(key, Change::Remove), Err(Rejected::BadKey), "{key:?}");
        }
        for value in [&b""[..], b" ", b"x", b"-1", b"+5", b"1.5", b"0x10", b"18446744073709551616", b"\xff\xfe", b"4 2"]
        {
            let put = Change::Put { value, at_ms: 1 };
            assert_eq!(t.apply("alice.d", put), Err(Rejected::BadValue), "{value:?}");
        }
        assert_eq!(purges(&mut t), vec![]);
        assert_eq!(t.tracked_devices(), 1);
        // Tolerated: surrounding whitespace, the largest value.
        put(&mut t, "alice.d", " 7\n");
        assert_eq!(purges(&mut t), vec![p("alice", 7)]);
        put(&mut t, "alice.d", "18446744073709551615");
        assert_eq!(purges(&mut t), vec![p("alice", u64::MAX)]);
    }
}
