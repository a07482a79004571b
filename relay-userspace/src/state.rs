//! The state store: a small embedded database (redb) in the state directory with what a
//! restarted relayd needs to rebuild its view of the world: the TURN allocations (their
//! permissions, channels and relay addresses; the kernel flows themselves are pinned and
//! adopted). Calls are not kept: a restart ends them. The store owns its record types; the
//! TURN server maps its allocations onto them.
//!
//! Written as a whole snapshot, at most once a second and at shutdown: a few thousand
//! allocations are a few hundred kilobytes, and a crash loses at most the last second.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// A TURN allocation as the store keeps it, for the next relayd to restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AllocationRecord {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub username: String,
    pub relays: Vec<SocketAddr>,
    /// Unix time.
    pub expires: u64,
    pub dont_fragment: bool,
    /// Peer IP and expiry.
    pub permissions: Vec<(IpAddr, u64)>,
    pub channels: Vec<ChannelRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelRecord {
    pub number: u16,
    pub peer: SocketAddr,
    pub relay: SocketAddr,
    pub expires: u64,
}

/// "client|server" -> the allocation as JSON (readable with any redb tool, and free to grow
/// fields: serde ignores none it does not know, but missing ones get defaults).
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("turn_allocations");

/// The `[state]` section: where relayd keeps what a restart needs (TURN allocations).
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// The state store file; empty: keep nothing (allocations end with relayd).
    pub path: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from(crate::paths::STATE_FILE),
        }
    }
}

pub struct StateStore {
    db: Database,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state.path: {path}: {message}")]
    Store { path: PathBuf, message: String },
}

impl StateStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<StateStore, StateError> {
        let db = Database::create(path).map_err(|err| StateError::Store {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        Ok(StateStore {
            db,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, err: impl std::fmt::Display) -> StateError {
        StateError::Store {
            path: self.path.clone(),
            message: err.to_string(),
        }
    }

    /// Replaces the stored allocations with `allocations`, in one transaction.
    pub fn save_allocations(&self, allocations: &[AllocationRecord]) -> Result<(), StateError> {
        let write = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = write.open_table(ALLOCATIONS).map_err(|e| self.error(e))?;
            table.retain(|_, _| false).map_err(|e| self.error(e))?;
            for allocation in allocations {
                let key = format!("{}|{}", allocation.client, allocation.server);
                let value = serde_json::to_vec(allocation).map_err(|e| self.error(e))?;
                table
                    .insert(key.as_str(), value.as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        write.commit().map_err(|e| self.error(e))
    }

    /// The stored allocations; entries that do not parse are skipped with a warning.
    pub fn load_allocations(&self) -> Result<Vec<AllocationRecord>, StateError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match read.open_table(ALLOCATIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.error(err)),
        };
        let mut allocations = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            match serde_json::from_slice::<AllocationRecord>(value.value()) {
                Ok(allocation) => allocations.push(allocation),
                Err(err) => {
                    tracing::warn!(key = key.value(), %err, "state: a stored allocation does not parse; skipped")
                }
            }
        }
        Ok(allocations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_round_trip_and_a_save_replaces_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let allocation = AllocationRecord {
            client: "198.51.100.7:50000".parse().unwrap(),
            server: "203.0.113.1:3478".parse().unwrap(),
            username: "alice".into(),
            relays: vec!["203.0.113.1:49152".parse().unwrap()],
            expires: 1_700_000_600,
            dont_fragment: true,
            permissions: vec![("192.0.2.44".parse().unwrap(), 1_700_000_300)],
            channels: vec![ChannelRecord {
                number: 0x4001,
                peer: "192.0.2.44:6000".parse().unwrap(),
                relay: "203.0.113.1:49152".parse().unwrap(),
                expires: 1_700_000_600,
            }],
        };
        {
            let store = StateStore::open(&path).unwrap();
            assert_eq!(store.load_allocations().unwrap(), []);
            let mut other = allocation.clone();
            other.client = "198.51.100.8:50000".parse().unwrap();
            store
                .save_allocations(&[allocation.clone(), other])
                .unwrap();
            store
                .save_allocations(std::slice::from_ref(&allocation))
                .unwrap();
        }
        // Reopened, as by the next relayd.
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.load_allocations().unwrap(), [allocation]);
    }
}
