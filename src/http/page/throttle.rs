//! Sign-in throttling for the page (issue 22: 40 wrong passwords in a row
//! were each answered in 30 ms). Failures are counted per account and per
//! client address; past a threshold the next attempt must wait, twice as
//! long after each further failure (1 minute, 2, 4, … at most 15), and is
//! refused without the password being checked. A sign-in that succeeds
//! clears its account. Memory is bounded: at most [`MAX_KEYS`] accounts
//! and addresses are tracked, the least recent dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one account before it must wait: a doctor mistyping a few
/// times is not slowed down.
pub const ACCOUNT_FAILURES: u32 = 5;
/// Failures from one address before it must wait: a ward's shared
/// workstation (or a NAT) signs in many doctors.
pub const ADDRESS_FAILURES: u32 = 20;
const FIRST_WAIT: Duration = Duration::from_secs(60);
const LONGEST_WAIT: Duration = Duration::from_secs(15 * 60);
/// Failures older than this (counted from the last one) are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
pub const MAX_KEYS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

impl Entry {
    /// Until when this key must wait, given its threshold.
    fn blocked_until(&self, threshold: u32) -> Option<Instant> {
        if self.failures < threshold {
            return None;
        }
        let doublings = (self.failures - threshold).min(10);
        let wait = (FIRST_WAIT * 2u32.pow(doublings)).min(LONGEST_WAIT);
        Some(self.last + wait)
    }
}

#[derive(Default)]
pub struct SignInThrottle {
    entries: Mutex<HashMap<Key, Entry>>,
}

fn account(user_id: &str) -> Key {
    Key::Account(
        user_id
            .trim()
            .chars()
            .take(64)
            .collect::<String>()
            .to_lowercase(),
    )
}

fn threshold(key: &Key) -> u32 {
    match key {
        Key::Account(_) => ACCOUNT_FAILURES,
        Key::Address(_) => ADDRESS_FAILURES,
    }
}

impl SignInThrottle {
    /// `Err(wait)` when this account or this address must wait before
    /// another attempt.
    pub fn check(&self, user_id: &str, peer: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let keys = [Some(account(user_id)), peer.map(Key::Address)];
        let until = keys
            .iter()
            .flatten()
            .filter_map(|k| entries.get(k).and_then(|e| e.blocked_until(threshold(k))))
            .max();
        match until {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn failed(&self, user_id: &str, peer: Option<IpAddr>, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for key in [Some(account(user_id)), peer.map(Key::Address)]
            .into_iter()
            .flatten()
        {
            if !entries.contains_key(&key) && entries.len() >= MAX_KEYS {
                make_room(&mut entries, now);
            }
            let e = entries.entry(key).or_insert(Entry {
                failures: 0,
                last: now,
            });
            if now.duration_since(e.last) > FORGET_AFTER {
                e.failures = 0;
            }
            e.failures = e.failures.saturating_add(1);
            e.last = now;
        }
    }

    pub fn succeeded(&self, user_id: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&account(user_id));
    }
}

/// Drops what is forgotten; if nothing is, the least recent key.
fn make_room(entries: &mut HashMap<Key, Entry>, now: Instant) {
    entries.retain(|_, e| now.duration_since(e.last) <= FORGET_AFTER);
    if entries.len() >= MAX_KEYS
        && let Some(oldest) = entries
            .iter()
            .min_by_key(|(_, e)| e.last)
            .map(|(k, _)| k.clone())
    {
        entries.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_waits_after_its_failures_and_longer_each_time() {
        let t = SignInThrottle::default();
        let now = Instant::now();
        let peer = Some(IpAddr::from([10, 1, 2, 3]));
        for _ in 0..ACCOUNT_FAILURES {
            assert!(t.check("dr.wang", peer, now).is_ok());
            t.failed("dr.wang", peer, now);
        }
        assert_eq!(t.check("Dr.Wang ", peer, now), Err(FIRST_WAIT));
        assert!(t.check("dr.li", peer, now).is_ok(), "another account");
        let later = now + FIRST_WAIT;
        assert!(t.check("dr.wang", peer, later).is_ok());
        t.failed("dr.wang", peer, later);
        assert_eq!(t.check("dr.wang", peer, later), Err(FIRST_WAIT * 2));
        t.succeeded("dr.wang");
        assert!(t.check("dr.wang", None, later).is_ok());
    }

    #[test]
    fn an_address_waits_after_failures_on_many_accounts() {
        let t = SignInThrottle::default();
        let now = Instant::now();
        let peer = Some(IpAddr::from([10, 1, 2, 3]));
        for i in 0..ADDRESS_FAILURES {
            t.failed(&format!("user{i}"), peer, now);
        }
        assert!(t.check("someone", peer, now).is_err());
        assert!(
            t.check("someone", Some(IpAddr::from([10, 9, 9, 9])), now)
                .is_ok()
        );
    }

    #[test]
    fn memory_is_bounded() {
        let t = SignInThrottle::default();
        let now = Instant::now();
        for i in 0..MAX_KEYS + 100 {
            t.failed(&format!("user{i}"), None, now);
        }
        assert!(t.entries.lock().unwrap().len() <= MAX_KEYS);
    }
}
