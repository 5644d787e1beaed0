//! The acknowledgement rule, in one place: the slot is confirmed only up to
//! the end of the last transaction all of whose changes are complete
//! (written back or dead-lettered, durably).
//!
//! Why this is safe: a logical slot re-sends, after a restart, every
//! transaction whose commit lies after `confirmed_flush_lsn`. Boundaries are
//! recorded in stream order at transaction ends (and at keepalives received
//! outside a transaction, whose position the server has already sent: a
//! transaction committing later arrives later), so a confirmed
//! boundary `b` is never past the commit of a change that is still pending:
//! that change was registered before `b` was recorded only if its
//! transaction ended at or before `b`, and then `b` is not passed while it is
//! pending. Everything after the confirmed position is replayed.

use std::collections::{BTreeSet, VecDeque};

use crate::core::change::Lsn;

/// Confirms the highest LSN below which every change is complete.
#[derive(Debug, Default)]
pub struct AckTracker {
    next_seq: u64,
    pending: BTreeSet<u64>,
    /// (first sequence number after the transaction, its end LSN), in stream order.
    boundaries: VecDeque<(u64, Lsn)>,
    confirmed: Lsn,
}

impl AckTracker {
    pub fn register(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(seq);
        seq
    }

    /// Everything registered so far belongs to transactions ending at or before `lsn`.
    pub fn boundary(&mut self, lsn: Lsn) {
        self.boundaries.push_back((self.next_seq, lsn));
    }

    pub fn complete(&mut self, seq: u64) {
        self.pending.remove(&seq);
    }

    /// The new confirmed LSN, if it moved.
    pub fn advance(&mut self) -> Option<Lsn> {
        let lowest_pending = self.pending.first().copied().unwrap_or(self.next_seq);
        let before = self.confirmed;
        while let Some(&(bound, lsn)) = self.boundaries.front() {
            if bound > lowest_pending {
                break;
            }
            self.confirmed = self.confirmed.max(lsn);
            self.boundaries.pop_front();
        }
        (self.confirmed > before).then_some(self.confirmed)
    }

    pub fn is_pending(&self, seq: u64) -> bool {
        self.pending.contains(&seq)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_waits_for_the_oldest_pending_change() {
        let mut t = AckTracker::default();
        let a = t.register();
        t.boundary(100);
        let b = t.register();
        t.boundary(200);
        t.boundary(250); // an empty transaction
        assert_eq!(t.advance(), None);
        t.complete(b);
        assert_eq!(t.advance(), None, "a is still pending");
        t.complete(a);
        assert_eq!(t.advance(), Some(250));
        assert_eq!(t.advance(), None);
    }

    #[test]
    fn ack_moves_per_completed_transaction() {
        let mut t = AckTracker::default();
        let a = t.register();
        t.boundary(100);
        let _b = t.register();
        t.boundary(200);
        t.complete(a);
        assert_eq!(t.advance(), Some(100));
        t.boundary(300);
        assert_eq!(t.advance(), None);
    }

    #[test]
    fn empty_stream_positions_are_confirmed() {
        let mut t = AckTracker::default();
        t.boundary(42);
        assert_eq!(t.advance(), Some(42));
    }
}
