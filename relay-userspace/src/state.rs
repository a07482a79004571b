//! The state store: a small embedded database (redb) in the state directory with what a
//! restarted relayd needs to rebuild its view of the world: the TURN allocations (their
//! permissions, channels and relay addresses) and the connected calls (their sides' SDP, ICE
//! credentials and selected pair, LAN port; a bridged call's SRTP keys and indices); the
//! kernel flows themselves are pinned and adopted, and the relay's DTLS certificate is kept. The store owns its record types; the TURN
//! server and the calls map theirs onto them.
//!
//! Each kind is written as a whole snapshot, at most once a second when it changed and at
//! shutdown: a few thousand records are a few megabytes at most, and a crash loses at most
//! the last second. ICE passwords, SRTP keys and TURN usernames are in it, so the file is
//! the owner's only (0600), as the TURN secrets are.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
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

/// A connected call as the store keeps it: what the next relayd needs to take it back
/// without either side noticing (the app's consent checks answered with the same
/// credentials, the PBX's RTP on the same LAN port, the flows adopted from the pins).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallRecord {
    pub call: u64,
    pub tenant: String,
    pub user: String,
    /// Who called: the app (true) or the PBX.
    pub from_app: bool,
    /// Unix time of `call.create`.
    pub created: u64,
    /// The relay's LAN address for the call (RTP; RTCP on the port above).
    pub lan: SocketAddr,
    pub pbx: SocketAddr,
    /// The PBX's RTCP address when not with its RTP (no rtcp-mux).
    pub pbx_rtcp: Option<SocketAddr>,
    /// The last SDP of each side, and what the relay last sent each (`call.update`
    /// answers and checks are made from them).
    pub pbx_sdp: String,
    pub app_sdp: String,
    pub sent_to_app: String,
    pub sent_to_pbx: String,
    pub app_mids: Vec<String>,
    pub ice: IceRecord,
    /// A bridged call's media security (None: the media goes as it is).
    #[serde(default)]
    pub media: Option<MediaRecord>,
    /// The streams anchored besides the audio (a bridged call's video).
    #[serde(default)]
    pub streams: Vec<StreamRecord>,
}

/// One stream of a call besides its audio: its m-line, the relay's LAN address for it (RTP;
/// RTCP on the port above), and where the PBX wants it (None: refused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamRecord {
    pub index: usize,
    pub media: String,
    pub lan: SocketAddr,
    pub pbx: Option<SocketAddr>,
    pub pbx_rtcp: Option<SocketAddr>,
}

/// The media security of a call whose legs the relay terminates: what each side was told
/// and agreed to, and each SRTP leg's keys and how far its packets went. Keys are here:
/// the file is the owner's only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MediaRecord {
    pub app_proto: String,
    pub pbx_proto: String,
    pub app: LegRecord,
    pub pbx: LegRecord,
}

/// One leg's security as its SDP says it, and its SRTP once keyed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LegRecord {
    pub security: LegSecurity,
    pub srtp: Option<SrtpRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum LegSecurity {
    Plain,
    /// `a=crypto` values: the relay's and the side's.
    Sdes {
        own: String,
        peer: Option<String>,
    },
    /// The relay's `a=setup` value, the side's `a=fingerprint` value and the relay's DTLS
    /// role (`client` or `server`).
    Dtls {
        setup: String,
        fingerprint: Option<String>,
        role: Option<String>,
    },
}

/// An SRTP leg: its suite (`a=crypto` name), master keys and salts (the side's and the
/// relay's), and the indices each direction reached per SSRC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SrtpRecord {
    pub suite: String,
    pub peer_key_salt: Vec<u8>,
    pub own_key_salt: Vec<u8>,
    /// What the side sent the relay.
    pub inbound: Vec<SsrcRecord>,
    /// What the relay sent the side.
    pub outbound: Vec<SsrcRecord>,
}

/// The highest SRTP packet index (rollover counter and sequence number) and SRTCP index of
/// one SSRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SsrcRecord {
    pub ssrc: u32,
    pub rtp: Option<u64>,
    pub rtcp: Option<u32>,
}

/// A device an app registered for pushes: its provider (`webhook`) and token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushRecord {
    pub tenant: String,
    pub user: String,
    pub provider: String,
    pub token: String,
    pub app_id: Option<String>,
    /// An APNs VoIP push (PushKit) rather than an alert.
    #[serde(default)]
    pub voip: bool,
    /// Unix time.
    pub registered: u64,
}

