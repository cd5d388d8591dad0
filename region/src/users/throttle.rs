//! Login throttling: at most one argon2 verification per core at once (each takes ~19 MiB and
//! tens of milliseconds), each slot with working memory kept from one verification to the next,
//! and a growing delay for a source address or a username after repeated failures, answered as
//! "try again in N s" without checking the password.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Block;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Password checks at once, at most: one per core up to this. Each slot keeps its ~19 MiB of
/// argon2 memory for the next check (so the heap does not fragment), so the bound is also the
/// memory logins may hold: 4 × 19 MiB; more would not log people in faster on a region's box.
pub const LOGIN_VERIFICATIONS_MAX: usize = 4;

/// Failures a source or username may have before logins are delayed: a person mistyping a
/// password a few times is never slowed.
pub const LOGIN_FAILURES_FREE: u32 = 5;

/// The first delay; each further failure doubles it, up to [`LOGIN_DELAY_MAX`].
pub const LOGIN_DELAY_FIRST: Duration = Duration::from_secs(1);

/// The longest delay: a guesser gets at most ~100 tries a day per source and per username,
/// while the owner locked out by someone else's guessing waits at most this long.
pub const LOGIN_DELAY_MAX: Duration = Duration::from_secs(15 * 60);

/// A source or username without failures for this long is forgotten.
pub const LOGIN_FAILURES_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Sources and usernames tracked at once (~100 bytes each: ~1 MiB). When full, entries older
/// than [`LOGIN_FAILURES_FORGET_AFTER`] go first, then the least recently failed.
pub const LOGIN_FAILURE_ENTRIES_MAX: usize = 10_000;

/// Who a failure counts against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ThrottleKey {
    Source(IpAddr),
    Username(String),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    blocked_until: Instant,
}

#[derive(Debug)]
pub struct LoginThrottle {
    verifications: Semaphore,
    /// Argon2 working memory of the slots not in use, at most one buffer per slot. Kept, not
    /// freed: allocating and freeing ~19 MiB per login fragments the heap, and the region's
    /// resident memory then grew with the logins (+340 MiB after 64 logins, two at a time)
    /// instead of staying at slots × 19 MiB.
    memory: Mutex<Vec<Vec<Block>>>,
    entries: Mutex<HashMap<ThrottleKey, Entry>>,
}

/// A slot to run one password verification in, with its working memory; dropping it gives both
/// back.
#[derive(Debug)]
pub struct Verification<'a> {
    _permit: SemaphorePermit<'a>,
    pool: &'a Mutex<Vec<Vec<Block>>>,
    /// Argon2's blocks: taken to the blocking task that verifies, and put back.
    pub memory: Vec<Block>,
}

impl Drop for Verification<'_> {
    fn drop(&mut self) {
        let memory = std::mem::take(&mut self.memory);
        if memory.capacity() > 0 {
            self.pool.lock().expect("memory pool lock").push(memory);
        }
    }
}

impl LoginThrottle {
    /// `verifications_max` argon2 checks at once; one per core keeps memory flat however many
    /// logins arrive together.
    pub fn new(verifications_max: usize) -> LoginThrottle {
        LoginThrottle {
            verifications: Semaphore::new(verifications_max.max(1)),
            memory: Mutex::default(),
            entries: Mutex::default(),
        }
    }

