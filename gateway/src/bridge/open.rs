//! The reads behind [`Command::Open`](super::Command::Open): everything a connection needs from
//! the backbone before `hello`, issued at once instead of one after another.

use super::*;

/// Device entries listed per user; a user with more still counts as having several devices,
/// and a device beyond the listing is read by key.
const MAX_DEVICES_LISTED: usize = 1024;

/// Handles on what [`OpenReads::open`] reads.
pub(super) struct OpenReads {
    pub direct: bus::inbox::DirectGets,
    pub cursors: jetstream::kv::Store,
    pub settings: jetstream::kv::Store,
}

impl OpenReads {
    /// The device's cursor, the user's device count and settings, read concurrently with the
    /// subscription's confirmation (`confirmed`, dropped unanswered when it failed); then, with
    /// the subscription in place, the first `prefetch` inbox items after the cursor, unless the
    /// client resumes (`since`) beyond it.
    pub async fn open(
        self,
        user: &UserId,
        device: &DeviceId,
        confirmed: oneshot::Receiver<()>,
        since: u64,
        prefetch: usize,
    ) -> Result<Opened, OpenFailure> {
        // Each read is boxed, so it is freed as soon as it completes: a connection waiting for
        // its confirmation (long during a fast ramp) then holds a few pointers, not the state of
        // every read (async-nats KV futures are large). Thousands of these wait at once, and the
        // bridge's memory, and the page faults that grew it, followed their size.
        let device_read = Box::pin(self.device(user, device));
        let settings_read = Box::pin(settings(&self.settings, user, None));
        let reads = futures::future::join(device_read, settings_read);
        let (confirmed, ((cursor, devices), user_settings)) = futures::future::join(confirmed, reads).await;
        // Unconfirmed first: the client retries either way, and this failure says more.
        confirmed.map_err(|_| OpenFailure::Subscription)?;
        let (cursor, devices) = (cursor.map_err(OpenFailure::Backbone)?, devices);
        // Unreadable settings fall back to the defaults (as a `settings` request would say).
        let history_days = user_settings.map(|s| s.history_days).unwrap_or(0);
        let first_batch = if since <= cursor {
            Some(Box::pin(self.direct.fetch_after(user, cursor, prefetch)).await.map_err(OpenFailure::Backbone)?)
        } else {
            None
        };
        Ok(Opened { cursor, devices, history_days, first_batch })
    }

    /// This device's cursor and how many devices the user has, from one listing of the user's
    /// cursor keys; a device missing from it is registered (cursor 0), so storage keeps the
    /// inbox for it.
    async fn device(&self, user: &UserId, device: &DeviceId) -> (anyhow::Result<u64>, usize) {
        let listing = match self
            .direct
            .kv_last_values(subjects::CURSORS_BUCKET, &format!("{user}.*"), MAX_DEVICES_LISTED)
            .await
        {
            Ok(l) => l,
            Err(e) => return (Err(e.context("listing the user's devices")), 0),
        };
        let key = subjects::cursor_key(user, device);
        match own_cursor(&listing, &key) {
            Some(cursor) => (Ok(cursor), listing.len()),
            // Registered now (or by a concurrent connection of the same device meanwhile).
            None => (Box::pin(open_cursor(&self.cursors, user, device)).await, listing.len() + 1),
        }
    }
}

/// The cursor stored under `key` in a listing of (key, value) cursor entries; `None` when the
/// device is not listed. An unreadable value counts as 0 (redelivery, never loss).
fn own_cursor(listing: &[(String, Bytes)], key: &str) -> Option<u64> {
    listing.iter().find(|(k, _)| k == key).map(|(_, v)| parse_cursor(v))
}

/// A stored cursor value (decimal text); anything else reads as 0.
pub(super) fn parse_cursor(v: &[u8]) -> u64 {
    std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(entries: &[(&str, &str)]) -> Vec<(String, Bytes)> {
        entries.iter().map(|(k, v)| (k.to_string(), Bytes::from(v.to_string()))).collect()
    }

    #[test]
    fn own_cursor_is_read_from_the_listing() {
        let l = listing(&[("bob.laptop", "17"), ("bob.phone", "42")]);
        assert_eq!(own_cursor(&l, "bob.phone"), Some(42));
        assert_eq!(own_cursor(&l, "bob.laptop"), Some(17));
    }

    #[test]
    fn a_device_not_listed_has_no_cursor_yet() {
        let l = listing(&[("bob.laptop", "17")]);
        assert_eq!(own_cursor(&l, "bob.phone"), None);
        assert_eq!(own_cursor(&[], "bob.phone"), None);
        // A key that only starts like this device's is another device.
        assert_eq!(own_cursor(&listing(&[("bob.phone2", "5")]), "bob.phone"), None);
    }

    #[test]
    fn unreadable_cursor_values_count_as_zero() {
        assert_eq!(parse_cursor(b" 12\n"), 12);
        assert_eq!(parse_cursor(b"twelve"), 0);
        assert_eq!(parse_cursor(&[0xff, 0xfe]), 0);
        assert_eq!(parse_cursor(b""), 0);
        assert_eq!(own_cursor(&listing(&[("bob.phone", "-3")]), "bob.phone"), Some(0));
    }
}
