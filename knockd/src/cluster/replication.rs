//! Where each cluster grant stands between this node and etcd: one map,
//! one state per grant, and the decisions that follow from it. No I/O: the
//! daemon asks, acts on the answer (a write for the cluster task, a close
//! for its kernel), and tells what happened.
//!
//! The states are exclusive, so they are one enum rather than the four
//! collections they once were (kept consistent by hand):
//! - [`State::Pending`]: we published it and etcd has not confirmed; a
//!   delete the watch shows meanwhile is older than our write;
//! - [`State::At`]: its latest write etcd has, at that revision;
//! - [`State::Unpublished`]: ours, and etcd never heard of it (made while
//!   etcd was out of reach, or its write failed): published at the next
//!   resynchronisation or change, and never closed for being absent from
//!   etcd;
//! - [`State::Unwithdrawn`]: we ended it and etcd refused the delete: a
//!   resynchronisation deletes it again rather than install it.

use std::collections::HashMap;

/// A cluster grant: its door, source and device.
pub type GrantKey = crate::grants::Holder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    At(i64),
    Unpublished,
    Unwithdrawn,
}

/// What to do with a change of one of our grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Write its current state to etcd.
    Put,
    /// Delete it from etcd.
    Delete,
    /// Nothing now: etcd is out of reach and never had it; the
    /// resynchronisation publishes it.
    Later,
}

/// What a resynchronisation does with a grant etcd lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// Install it (or keep ours).
    Apply,
    /// We ended it and etcd refused the delete: delete it again.
    DeleteAgain,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Replication {
    states: HashMap<GrantKey, State>,
}

impl Replication {
    pub fn state(&self, key: &GrantKey) -> Option<State> {
        self.states.get(key).copied()
    }

    /// A grant this node made without etcd's word (a door's
    /// `on_cluster_unavailable: local`).
    pub fn made_without_etcd(&mut self, key: GrantKey) {
        self.states.insert(key, State::Unpublished);
    }

    /// One of our grants changed: `held` whether it still exists here,
    /// `synced` whether etcd is followed now.
    pub fn changed(&mut self, key: GrantKey, held: bool, synced: bool) -> Publish {
        if !held {
            self.states.remove(&key);
            return Publish::Delete;
        }
        if !synced && self.state(&key) == Some(State::Unpublished) {
            return Publish::Later;
        }
        self.states.insert(key, State::Pending);
        Publish::Put
    }

    /// etcd took our write at `revision`.
    pub fn written(&mut self, key: &GrantKey, revision: i64) {
        if let Some(state) = self.states.get_mut(key)
            && *state == State::Pending
        {
            *state = State::At(revision);
        }
    }

    /// Our write failed: unless a later one is on its way, etcd lacks a
    /// grant this node `held`: publish it at the next resynchronisation.
    pub fn publish_failed(&mut self, key: GrantKey, held: bool) {
        if self.state(&key) == Some(State::Pending) {
            self.states.remove(&key);
            if held {
                self.states.insert(key, State::Unpublished);
            }
        }
    }

    /// Our delete failed; if the grant is gone here (`held` false), etcd
    /// still has what we ended.
    pub fn withdraw_failed(&mut self, key: GrantKey, held: bool) {
        if !held {
            self.states.insert(key, State::Unwithdrawn);
        }
    }

    /// Another node's grant (or ours, after a restart) installed from etcd
    /// at `revision`.
    pub fn applied(&mut self, key: GrantKey, revision: i64) {
        self.states.insert(key, State::At(revision));
    }

    /// The watch shows the grant deleted at `revision`: whether to close
    /// it here. Not when our own newer write is on its way, or when the
    /// delete is older than what we know.
    pub fn deleted(&mut self, key: &GrantKey, revision: i64) -> bool {
        match self.state(key) {
            Some(State::At(known)) if known < revision => {
                self.states.remove(key);
                true
            }
            _ => false,
        }
    }

    /// The grant ended fleet-wide by our own hand (a revoke): forget it.
    pub fn forget(&mut self, key: &GrantKey) {
        self.states.remove(key);
    }

    /// Resynchronisation, for a grant etcd lists: `ours` whether this node
    /// wrote it, `held` whether it exists here.
    pub fn listed(&mut self, key: &GrantKey, ours: bool, held: bool) -> Listed {
        if self.state(key) == Some(State::Unwithdrawn) && ours && !held {
            self.states.remove(key);
            return Listed::DeleteAgain;
        }
        Listed::Apply
    }

    /// Resynchronisation, for a grant held here that etcd does not list:
    /// whether to close it (it ended while the node was away). Not ours
    /// that etcd never had, nor one whose write is on its way.
    pub fn unlisted(&mut self, key: &GrantKey) -> bool {
        match self.state(key) {
            Some(State::Unpublished | State::Pending) => false,
            _ => {
                self.states.remove(key);
                true
            }
        }
    }

