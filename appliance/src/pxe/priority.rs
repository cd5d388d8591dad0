//! New connections first: while a freshly accepted HTTP boot connection waits for its first
//! response, streams that have had their turn step aside.
//!
//! When a rack of machines powers on, hundreds of connections arrive within milliseconds while
//! earlier machines are streaming images. Every stream is always ready to send more (the socket
//! has room), so tokio's run queues are full of them, and a new connection's task, woken when its
//! request arrives, waited behind thousands of stream turns: bench_pxe at 256 clients measured
//! 50-100 ms between the wake and the poll that read the request. nginx answers from one event
//! loop iteration. Here, a stream that has just sent a chunk checks whether any connection is
//! fresh (accepted, not yet answered); if so it parks instead of yielding, and the run queue holds
//! only the new connections until they have written their first bytes.
//!
//! Bounds, so that clients that connect and never ask cannot starve the streams: a connection is
//! fresh for at most [`FRESH_FOR`]; parked streams are all woken once the oldest has waited
//! [`PAUSE_MAX`]; and a stream spends at most half its time parked (after a pause it may not
//! park again for as long as it waited).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How long a new connection takes precedence over streams if it has not been answered.
pub const FRESH_FOR: Duration = Duration::from_millis(100);

/// Longest a stream stays parked while connections keep arriving.
pub const PAUSE_MAX: Duration = Duration::from_millis(100);

/// The fresh connections of one HTTP server and the streams parked for them.
#[derive(Debug, Default)]
pub struct FirstResponses {
    fresh: AtomicUsize,
    parked: Mutex<Parked>,
    /// Bumped (under the `parked` lock) each time the parked streams are woken, so that a
    /// stream polled for another reason can tell it is still parked.
    wakeups: AtomicU64,
}

#[derive(Debug, Default)]
struct Parked {
    wakers: Vec<Waker>,
    /// When the first of `wakers` parked.
    since: Option<Instant>,
}

impl FirstResponses {
    /// Counts a just-accepted connection as fresh until its [`Fresh`] is released.
    pub fn admit(self: &Arc<Self>) -> Fresh {
        self.fresh.fetch_add(1, Ordering::AcqRel);
        self.wake_if_paused_too_long();
        Fresh { shared: self.clone(), released: AtomicBool::new(false) }
    }

    /// Connections accepted and not yet answered (nor expired).
    pub fn fresh(&self) -> usize {
        self.fresh.load(Ordering::Acquire)
    }

    /// For a stream that has had its turn: `None` to go on (no connection is fresh), or the task
    /// is parked until none is (or [`PAUSE_MAX`] passes) and the wake-up count it waits to see
    /// change is returned (for [`FirstResponses::still_parked`]).
    fn park(&self, cx: &mut Context<'_>) -> Option<u64> {
        if self.fresh() == 0 {
            return None;
        }
        let mut parked = self.parked.lock().expect("lock");
        // Checked again under the lock: `release` takes the lock after the count reaches zero,
        // so a waker pushed here is always woken.
        if self.fresh() == 0 {
            return None;
        }
        if self.wake_all_if_paused_too_long(&mut parked) {
            return None;
        }
        parked.since.get_or_insert_with(Instant::now);
        parked.wakers.push(cx.waker().clone());
        Some(self.wakeups.load(Ordering::Acquire))
    }

    /// Whether a stream that parked when the count was `wakeups` has not been woken since.
    fn still_parked(&self, wakeups: u64) -> bool {
        self.wake_if_paused_too_long();
        self.wakeups.load(Ordering::Acquire) == wakeups
    }

    fn wake_all(&self, parked: &mut Parked) {
        self.wakeups.fetch_add(1, Ordering::AcqRel);
        std::mem::take(parked).wakers.into_iter().for_each(Waker::wake);
    }

    fn release(&self) {
        if self.fresh.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_all(&mut self.parked.lock().expect("lock"));
        } else {
            self.wake_if_paused_too_long();
        }
    }

    fn wake_if_paused_too_long(&self) {
        self.wake_all_if_paused_too_long(&mut self.parked.lock().expect("lock"));
    }

    /// Connections keep arriving: once the first parked stream has waited PAUSE_MAX, every
    /// parked stream gets a turn.
    fn wake_all_if_paused_too_long(&self, parked: &mut Parked) -> bool {
        let too_long = parked.since.is_some_and(|since| since.elapsed() >= PAUSE_MAX);
        if too_long {
            self.wake_all(parked);
        }
        too_long
    }

    #[cfg(test)]
    fn parked(&self) -> usize {
        self.parked.lock().expect("lock").wakers.len()
    }
}

/// A connection's claim to go first; released on its first write, when it ends, or when
/// [`FRESH_FOR`] has passed, whichever comes first (once).
#[derive(Debug)]
pub struct Fresh {
    shared: Arc<FirstResponses>,
    released: AtomicBool,
}

impl Fresh {
    /// The server's fresh connections, which this one's stream later steps aside for.
    pub fn first_responses(&self) -> &FirstResponses {
        &self.shared
    }

    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.shared.release();
        }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.release();
    }
}

