//! The revokes a node knows: the ones it carried out, and the ones it
//! issued that etcd has not taken yet. No I/O here; the daemon keeps the
//! book in its state directory (`fleet-revokes.json`) so both survive a
//! restart.
//!
//! Why a book:
//! - **A revoke is carried out once.** A revoke record written again to
//!   etcd (by a writer replaying a real one) is the same id: a node that
//!   has it in its book ignores it, so it cuts nothing opened after the
//!   original.
//! - **A revoke ends what existed when it was issued.** A grant record
//!   whose `opened_at_ms` is not after a revoke of its address or device
//!   is refused, whether it is a node's stale write racing the revoke or a
//!   writer putting the revoked grant back.
//! - **A revoke made while etcd is out of reach is kept** (`published:
//!   false`) until etcd takes it: a resynchronisation never installs the
//!   grants it ended, and publishes it.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// The book's file in the state directory.
pub const FILE: &str = "fleet-revokes.json";

/// How long a carried-out revoke is remembered: etcd keeps a revoke a day
/// (its lease), and a record older than that cannot be a live one.
pub const KEEP_MS: u64 = 86_400_000;

/// Most revokes the book keeps; past it the oldest published ones go.
/// A fleet revokes far less than this in a day.
pub const MAX: usize = 100_000;

/// One revoke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// An address or a device id, as `knockctl revoke` took it.
    pub target: String,
    /// The node that issued it.
    pub node: String,
    /// When it was issued (Unix ms, the issuing node's clock).
    pub at_ms: u64,
    /// Whether etcd has it (always, for revokes read from etcd).
    pub published: bool,
}

impl Entry {
    /// A revoke record's entry (`published`: whether etcd has it).
    pub fn of(record: &super::model::RevokeRecord, published: bool) -> Entry {
        Entry {
            target: record.target.clone(),
            node: record.node.clone(),
            at_ms: record.at_ms,
            published,
        }
    }

    /// Whether this revoke ends a grant of `source` opened by `device` at
    /// `opened_at_ms` (0: not known, so treated as old).
    pub fn ends(&self, source: IpAddr, device: Option<&str>, opened_at_ms: u64) -> bool {
        let aimed = match self.target.parse::<IpAddr>() {
            Ok(ip) => ip == source,
            Err(_) => device == Some(self.target.as_str()),
        };
        aimed && opened_at_ms <= self.at_ms
    }
}

/// The revokes this node knows, by id (the last part of `P/revokes/ID`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    entries: BTreeMap<String, Entry>,
}

impl Book {
    pub fn knows(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a revoke (or replaces it: a published one stays published).
    pub fn insert(&mut self, id: String, mut entry: Entry) {
        if let Some(old) = self.entries.get(&id) {
            entry.published |= old.published;
        }
        self.entries.insert(id, entry);
    }

    /// Marks a revoke etcd took; whether that changed anything.
    pub fn mark_published(&mut self, id: &str) -> bool {
        match self.entries.get_mut(id) {
            Some(e) if !e.published => {
                e.published = true;
                true
            }
            _ => false,
        }
    }

    /// How many revokes etcd does not have yet.
    pub fn pending_count(&self) -> usize {
        self.entries.values().filter(|e| !e.published).count()
    }

    /// Revokes etcd does not have yet, oldest first.
    pub fn pending(&self) -> Vec<(String, Entry)> {
        let mut pending: Vec<(String, Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.published)
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect();
        pending.sort_by_key(|(_, e)| e.at_ms);
        pending
    }

    /// The revoke (its id) that ends a grant of `source` by `device`
    /// opened at `opened_at_ms`, if any.
    pub fn ending(&self, source: IpAddr, device: Option<&str>, opened_at_ms: u64) -> Option<&str> {
        self.entries
            .iter()
            .find(|(_, e)| e.ends(source, device, opened_at_ms))
            .map(|(id, _)| id.as_str())
    }

    /// Forgets published revokes older than [`KEEP_MS`], and the oldest
    /// published ones past [`MAX`]. Pending ones stay until etcd takes
    /// them. Whether anything went.
    pub fn prune(&mut self, now_ms: u64) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| !e.published || now_ms.saturating_sub(e.at_ms) <= KEEP_MS);
        if self.entries.len() > MAX {
            let mut published: Vec<(u64, String)> = self
                .entries
                .iter()
                .filter(|(_, e)| e.published)
                .map(|(id, e)| (e.at_ms, id.clone()))
                .collect();
            published.sort();
            let excess = self.entries.len() - MAX;
            for (_, id) in published.into_iter().take(excess) {
                self.entries.remove(&id);
            }
        }
        self.entries.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str, at_ms: u64, published: bool) -> Entry {
        Entry {
            target: target.into(),
            node: "n1".into(),
            at_ms,
            published,
        }
    }

    #[test]
    fn a_revoke_ends_only_what_was_opened_before_it_for_its_target() {
        let ip: IpAddr = "198.18.0.2".parse().unwrap();
        let other: IpAddr = "198.18.0.3".parse().unwrap();
        let by_ip = entry("198.18.0.2", 1000, true);
        assert!(by_ip.ends(ip, None, 999));
        assert!(by_ip.ends(ip, Some("laptop"), 1000));
        assert!(!by_ip.ends(ip, None, 1001), "opened after the revoke");
        assert!(!by_ip.ends(other, None, 0));
        let by_device = entry("laptop", 1000, true);
        assert!(by_device.ends(other, Some("laptop"), 0));
        assert!(!by_device.ends(other, Some("phone"), 0));
        assert!(!by_device.ends(other, None, 0));
        let mut book = Book::default();
        book.insert("r1".into(), by_device);
        assert_eq!(book.ending(other, Some("laptop"), 10), Some("r1"));
        assert_eq!(book.ending(other, Some("laptop"), 2000), None);
    }

    #[test]
    fn pending_revokes_stay_until_published_and_old_ones_go() {
        let mut book = Book::default();
        book.insert("old".into(), entry("a", 0, true));
        book.insert("waiting".into(), entry("b", 0, false));
        book.insert("new".into(), entry("c", KEEP_MS, true));
        assert!(book.prune(KEEP_MS + 1));
        assert!(!book.knows("old"));
        assert!(book.knows("waiting") && book.knows("new"));
        assert_eq!(book.pending().len(), 1);
        assert_eq!(book.pending_count(), 1);
        assert!(book.mark_published("waiting"));
        assert!(!book.mark_published("waiting"));
        assert!(book.pending().is_empty());
        // Inserted again unpublished, a published one stays published,
        // and goes once it is old.
        book.insert("waiting".into(), entry("b", 0, false));
        assert!(book.pending().is_empty());
        assert!(book.prune(KEEP_MS + 1));
        assert!(!book.knows("waiting") && book.knows("new"));
    }
}