    /// Resynchronisation done: refused deletes not seen again in etcd
    /// are settled (etcd has not got them any more). Returns the grants
    /// etcd never had, for the daemon to publish now.
    pub fn resynchronised(&mut self) -> Vec<GrantKey> {
        self.states.retain(|_, s| *s != State::Unwithdrawn);
        let mut unpublished: Vec<GrantKey> = self
            .states
            .iter()
            .filter(|(_, s)| **s == State::Unpublished)
            .map(|(k, _)| k.clone())
            .collect();
        unpublished.sort();
        unpublished
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> GrantKey {
        GrantKey::new(
            "ssh",
            std::net::IpAddr::from([198, 18, 0, n]),
            Some("laptop"),
        )
    }

    #[test]
    fn a_published_grant_is_pending_until_etcd_takes_it_and_an_older_delete_leaves_it() {
        let mut r = Replication::default();
        assert_eq!(r.changed(key(2), true, true), Publish::Put);
        assert_eq!(r.state(&key(2)), Some(State::Pending));
        // A delete the watch shows before our write is confirmed is older
        // than it.
        assert!(!r.deleted(&key(2), 10));
        r.written(&key(2), 12);
        assert_eq!(r.state(&key(2)), Some(State::At(12)));
        assert!(!r.deleted(&key(2), 11), "older than what we know");
        assert!(r.deleted(&key(2), 13));
        assert_eq!(r.state(&key(2)), None);
    }

    #[test]
    fn a_grant_made_without_etcd_waits_and_is_published_at_resync() {
        let mut r = Replication::default();
        r.made_without_etcd(key(2));
        // Its heartbeats while etcd is away wait too.
        assert_eq!(r.changed(key(2), true, false), Publish::Later);
        // Absent from etcd's listing, it is not closed.
        assert!(!r.unlisted(&key(2)));
        assert_eq!(r.resynchronised(), vec![key(2)]);
        assert_eq!(r.changed(key(2), true, true), Publish::Put);
        assert_eq!(r.resynchronised(), Vec::<GrantKey>::new());
    }

    #[test]
    fn a_failed_publication_is_published_at_resync_unless_a_later_write_is_on_its_way() {
        let mut r = Replication::default();
        r.changed(key(2), true, true);
        r.publish_failed(key(2), true);
        assert_eq!(r.state(&key(2)), Some(State::Unpublished));
        assert!(!r.unlisted(&key(2)));
        assert_eq!(r.resynchronised(), vec![key(2)]);
        // Confirmed already: a late failure of an older write changes
        // nothing.
        r.changed(key(3), true, true);
        r.written(&key(3), 5);
        r.publish_failed(key(3), true);
        assert_eq!(r.state(&key(3)), Some(State::At(5)));
        // Failed for a grant that is gone here: nothing to publish.
        r.changed(key(4), true, true);
        r.publish_failed(key(4), false);
        assert_eq!(r.state(&key(4)), None);
    }

    #[test]
    fn a_refused_delete_is_carried_out_at_resync_and_not_reinstalled() {
        let mut r = Replication::default();
        r.changed(key(2), true, true);
        r.written(&key(2), 7);
        assert_eq!(r.changed(key(2), false, true), Publish::Delete);
        r.withdraw_failed(key(2), false);
        assert_eq!(r.state(&key(2)), Some(State::Unwithdrawn));
        // etcd still lists it: ours, not held here: delete it again.
        assert_eq!(r.listed(&key(2), true, false), Listed::DeleteAgain);
        assert_eq!(r.state(&key(2)), None);
        // Another node's grant at the same key is installed as usual.
        r.withdraw_failed(key(3), false);
        assert_eq!(r.listed(&key(3), false, false), Listed::Apply);
        r.resynchronised();
        assert_eq!(r.state(&key(3)), None, "settled by the resync");
    }

    #[test]
    fn a_withdrawn_grant_reopened_here_is_not_deleted_and_a_held_failure_is_nothing() {
        let mut r = Replication::default();
        r.withdraw_failed(key(2), true);
        assert_eq!(r.state(&key(2)), None);
        r.withdraw_failed(key(3), false);
        // Opened again here before the resync: a put replaces the state.
        assert_eq!(r.changed(key(3), true, true), Publish::Put);
        assert_eq!(r.listed(&key(3), true, true), Listed::Apply);
    }

    #[test]
    fn grants_etcd_no_longer_lists_are_closed_at_resync() {
        let mut r = Replication::default();
        r.applied(key(2), 3);
        assert!(r.unlisted(&key(2)));
        assert!(r.unlisted(&key(9)), "unknown: ended while away");
        r.changed(key(4), true, true);
        assert!(!r.unlisted(&key(4)), "our write is on its way");
    }
}