/// A connected ICE leg toward the app.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IceRecord {
    pub local_ufrag: String,
    pub local_pwd: String,
    pub remote_ufrag: String,
    pub remote_pwd: String,
    /// The relay's `a=candidate` values.
    pub candidates: Vec<String>,
    pub controlling: bool,
    /// The relay's candidate priority (its consent checks carry it).
    pub priority: u32,
    /// The selected pair and its candidate types (host, srflx, prflx, relay).
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub local_type: String,
    pub remote_type: String,
}

/// "client|server" -> the allocation as JSON (readable with any redb tool, and free to grow
/// fields: serde ignores none it does not know, but missing ones get defaults).
const ALLOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("turn_allocations");
/// The call id (decimal) -> the call as JSON.
const CALLS: TableDefinition<&str, &[u8]> = TableDefinition::new("calls");

/// A secret's name -> its bytes: keys relayd makes once and keeps across restarts.
const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// Push registrations.
const PUSH: TableDefinition<&str, &[u8]> = TableDefinition::new("push");

/// The `[state]` section: where relayd keeps what a restart needs (TURN allocations).
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// The state store file; empty: keep nothing (allocations and calls end with relayd).
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
        let failed = |err: &dyn std::fmt::Display| StateError::Store {
            path: path.to_owned(),
            message: err.to_string(),
        };
        let db = Database::create(path).map_err(|err| failed(&err))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|err| failed(&err))?;
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
        self.save(ALLOCATIONS, allocations, |allocation| {
            format!("{}|{}", allocation.client, allocation.server)
        })
    }

    /// The stored allocations; entries that do not parse are skipped with a warning.
    pub fn load_allocations(&self) -> Result<Vec<AllocationRecord>, StateError> {
        self.load(ALLOCATIONS)
    }

    /// Replaces the stored calls with `calls`, in one transaction.
    pub fn save_calls(&self, calls: &[CallRecord]) -> Result<(), StateError> {
        self.save(CALLS, calls, |call| call.call.to_string())
    }

    /// The push registrations, all of them (the previous ones replaced).
    pub fn save_push(&self, devices: &[PushRecord]) -> Result<(), StateError> {
        self.save(PUSH, devices, |device| {
            format!("{}/{}/{}", device.tenant, device.user, device.token)
        })
    }

    pub fn load_push(&self) -> Result<Vec<PushRecord>, StateError> {
        self.load(PUSH)
    }

    /// The stored calls; entries that do not parse are skipped with a warning.
    pub fn load_calls(&self) -> Result<Vec<CallRecord>, StateError> {
        self.load(CALLS)
    }

    /// The secret `name` of `bytes` random bytes: the stored one, or one made now and
    /// stored (a first start, or a store written before it was kept).
    pub fn secret(&self, name: &str, bytes: usize) -> Result<Vec<u8>, StateError> {
        self.kept(
            name,
            |stored| stored.len() == bytes,
            || {
                let mut secret = vec![0u8; bytes];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                    .map_err(|_| "the system random generator failed".to_owned())?;
                Ok(secret)
            },
        )
    }

    /// The value `name` (a secret, a certificate): the stored one when `valid` takes it,
    /// else one `make` makes now, stored.
    pub fn kept(
        &self,
        name: &str,
        valid: impl FnOnce(&[u8]) -> bool,
        make: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Result<Vec<u8>, StateError> {
        let write = self.db.begin_write().map_err(|e| self.error(e))?;
        let value = {
            let mut table = write.open_table(SECRETS).map_err(|e| self.error(e))?;
            let stored = table
                .get(name)
                .map_err(|e| self.error(e))?
                .map(|value| value.value().to_vec())
                .filter(|stored| valid(stored));
            match stored {
                Some(stored) => stored,
                None => {
                    let value = make().map_err(|e| self.error(e))?;
                    table
                        .insert(name, value.as_slice())
                        .map_err(|e| self.error(e))?;
                    value
                }
            }
        };
        write.commit().map_err(|e| self.error(e))?;
        Ok(value)
    }

    fn save<T: serde::Serialize>(
        &self,
        definition: TableDefinition<&str, &[u8]>,
        records: &[T],
        key: impl Fn(&T) -> String,
    ) -> Result<(), StateError> {
        let write = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = write.open_table(definition).map_err(|e| self.error(e))?;
            table.retain(|_, _| false).map_err(|e| self.error(e))?;
            for record in records {
                let value = serde_json::to_vec(record).map_err(|e| self.error(e))?;
                table
                    .insert(key(record).as_str(), value.as_slice())
                    .map_err(|e| self.error(e))?;
            }
        }
        write.commit().map_err(|e| self.error(e))
    }

    fn load<T: serde::de::DeserializeOwned>(
        &self,
        definition: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StateError> {
        let read = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = match read.open_table(definition) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(err) => return Err(self.error(err)),
        };
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (key, value) = entry.map_err(|e| self.error(e))?;
            match serde_json::from_slice::<T>(value.value()) {
                Ok(record) => records.push(record),
                Err(err) => {
                    tracing::warn!(table = %definition, key = key.value(), %err, "state: a stored record does not parse; skipped")
                }
            }
        }
        Ok(records)
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

    #[test]
    fn a_secret_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = StateStore::open(&path).unwrap().secret("key", 32).unwrap();
        assert_eq!(first.len(), 32);
        assert_ne!(first, [0u8; 32]);
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.secret("key", 32).unwrap(), first);
        assert_ne!(store.secret("other", 32).unwrap(), first);
        // Asked for with another length (a new key size), it is made again.
        assert_eq!(store.secret("key", 16).unwrap().len(), 16);
    }

    #[test]
    fn calls_round_trip_beside_the_allocations_and_the_file_is_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let call = CallRecord {
            call: 7,
            tenant: "acme".into(),
            user: "alice".into(),
            from_app: false,
            created: 1_700_000_000,
            lan: "10.0.0.1:40000".parse().unwrap(),
            pbx: "10.0.0.5:5004".parse().unwrap(),
            pbx_rtcp: Some("10.0.0.5:5005".parse().unwrap()),
            pbx_sdp: "v=0\r\n".into(),
            app_sdp: "v=0\r\n".into(),
            sent_to_app: "v=0\r\n".into(),
            sent_to_pbx: "v=0\r\n".into(),
            app_mids: vec!["0".into(), "1".into()],
            streams: vec![StreamRecord {
                index: 1,
                media: "video".into(),
                lan: "10.0.0.1:40002".parse().unwrap(),
                pbx: Some("10.0.0.5:5006".parse().unwrap()),
                pbx_rtcp: None,
            }],
            ice: IceRecord {
                local_ufrag: "relayufrag".into(),
                local_pwd: "relaypassword0123456789".into(),
                remote_ufrag: "appufrag".into(),
                remote_pwd: "apppassword0123456789".into(),
                candidates: vec!["1 1 udp 2130706431 203.0.113.1 3479 typ host".into()],
                controlling: true,
                priority: 2130706431,
                local: "203.0.113.1:3479".parse().unwrap(),
                remote: "198.51.100.7:50000".parse().unwrap(),
                local_type: "host".into(),
                remote_type: "prflx".into(),
            },
            media: Some(MediaRecord {
                app_proto: "UDP/TLS/RTP/SAVPF".into(),
                pbx_proto: "RTP/AVP".into(),
                app: LegRecord {
                    security: LegSecurity::Dtls {
                        setup: "passive".into(),
                        fingerprint: Some("sha-256 AB:CD".into()),
                        role: Some("server".into()),
                    },
                    srtp: Some(SrtpRecord {
                        suite: "AEAD_AES_128_GCM".into(),
                        peer_key_salt: vec![1; 28],
                        own_key_salt: vec![2; 28],
                        inbound: vec![SsrcRecord {
                            ssrc: 9,
                            rtp: Some(0x1_0002),
                            rtcp: Some(4),
                        }],
                        outbound: vec![],
                    }),
                },
                pbx: LegRecord {
                    security: LegSecurity::Plain,
                    srtp: None,
                },
            }),
        };
        {
            let store = StateStore::open(&path).unwrap();
            assert_eq!(store.load_calls().unwrap(), []);
            store.save_calls(std::slice::from_ref(&call)).unwrap();
            store.save_allocations(&[]).unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "ICE passwords are in it");
        let store = StateStore::open(&path).unwrap();
        assert_eq!(store.load_calls().unwrap(), [call]);
        store.save_calls(&[]).unwrap();
        assert_eq!(store.load_calls().unwrap(), []);
    }
}
