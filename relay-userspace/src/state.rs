//! The state store: a small embedded database (redb) in the state directory with what a
//! restarted relayd needs to rebuild its view of the world: TURN allocations today (their
//! permissions, channels and relay addresses; the kernel flows themselves are pinned and
//! adopted). Calls join it with issue 4.
//!
//! Written as a whole snapshot, at most once a second and at shutdown: a few thousand
//! allocations are a few hundred kilobytes, and a crash loses at most the last second.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::turn::server::AllocationState;

/// "client|server" -> the allocation as JSON (readable with any redb tool, and free to grow
/// fields: serde ignores none it does not know, but missing ones get defaults).
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("turn_allocations");

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
    pub fn save_allocations(&self, allocations: &[AllocationState]) -> Result<(), StateError> {
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
    pub fn load_allocations(&self) -> Result<Vec<AllocationState>, StateError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match read.open_table(ALLOCATIONS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.error(err)),
        };
        let mut allocations = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            match serde_json::from_slice::<AllocationState>(value.value()) {
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
    use crate::turn::server::ChannelState;

    #[test]
    fn allocations_round_trip_and_a_save_replaces_everything() {
        let dir = std::env::temp_dir().join(format!("relay-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.redb");
        let allocation = AllocationState {
            client: "198.51.100.7:50000".parse().unwrap(),
            server: "203.0.113.1:3478".parse().unwrap(),
            username: "alice".into(),
            relays: vec!["203.0.113.1:49152".parse().unwrap()],
            expires: 1_700_000_600,
            dont_fragment: true,
            permissions: vec![("192.0.2.44".parse().unwrap(), 1_700_000_300)],
            channels: vec![ChannelState {
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
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