    /// A slot to run one password verification in.
    pub async fn verification(&self) -> Verification<'_> {
        let permit = self.verifications.acquire().await.expect("the semaphore is never closed");
        let memory = self.memory.lock().expect("memory pool lock").pop().unwrap_or_default();
        Verification { _permit: permit, pool: &self.memory, memory }
    }

    /// `Err(wait)` while any of `keys` is delayed.
    pub fn check(&self, keys: &[ThrottleKey], now: Instant) -> Result<(), Duration> {
        let entries = self.entries.lock().expect("throttle lock");
        let wait = keys
            .iter()
            .filter_map(|key| entries.get(key))
            .map(|entry| entry.blocked_until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Counts a failure against every key.
    pub fn failed(&self, keys: &[ThrottleKey], now: Instant) {
        let mut entries = self.entries.lock().expect("throttle lock");
        for key in keys {
            if !entries.contains_key(key) && entries.len() >= LOGIN_FAILURE_ENTRIES_MAX {
                make_room(&mut entries, now);
            }
            let entry =
                entries.entry(key.clone()).or_insert(Entry { failures: 0, last_failure: now, blocked_until: now });
            if now.duration_since(entry.last_failure) > LOGIN_FAILURES_FORGET_AFTER {
                entry.failures = 0;
            }
            entry.failures = entry.failures.saturating_add(1);
            entry.last_failure = now;
            if let Some(over) = entry.failures.checked_sub(LOGIN_FAILURES_FREE + 1) {
                let delay = LOGIN_DELAY_FIRST.saturating_mul(1u32 << over.min(16)).min(LOGIN_DELAY_MAX);
                entry.blocked_until = now + delay;
            }
        }
    }

    /// A successful login clears its username and source.
    pub fn succeeded(&self, keys: &[ThrottleKey]) {
        let mut entries = self.entries.lock().expect("throttle lock");
        for key in keys {
            entries.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

fn make_room(entries: &mut HashMap<ThrottleKey, Entry>, now: Instant) {
    entries.retain(|_, e| now.duration_since(e.last_failure) <= LOGIN_FAILURES_FORGET_AFTER);
    if entries.len() >= LOGIN_FAILURE_ENTRIES_MAX {
        if let Some(oldest) = entries.iter().min_by_key(|(_, e)| e.last_failure).map(|(k, _)| k.clone()) {
            entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<ThrottleKey> {
        vec![ThrottleKey::Source("10.0.0.5".parse().unwrap()), ThrottleKey::Username("admin".into())]
    }

    #[test]
    fn a_few_failures_cost_nothing_then_the_delay_doubles_up_to_the_max() {
        let throttle = LoginThrottle::new(2);
        let start = Instant::now();
        let mut now = start;
        for _ in 0..LOGIN_FAILURES_FREE {
            assert_eq!(throttle.check(&keys(), now), Ok(()));
            throttle.failed(&keys(), now);
        }
        assert_eq!(throttle.check(&keys(), now), Ok(()), "the free failures do not delay");
        let mut delays = Vec::new();
        for _ in 0..14 {
            throttle.failed(&keys(), now);
            let wait = throttle.check(&keys(), now).unwrap_err();
            delays.push(wait.as_secs());
            now += wait;
            assert_eq!(throttle.check(&keys(), now), Ok(()), "after the wait a try is allowed");
        }
        assert_eq!(&delays[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(*delays.last().unwrap(), LOGIN_DELAY_MAX.as_secs());
    }

    #[test]
    fn a_delayed_username_is_delayed_from_every_source_and_success_clears_it() {
        let throttle = LoginThrottle::new(2);
        let now = Instant::now();
        for _ in 0..=LOGIN_FAILURES_FREE {
            throttle.failed(&keys(), now);
        }
        let elsewhere = vec![ThrottleKey::Source("10.9.9.9".parse().unwrap()), ThrottleKey::Username("admin".into())];
        assert!(throttle.check(&elsewhere, now).is_err());
        let other_user = vec![ThrottleKey::Source("10.9.9.9".parse().unwrap()), ThrottleKey::Username("op".into())];
        assert_eq!(throttle.check(&other_user, now), Ok(()));
        throttle.succeeded(&keys());
        assert_eq!(throttle.check(&elsewhere, now), Ok(()));
    }

    #[test]
    fn failures_are_forgotten_after_an_hour_and_the_table_is_bounded() {
        let throttle = LoginThrottle::new(2);
        let now = Instant::now();
        for _ in 0..=LOGIN_FAILURES_FREE {
            throttle.failed(&keys(), now);
        }
        let later = now + LOGIN_FAILURES_FORGET_AFTER + Duration::from_secs(1);
        throttle.failed(&keys(), later);
        assert_eq!(throttle.check(&keys(), later), Ok(()), "an old run of failures no longer counts");
        for i in 0..LOGIN_FAILURE_ENTRIES_MAX as u32 + 100 {
            throttle.failed(&[ThrottleKey::Source(IpAddr::from(std::net::Ipv4Addr::from(i)))], later);
        }
        assert!(throttle.len() <= LOGIN_FAILURE_ENTRIES_MAX);
    }
}
