//! The pure part of sending boot events, no I/O: fields cut to the wire's named lengths, a
//! batch bounded by count and bytes, and the order in which a refused batch is split in halves
//! until the one event the region will not take is found and dropped.

use std::ops::Range;

use metalrack_api::machines::{BOOT_EVENTS_BATCH_BYTES_MAX, BOOT_EVENTS_PER_REQUEST_MAX};

/// Marks a field that was cut: one character, 3 bytes of UTF-8.
pub const TRUNCATION_MARK: char = '…';

/// Cuts `text` to at most `max_bytes` bytes, on a char boundary, ending in [`TRUNCATION_MARK`].
/// Returns whether it cut.
pub fn truncate_field(text: &mut String, max_bytes: usize) -> bool {
    if text.len() <= max_bytes {
        return false;
    }
    let mut end = max_bytes.saturating_sub(TRUNCATION_MARK.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push(TRUNCATION_MARK);
    debug_assert!(text.len() <= max_bytes);
    true
}

/// How many events from the front of a queue, given their JSON lengths in order, make one
/// request: at most [`BOOT_EVENTS_PER_REQUEST_MAX`], and at most [`BOOT_EVENTS_BATCH_BYTES_MAX`]
/// of body (`[`, the events, a comma between each, `]`). At least one when there is one: every
/// event fits a batch alone (its fields are cut to lengths whose worst JSON fits, asserted in the
/// wire contract).
pub fn batch_len(json_lens: impl IntoIterator<Item = usize>) -> usize {
    batch_len_within(json_lens, BOOT_EVENTS_PER_REQUEST_MAX, BOOT_EVENTS_BATCH_BYTES_MAX)
}

fn batch_len_within(json_lens: impl IntoIterator<Item = usize>, count_max: usize, bytes_max: usize) -> usize {
    let mut body_bytes = 2; // [ and ]
    let mut count = 0;
    for json_len in json_lens.into_iter().take(count_max) {
        let with_comma = json_len + usize::from(count > 0);
        if body_bytes + with_comma > bytes_max {
            assert!(count > 0, "one boot event of {json_len} bytes exceeds a batch of {bytes_max}");
            break;
        }
        body_bytes += with_comma;
        count += 1;
    }
    count
}

/// The bytes of the JSON array of events with these lengths, as `batch_len` counts them.
pub fn body_bytes(json_lens: impl IntoIterator<Item = usize>) -> usize {
    let (count, sum) = json_lens.into_iter().fold((0usize, 0), |(count, sum), len| (count + 1, sum + len));
    2 + sum + count.saturating_sub(1)
}

/// What to send of a batch, front first: the whole batch, then, after a refusal, each half of
/// the refused part (the front half first), down to single events. Every event is sent in its
/// turn, so the region receives them in order; one bad event costs ~2·log2(batch) requests and
/// itself, never the others.
#[derive(Debug)]
pub struct Splitter {
    /// Parts still to send, as index ranges into the batch; the next is the last.
    pending: Vec<Range<usize>>,
}

/// What a refusal of the current part means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The part was split; its halves are sent next.
    Split,
    /// The part was this one event: it is dropped.
    Drop(usize),
}

impl Splitter {
    pub fn new(batch_len: usize) -> Splitter {
        let mut pending = Vec::new();
        if batch_len > 0 {
            pending.push(0..batch_len);
        }
        Splitter { pending }
    }

    /// The part to send next, or `None` when the batch is done.
    pub fn next(&self) -> Option<Range<usize>> {
        self.pending.last().cloned()
    }

    /// The region took the current part.
    pub fn accepted(&mut self) {
        self.pending.pop().expect("a part was being sent");
    }

