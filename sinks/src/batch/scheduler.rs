//! Which events of a batch go out in which request: at most one event per key in flight,
//! in key order; at most `max_entries` entries and `max_bytes` per request; a failed entry
//! waits out its own backoff, or the wait the service asked for when longer.
//!
//! Invariants:
//! - An event is handed out only when every earlier event of its key is settled
//!   (acknowledged or rejected), so a retried event can never land after a later one of its
//!   key.
//! - `idle` (and `idle_by_time`) hold exactly the heads of the keys (their first unsettled
//!   event) that are not in flight, so choosing a request and finding the next wake-up cost
//!   what is chosen, not a walk over every key of the batch.

use super::{ATTEMPTS_PER_SEND, FIRST_BACKOFF, MAX_BACKOFF};
use crate::{Backoff, EventState};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct Slot<E> {
    /// The request entry; `None` for an event settled before sending.
    pub(super) entry: Option<E>,
    /// The entry's size as the service counts it against its request limit.
    size: usize,
    /// Index of the event's key in [`Scheduler::groups`].
    group: usize,
    pub(super) state: EventState,
    /// In a request that has not answered yet.
    in_flight: bool,
    /// Failures in this `send`.
    failures: u32,
    /// The wait before its next attempt after a failure.
    backoff: Backoff,
    not_before: Instant,
    /// Sent alone: a request holding it was refused as a whole as invalid.
    alone: bool,
}

/// What one finished request means for its entries.
pub(super) enum Outcome {
    Acknowledged,
    /// Retry after the backoff, or after the given wait when it is longer.
    Retry(String, Option<Duration>),
    Reject(String),
}

