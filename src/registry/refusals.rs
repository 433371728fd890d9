//! Refusals in the audit trail, at a bounded rate (issue 22).
//!
//! Every 401 and 403 the registry answers is an audit entry (action
//! `refusal`) naming the caller as far as it is known: the hospital (or
//! `admin`) of a valid token, else `anonymous` and the peer address. A
//! caller who is refused in a loop must not be able to fill the trail, so
//! each caller gets at most `per_minute` entries per calendar minute (UTC);
//! the next refusal writes one `rate_limited` entry saying so, and the
//! ones after it are only counted. When the minute is over, each caller
//! with uncounted refusals gets one `summary` entry with their number.
//! All callers together get at most [`GLOBAL_FACTOR`] × `per_minute`
//! entries a minute (many addresses, one attacker), and the number of
//! callers tracked in one minute is bounded too ([`MAX_CALLERS`]).
//!
//! The windows live in the process: N registry processes behind one load
//! balancer write at most N times the bound.

use std::collections::HashMap;
use std::sync::Mutex;

/// All callers together: this many times the per-caller bound a minute.
pub const GLOBAL_FACTOR: u32 = 50;

/// Callers tracked in one minute; refusals of callers beyond it share one
/// window (`many callers`).
pub const MAX_CALLERS: usize = 10_000;

/// The default of `--audit-refusals-per-minute`.
pub const DEFAULT_PER_MINUTE: u32 = 20;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write its own entry.
    Audit,
    /// The caller's bound was just reached: write one entry that says so.
    RateLimited,
    /// Count it; the minute's summary reports it.
    Count,
}

/// The per-minute windows of refusal entries.
pub struct Limiter {
    per_minute: u32,
    windows: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    minute: u64,
    /// Refusals per caller in this minute, audited or not.
    per_caller: HashMap<String, u32>,
    /// Entries written this minute, all callers.
    written: u32,
    /// Refusals counted without an entry, per caller.
    counted: HashMap<String, u32>,
}

/// Callers whose refusals of a finished minute were counted, not written:
/// (minute, caller, how many).
pub type Summaries = Vec<(u64, String, u32)>;

impl Limiter {
    pub fn new(per_minute: u32) -> Limiter {
        Limiter {
            per_minute: per_minute.max(1),
            windows: Mutex::new(Windows::default()),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Decides for one refusal of `caller` at `minute` (Unix time / 60).
    /// Also returns the summaries of the minutes that have ended.
    pub fn admit(&self, caller: &str, minute: u64) -> (Decision, Summaries) {
        let mut w = self.windows.lock().expect("refusal windows lock");
        let summaries = roll(&mut w, minute);
        let key = if w.per_caller.len() >= MAX_CALLERS && !w.per_caller.contains_key(caller) {
            "many callers".to_string()
        } else {
            caller.to_string()
        };
        let n = {
            let n = w.per_caller.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        let global_room = w.written < self.per_minute.saturating_mul(GLOBAL_FACTOR);
        let decision = if n <= self.per_minute && global_room {
            Decision::Audit
        } else if n == self.per_minute + 1 && global_room {
            Decision::RateLimited
        } else {
            Decision::Count
        };
        match decision {
            Decision::Count => *w.counted.entry(key).or_default() += 1,
            _ => w.written += 1,
        }
        (decision, summaries)
    }

    /// The summaries of the minutes that ended before `minute` (the
    /// registry calls this every minute, so that a caller who stopped is
    /// summarized too).
    pub fn roll(&self, minute: u64) -> Summaries {
        roll(
            &mut self.windows.lock().expect("refusal windows lock"),
            minute,
        )
    }
}

fn roll(w: &mut Windows, minute: u64) -> Summaries {
    if minute <= w.minute {
        return Vec::new();
    }
    let ended = w.minute;
    let mut summaries: Summaries = w
        .counted
        .drain()
        .map(|(caller, n)| (ended, caller, n))
        .collect();
    summaries.sort();
    w.per_caller.clear();
    w.written = 0;
    w.minute = minute;
    summaries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_k_entries_one_notice_and_a_summary() {
        let l = Limiter::new(3);
        let decisions: Vec<Decision> = (0..6)
            .map(|_| l.admit("anonymous@10.0.0.1", 100).0)
            .collect();
        use Decision::*;
        assert_eq!(decisions, [Audit, Audit, Audit, RateLimited, Count, Count]);
        // Another caller has a window of its own.
        assert_eq!(l.admit("H1", 100).0, Audit);
        assert_eq!(l.roll(100), vec![]);
        assert_eq!(
            l.roll(101),
            vec![(100, "anonymous@10.0.0.1".to_string(), 2)]
        );
        assert_eq!(l.admit("anonymous@10.0.0.1", 101).0, Audit);
    }

    #[test]
    fn all_callers_together_are_bounded() {
        let l = Limiter::new(1);
        let audited = (0..200)
            .filter(|i| l.admit(&format!("anonymous@10.0.{i}.1"), 7).0 == Decision::Audit)
            .count();
        assert_eq!(audited, GLOBAL_FACTOR as usize);
        let summaries = l.roll(8);
        assert_eq!(summaries.len(), 200 - GLOBAL_FACTOR as usize);
    }
}