    /// The region refused the current part for what it holds.
    pub fn refused(&mut self) -> Refused {
        let part = self.pending.pop().expect("a part was being sent");
        if part.len() == 1 {
            return Refused::Drop(part.start);
        }
        let middle = part.start + part.len() / 2;
        self.pending.push(middle..part.end);
        self.pending.push(part.start..middle);
        Refused::Split
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_cut_on_a_char_boundary_and_marked() {
        let mut short = "TFTP pxelinux.0".to_owned();
        assert!(!truncate_field(&mut short, 64));
        assert_eq!(short, "TFTP pxelinux.0");
        let mut exact = "x".repeat(64);
        assert!(!truncate_field(&mut exact, 64), "at the limit is not cut");
        let mut long = "x".repeat(1000);
        assert!(truncate_field(&mut long, 64));
        assert_eq!(long, format!("{}…", "x".repeat(61)));
        assert_eq!(long.len(), 64);
        // 'é' is 2 bytes: a cut at 61 bytes would split one, so the cut moves back to 60.
        let mut accented = "é".repeat(100);
        assert!(truncate_field(&mut accented, 64));
        assert_eq!(accented, format!("{}…", "é".repeat(30)));
        assert!(accented.len() <= 64);
        for max in 3..40 {
            let mut text = "日本語のファイル名".repeat(5);
            truncate_field(&mut text, max);
            assert!(text.len() <= max && text.ends_with('…'), "{max}: {text:?}");
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_by_bytes() {
        assert_eq!(batch_len(std::iter::empty()), 0);
        // Small events: the count bound.
        assert_eq!(batch_len(std::iter::repeat_n(20, 5000)), BOOT_EVENTS_PER_REQUEST_MAX);
        // ~150-byte events: the byte bound, with the brackets and commas counted.
        let n = batch_len(std::iter::repeat_n(150, 5000));
        assert!(body_bytes(std::iter::repeat_n(150, n)) <= BOOT_EVENTS_BATCH_BYTES_MAX);
        assert!(body_bytes(std::iter::repeat_n(150, n + 1)) > BOOT_EVENTS_BATCH_BYTES_MAX);
        // Exactly full: [a,b] is 2 + 4 + 1 bytes.
        assert_eq!(batch_len_within([2, 2, 2], 10, 7), 2);
        assert_eq!(batch_len_within([2, 2, 2], 10, 6), 1);
        assert_eq!(batch_len_within([2, 2, 2], 1, 100), 1);
        // What follows a big event waits for the next batch.
        assert_eq!(batch_len_within([10, 80, 10], 10, 60), 1);
        assert_eq!(batch_len_within([80, 10], 10, 200), 2);
    }

    #[test]
    #[should_panic(expected = "exceeds a batch")]
    fn an_event_larger_than_a_batch_is_a_bug_not_a_silent_stall() {
        batch_len_within([100], 10, 50);
    }

    /// Sends a batch to a pretend region that refuses any part holding a poisoned event; returns
    /// what it accepted, in order, what was dropped, and the number of requests.
    fn run(batch_len: usize, poisoned: &[usize]) -> (Vec<usize>, Vec<usize>, usize) {
        let mut splitter = Splitter::new(batch_len);
        let (mut accepted, mut dropped, mut requests) = (Vec::new(), Vec::new(), 0);
        while let Some(part) = splitter.next() {
            requests += 1;
            assert!(requests < 10 * batch_len + 10, "never ends");
            if part.clone().any(|i| poisoned.contains(&i)) {
                if let Refused::Drop(i) = splitter.refused() {
                    dropped.push(i);
                }
            } else {
                accepted.extend(part);
                splitter.accepted();
            }
        }
        (accepted, dropped, requests)
    }

    #[test]
    fn a_refused_batch_is_split_until_only_the_bad_event_is_dropped() {
        let (accepted, dropped, requests) = run(300, &[]);
        assert_eq!((accepted, dropped, requests), ((0..300).collect(), vec![], 1));

        let (accepted, dropped, requests) = run(300, &[137]);
        assert_eq!(accepted, (0..300).filter(|i| *i != 137).collect::<Vec<_>>(), "the others, in order");
        assert_eq!(dropped, [137]);
        // Halving 300 to 1 takes 9 refusals; each level also sends the good half once.
        assert!(requests <= 2 * 9 + 1, "{requests} requests");

        let (accepted, dropped, _) = run(1, &[0]);
        assert_eq!((accepted, dropped), (vec![], vec![0]));

        for poisoned in [vec![0], vec![299], vec![0, 1, 2], vec![5, 150, 299], (0..300).collect()] {
            let (accepted, dropped, _) = run(300, &poisoned);
            assert_eq!(dropped, poisoned);
            assert_eq!(accepted, (0..300).filter(|i| !poisoned.contains(i)).collect::<Vec<_>>());
        }
    }
}