/// Decides which events go out in which request: at most one event per key in flight, in
/// key order; at most 10 entries and `max_bytes` per request.
pub(super) struct Scheduler<E> {
    pub(super) slots: Vec<Slot<E>>,
    /// The events of each key, in batch order, and how many of them are done.
    groups: Vec<(Vec<usize>, usize)>,
    /// The heads not in flight, in batch order.
    idle: BTreeSet<usize>,
    /// The same heads, by the time they may go.
    idle_by_time: BTreeSet<(Instant, usize)>,
    /// How many keys have an unsettled event.
    open: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<E> Scheduler<E> {
    /// `entries`: each event's entry and its size (`None` when already settled) and state;
    /// `limits`: most entries and most bytes per request.
    pub(super) fn new(
        entries: Vec<(Option<(E, usize)>, EventState)>,
        keys: &[&str],
        (max_entries, max_bytes): (usize, usize),
    ) -> Self {
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
        let now = Instant::now();
        let slots = entries
            .into_iter()
            .zip(keys)
            .enumerate()
            .map(|(index, ((entry, state), key))| {
                let group = *group_of.entry(key).or_insert_with(|| {
                    groups.push((Vec::new(), 0));
                    groups.len() - 1
                });
                groups[group].0.push(index);
                let (entry, size) = match entry {
                    Some((entry, size)) => (Some(entry), size),
                    None => (None, 0),
                };
                Slot {
                    entry,
                    size,
                    group,
                    state,
                    in_flight: false,
                    failures: 0,
                    backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
                    not_before: now,
                    alone: false,
                }
            })
            .collect();
        let open = groups.len();
        let mut scheduler = Scheduler {
            slots,
            groups,
            idle: BTreeSet::new(),
            idle_by_time: BTreeSet::new(),
            open,
            max_entries,
            max_bytes,
        };
        for group in 0..scheduler.groups.len() {
            scheduler.advance(group);
        }
        scheduler
    }

    /// Moves the group's cursor past its finished events, and makes its head idle.
    fn advance(&mut self, group: usize) {
        let (members, done) = &mut self.groups[group];
        let was_open = *done < members.len();
        while *done < members.len() && self.slots[members[*done]].state.is_settled() {
            *done += 1;
        }
        match members.get(*done).copied() {
            Some(head) if !self.slots[head].in_flight => {
                self.idle.insert(head);
                self.idle_by_time
                    .insert((self.slots[head].not_before, head));
            }
            Some(_) => {}
            None if was_open => self.open -= 1,
            None => {}
        }
    }

    pub(super) fn all_done(&self) -> bool {
        self.open == 0
    }

    /// The events of the next request among those ready at `now`, marked in flight; empty
    /// when none is ready.
    pub(super) fn next_request(&mut self, now: Instant) -> Vec<usize> {
        let slots = &self.slots;
        let ready = self
            .idle
            .iter()
            .copied()
            .filter(|&i| slots[i].not_before <= now);
        let request = pack(
            ready.map(|i| (i, slots[i].size, slots[i].alone)),
            self.max_entries,
            self.max_bytes,
        );
        for &i in &request {
            self.idle.remove(&i);
            self.idle_by_time.remove(&(self.slots[i].not_before, i));
            self.slots[i].in_flight = true;
        }
        request
    }

    /// When the earliest pending head becomes ready.
    pub(super) fn next_ready(&self) -> Option<Instant> {
        self.idle_by_time.first().map(|(time, _)| *time)
    }

    /// Records the outcome of an event that was in flight; returns whether it has now failed
    /// too often in this `send`.
    pub(super) fn finish(&mut self, index: usize, outcome: Outcome, now: Instant) -> bool {
        // A lone event refused as invalid was made idle by `isolate` and is finished at once.
        self.idle.remove(&index);
        self.idle_by_time
            .remove(&(self.slots[index].not_before, index));
        let slot = &mut self.slots[index];
        let mut exhausted = false;
        slot.in_flight = false;
        match outcome {
            Outcome::Acknowledged => slot.state = EventState::Acked,
            Outcome::Reject(reason) => slot.state = EventState::Rejected(reason),
            Outcome::Retry(_, asked) => {
                slot.failures += 1;
                let backoff = slot.backoff.next_delay();
                slot.not_before = now + asked.map_or(backoff, |asked| asked.max(backoff));
                exhausted = slot.failures >= ATTEMPTS_PER_SEND;
            }
        }
        let group = slot.group;
        self.advance(group);
        exhausted
    }

    /// A request refused as a whole as invalid: its events go again one per request, so
    /// only the one at fault is rejected. Returns whether the request held a single event.
    pub(super) fn isolate(&mut self, request: &[usize]) -> bool {
        for &i in request {
            self.slots[i].in_flight = false;
            self.slots[i].alone = true;
            self.idle.insert(i);
            self.idle_by_time.insert((self.slots[i].not_before, i));
        }
        request.len() == 1
    }
}

/// Packs one request from `candidates` (index, entry size, must go alone), taken in order:
/// each one that still fits goes in, up to `max_entries` and `max_bytes`.
fn pack(
    candidates: impl Iterator<Item = (usize, usize, bool)>,
    max_entries: usize,
    max_bytes: usize,
) -> Vec<usize> {
    let mut request = Vec::new();
    let mut bytes = 0;
    for (index, size, alone) in candidates {
        if alone {
            if request.is_empty() {
                return vec![index];
            }
            continue;
        }
        if bytes + size <= max_bytes {
            request.push(index);
            bytes += size;
            if request.len() == max_entries {
                break;
            }
        }
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;
    const LIMITS: (usize, usize) = (10, DEFAULT_MAX_REQUEST_BYTES);

    #[test]
    fn packing_stops_at_ten_entries() {
        let candidates = (0..25).map(|i| (i, 100, false));
        assert_eq!(
            pack(candidates, 10, DEFAULT_MAX_REQUEST_BYTES),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn packing_respects_the_byte_limit_exactly() {
        let max = DEFAULT_MAX_REQUEST_BYTES;
        // Exactly at the limit: both fit.
        assert_eq!(
            pack(
                [(0, max - 1000, false), (1, 1000, false)].into_iter(),
                10,
                max
            ),
            [0, 1]
        );
        // One byte over: the second waits for the next request, a smaller one still fits.
        assert_eq!(
            pack(
                [(0, max - 1000, false), (1, 1001, false), (2, 1000, false)].into_iter(),
                10,
                max
            ),
            [0, 2]
        );
        // A maximal entry goes alone.
        assert_eq!(
            pack([(0, max, false), (1, 1, false)].into_iter(), 10, max),
            [0]
        );
    }

    #[test]
    fn isolated_entries_travel_alone() {
        let max = DEFAULT_MAX_REQUEST_BYTES;
        assert_eq!(
            pack([(0, 10, true), (1, 10, false)].into_iter(), 10, max),
            [0]
        );
        assert_eq!(
            pack(
                [(0, 10, false), (1, 10, true), (2, 10, false)].into_iter(),
                10,
                max
            ),
            [0, 2]
        );
    }

    fn scheduler(keys: &[&str], size: usize) -> Scheduler<()> {
        let entries = keys
            .iter()
            .map(|_| (Some(((), size)), EventState::Pending))
            .collect();
        Scheduler::new(entries, keys, LIMITS)
    }

    #[test]
    fn one_event_per_key_in_flight_and_keys_in_parallel() {
        let mut s = scheduler(&["a", "a", "b", "c", "b"], 100);
        let now = Instant::now();
        assert_eq!(s.next_request(now), [0, 2, 3]);
        assert!(
            s.next_request(now).is_empty(),
            "a and b already have an event in flight"
        );
        // b's first event fails for now: b's second must wait for it, even though a retry
        // is pending and the request with it would be quicker.
        s.finish(2, Outcome::Retry("ThrottlingException".into(), None), now);
        s.finish(0, Outcome::Acknowledged, now);
        s.finish(3, Outcome::Reject("MalformedDetail".into()), now);
        assert_eq!(
            s.next_request(now),
            [1],
            "event 2 backs off; event 4 waits behind it"
        );
        let later = s.next_ready().unwrap();
        assert!(later > now);
        assert_eq!(s.next_request(later), [2]);
        s.finish(2, Outcome::Acknowledged, later);
        s.finish(1, Outcome::Acknowledged, later);
        assert_eq!(s.next_request(later), [4]);
        s.finish(4, Outcome::Acknowledged, later);
        assert!(s.all_done());
    }

    #[test]
    fn requests_split_by_size_across_keys() {
        let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        // 100 KiB entries: two per request, never ten.
        let mut s = scheduler(&keys, 100 * 1024);
        let now = Instant::now();
        let mut requests = Vec::new();
        loop {
            let request = s.next_request(now);
            if request.is_empty() {
                break;
            }
            requests.push(request);
        }
        assert_eq!(requests.len(), 15);
        assert!(requests.iter().all(|r| r.len() == 2));
    }

    #[test]
    fn an_event_fails_a_bounded_number_of_times_per_send() {
        let mut s = scheduler(&["a"], 10);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for attempt in 1..=ATTEMPTS_PER_SEND {
            assert_eq!(s.next_request(now), [0]);
            let exhausted = s.finish(0, Outcome::Retry("ThrottlingException".into(), None), now);
            assert_eq!(exhausted, attempt == ATTEMPTS_PER_SEND);
            let ready = s.next_ready().unwrap();
            waits.push(ready - now);
            now = ready;
        }
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert!(waits.iter().all(|wait| *wait <= MAX_BACKOFF), "{waits:?}");
    }

    #[test]
    fn settled_events_are_skipped_and_isolated_ones_come_back_one_by_one() {
        let keys = ["a", "a", "b", "c"];
        let entries = vec![
            (None, EventState::Acked),
            (Some(((), 10)), EventState::Pending),
            (Some(((), 10)), EventState::Pending),
            (None, EventState::Rejected("before".into())),
        ];
        let mut s = Scheduler::new(entries, &keys, LIMITS);
        let now = Instant::now();
        assert!(!s.all_done());
        assert_eq!(s.next_request(now), [1, 2]);
        assert!(!s.isolate(&[1, 2]), "two events: not yet the one at fault");
        assert_eq!(s.next_request(now), [1], "alone");
        assert_eq!(s.next_request(now), [2], "alone");
        s.finish(1, Outcome::Acknowledged, now);
        assert!(!s.all_done());
        s.finish(
            2,
            Outcome::Retry("later".into(), Some(Duration::from_secs(7))),
            now,
        );
        assert_eq!(
            s.next_ready(),
            Some(now + Duration::from_secs(7)),
            "the wait asked for"
        );
        assert!(s.next_request(now).is_empty());
        let later = now + Duration::from_secs(7);
        assert_eq!(s.next_request(later), [2]);
        s.finish(2, Outcome::Acknowledged, later);
        assert!(s.all_done());
        assert_eq!(s.next_ready(), None);
    }

    #[test]
    fn a_lone_event_refused_as_invalid_is_rejected_and_never_handed_out_again() {
        let mut s = scheduler(&["a", "a", "b"], 10);
        let now = Instant::now();
        assert_eq!(s.next_request(now), [0, 2]);
        assert!(!s.isolate(&[0, 2]));
        assert_eq!(s.next_request(now), [0]);
        assert!(s.isolate(&[0]), "alone: the one at fault");
        s.finish(0, Outcome::Reject("invalid".into()), now);
        assert_eq!(
            s.next_request(now),
            [1],
            "a's next event, not the rejected one"
        );
        assert_eq!(s.next_request(now), [2]);
        s.finish(1, Outcome::Acknowledged, now);
        s.finish(2, Outcome::Acknowledged, now);
        assert!(s.all_done());
        assert!(s.next_request(now).is_empty());
    }
}