/// What a stream remembers between chunks to keep its pauses at most half its time.
#[derive(Debug, Default)]
pub struct Turns {
    /// Set while parked: when the pause began and the wake-up count it waits to see change.
    parked: Option<(Instant, u64)>,
    /// No parking before this (the end of a pause plus its length).
    park_again_after: Option<Instant>,
}

impl Turns {
    /// Called before a stream sends its next chunk. `Ready(true)`: it was parked and may send
    /// at once; `Ready(false)`: it should yield as usual; `Pending`: it is parked.
    pub fn poll_next_chunk(&mut self, shared: &FirstResponses, cx: &mut Context<'_>) -> Poll<bool> {
        let now = Instant::now();
        if let Some((at, wakeups)) = self.parked {
            if shared.still_parked(wakeups) {
                // Polled for another reason; its waker is still among the parked.
                return Poll::Pending;
            }
            self.parked = None;
            self.park_again_after = Some(now + now.duration_since(at));
            return Poll::Ready(true);
        }
        if self.park_again_after.is_some_and(|after| now < after) {
            return Poll::Ready(false);
        }
        match shared.park(cx) {
            None => Poll::Ready(false),
            Some(wakeups) => {
                self.parked = Some((now, wakeups));
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn streams_go_on_when_no_connection_is_fresh() {
        let shared = Arc::new(FirstResponses::default());
        let (_, w) = waker();
        let mut turns = Turns::default();
        assert_eq!(turns.poll_next_chunk(&shared, &mut Context::from_waker(&w)), Poll::Ready(false));
        assert_eq!(shared.parked(), 0);
    }

    #[test]
    fn streams_park_while_a_connection_is_fresh_and_wake_when_it_is_answered() {
        let shared = Arc::new(FirstResponses::default());
        let fresh = shared.admit();
        let (count, w) = waker();
        let mut turns = Turns::default();
        assert!(turns.poll_next_chunk(&shared, &mut Context::from_waker(&w)).is_pending());
        assert_eq!(shared.parked(), 1);
        fresh.release();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken when the last fresh connection is answered");
        assert_eq!(shared.fresh(), 0);
        // Back from the pause: sends at once instead of yielding again.
        assert_eq!(turns.poll_next_chunk(&shared, &mut Context::from_waker(&w)), Poll::Ready(true));
        fresh.release();
        assert_eq!(shared.fresh(), 0, "a second release counts nothing");
    }

    #[test]
    fn dropping_an_unanswered_connection_releases_it() {
        let shared = Arc::new(FirstResponses::default());
        let (a, b) = (shared.admit(), shared.admit());
        let (count, w) = waker();
        assert!(shared.park(&mut Context::from_waker(&w)).is_some());
        drop(a);
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "one connection is still fresh");
        drop(b);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_stream_polled_for_another_reason_stays_parked() {
        let shared = Arc::new(FirstResponses::default());
        let fresh = shared.admit();
        let (_, w) = waker();
        let mut turns = Turns::default();
        let cx = &mut Context::from_waker(&w);
        assert!(turns.poll_next_chunk(&shared, cx).is_pending());
        assert!(turns.poll_next_chunk(&shared, cx).is_pending(), "not woken: still parked");
        assert_eq!(shared.parked(), 1, "parked once");
        drop(fresh);
        assert_eq!(turns.poll_next_chunk(&shared, cx), Poll::Ready(true));
    }

    #[test]
    fn a_stream_parks_at_most_half_its_time() {
        let shared = Arc::new(FirstResponses::default());
        let first = shared.admit();
        let (_, w) = waker();
        let mut turns = Turns::default();
        let cx = &mut Context::from_waker(&w);
        assert!(turns.poll_next_chunk(&shared, cx).is_pending());
        std::thread::sleep(Duration::from_millis(20));
        drop(first);
        assert_eq!(turns.poll_next_chunk(&shared, cx), Poll::Ready(true), "woken: sends");
        // For as long as it was parked, it only yields, even though a connection is fresh again.
        let _second = shared.admit();
        assert_eq!(turns.poll_next_chunk(&shared, cx), Poll::Ready(false));
        assert_eq!(turns.poll_next_chunk(&shared, cx), Poll::Ready(false));
        let deadline = Instant::now() + Duration::from_secs(5);
        while turns.poll_next_chunk(&shared, cx).is_ready() {
            assert!(Instant::now() < deadline, "never parked again");
            std::thread::yield_now();
        }
    }

    #[test]
    fn parked_streams_get_a_turn_when_connections_keep_arriving() {
        let shared = Arc::new(FirstResponses::default());
        let mut kept = vec![shared.admit()];
        let (count, w) = waker();
        assert!(shared.park(&mut Context::from_waker(&w)).is_some());
        let deadline = Instant::now() + PAUSE_MAX * 20;
        // Each new connection arrives before the previous one is answered: `fresh` never drops
        // to zero, yet the parked stream is woken once it has waited PAUSE_MAX.
        while count.0.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the parked stream was never woken");
            kept.push(shared.admit());
            kept.remove(0);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(shared.fresh() > 0);
    }
}
