//! Who gets a connection on relayd's TCP listeners (the signalling port with TURN over TLS,
//! TURN over TCP, metrics), so that strangers on the Internet cannot take the file
//! descriptors everything else needs:
//!
//! - the open-files soft limit is raised to the hard one at start (a shell's 1024 is far
//!   too few for an edge box);
//! - connections are capped per source (an IPv4 address, an IPv6 /64: one host's prefix)
//!   and in total, the total at most half the open-files limit, so UDP sockets (TURN
//!   relays, ng ports), the state store and the control socket always find descriptors;
//! - an accept loop that fails (out of descriptors) waits before it tries again instead of
//!   spinning, and says so once a minute, not once per failure;
//! - refusals are counted (`relayctl status`, `/metrics`) and logged once a minute.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};

/// The `[connections]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// TCP connections one source may hold at once, over all the TCP listeners. Apps behind
    /// one office NAT share an address: raise it for them.
    pub max_per_source: u32,
    /// TCP connections in all; at most half the open-files limit is used.
    pub max_total: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max_per_source: 256,
            max_total: 16_384,
        }
    }
}

impl ConnectionsConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if self.max_per_source == 0 {
            problem(
                "connections.max_per_source",
                "0".to_owned(),
                "must be at least 1 (a source with no connection could never connect)",
            );
        }
        if self.max_total == 0 {
            problem(
                "connections.max_total",
                "0".to_owned(),
                "must be at least 1",
            );
        }
    }
}

/// How long an accept loop waits after a failure: the usual one, out of descriptors, does
/// not end at once, and trying again at once only spins.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this, per kind of refusal and per listener's failures.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Raises the soft open-files limit to the hard one. Returns the limit before and after.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// What a source is counted as: an IPv4 address, or the /64 an IPv6 address is in (a host
/// gets a whole /64, so counting its addresses one by one would cap nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => Source::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its source already held `connections.max_per_source`.
    PerSource,
    /// relayd already held `connections.max_total` (or half its open-files limit).
    Total,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::PerSource => "per_source",
            Refused::Total => "total",
        }
    }
}

/// The connections open and refused, for `relayctl status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionsStatus {
    pub open: u32,
    pub max_total: u32,
    pub max_per_source: u32,
    pub refused_per_source: u64,
    pub refused_total: u64,
    /// Accepts that failed (out of descriptors, mostly).
    pub accept_failures: u64,
}

/// Counts occurrences and says when one is due to be logged: at most once per
/// [`LOG_INTERVAL`], with how many happened since the last line.
#[derive(Debug, Default)]
struct EveryMinute {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl EveryMinute {
    /// Counts one at `now`; Some(n) when a line is due, n the occurrences it speaks for.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < LOG_INTERVAL)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[derive(Debug, Default)]
struct Open {
    total: u32,
    by_source: HashMap<Source, u32>,
    status: ConnectionsStatus,
    per_source_log: EveryMinute,
    total_log: EveryMinute,
}

/// The connection counts shared by every TCP listener.
#[derive(Debug)]
pub struct Admission {
    max_per_source: u32,
    max_total: u32,
    open: Mutex<Open>,
}

impl Admission {
    /// The limits of `config`, the total capped at half of `open_files` (the soft limit in
    /// effect).
    pub fn new(config: &ConnectionsConfig, open_files: u64) -> Arc<Admission> {
        let half = u32::try_from(open_files / 2).unwrap_or(u32::MAX).max(1);
        let max_total = config.max_total.min(half);
        if max_total < config.max_total {
            tracing::warn!(
                configured = config.max_total,
                open_files,
                max_total,
                "connections: connections.max_total is more than half the open-files limit: capped (raise LimitNOFILE or ulimit -n to allow more)"
            );
        }
        tracing::info!(
            max_total,
            max_per_source = config.max_per_source,
            open_files,
            "connections: TCP connections capped per source and in total"
        );
        Arc::new(Admission {
            max_per_source: config.max_per_source,
            max_total,
            open: Mutex::new(Open::default()),
        })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().expect("admission poisoned")
    }

    /// Counts a connection from `peer` in, or says why not.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, listener: &str) -> Result<Admitted, Refused> {
        let source = Source::of(peer);
        let mut open = self.open();
        let held = open.by_source.get(&source).copied().unwrap_or(0);
        let refused = if open.total >= self.max_total {
            Some(Refused::Total)
        } else if held >= self.max_per_source {
            Some(Refused::PerSource)
        } else {
            None
        };
        if let Some(refused) = refused {
            let now = Instant::now();
            let due = match refused {
                Refused::PerSource => {
                    open.status.refused_per_source += 1;
                    open.per_source_log.count(now)
                }
                Refused::Total => {
                    open.status.refused_total += 1;
                    open.total_log.count(now)
                }
            };
            if let Some(similar) = due {
                let (limit, key) = match refused {
                    Refused::PerSource => (self.max_per_source, "connections.max_per_source"),
                    Refused::Total => (self.max_total, "connections.max_total"),
                };
                tracing::warn!(
                    %peer,
                    listener,
                    limit,
                    key,
                    similar,
                    "connections: a connection refused at its limit (one line a minute; similar = refusals since the last)"
                );
            }
            return Err(refused);
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        Ok(Admitted {
            admission: self.clone(),
            source,
        })
    }

    pub fn status(&self) -> ConnectionsStatus {
        let open = self.open();
        ConnectionsStatus {
            open: open.total,
            max_total: self.max_total,
            max_per_source: self.max_per_source,
            ..open.status.clone()
        }
    }

    fn release(&self, source: Source) {
        let mut open = self.open();
        open.total = open.total.saturating_sub(1);
        if let Some(held) = open.by_source.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                open.by_source.remove(&source);
            }
        }
    }

    fn accept_failed(&self) {
        self.open().status.accept_failures += 1;
    }
}

/// A connection counted in; dropping it counts it out.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: Source,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.release(self.source);
    }
}

/// A TCP listener whose connections pass the admission.
pub struct Listener {
    listener: TcpListener,
    name: &'static str,
    admission: Arc<Admission>,
    failures: EveryMinute,
}

impl Listener {
    /// `name` says which listener it is in log lines ("signalling", "turn-tcp", "metrics").
    pub fn new(listener: TcpListener, name: &'static str, admission: Arc<Admission>) -> Listener {
        Listener {
            listener,
            name,
            admission,
            failures: EveryMinute::default(),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection admitted. Refused ones are closed at once; a failed accept is
    /// waited out. Cancel-safe: nothing accepted is held across an await.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    if let Ok(admitted) = self.admission.admit(peer.ip(), self.name) {
                        return (stream, peer, admitted);
                    }
                }
                // The connection went before it was taken: nothing to wait for.
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(err) => {
                    self.admission.accept_failed();
                    if let Some(similar) = self.failures.count(Instant::now()) {
                        tracing::warn!(
                            listener = self.name,
                            %err,
                            similar,
                            "connections: accept failed; waiting before the next (one line a minute; similar = failures since the last)"
                        );
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_source: u32, total: u32) -> Arc<Admission> {
        Admission::new(
            &ConnectionsConfig {
                max_per_source: per_source,
                max_total: total,
            },
            1 << 20,
        )
    }

    #[test]
    fn connections_are_capped_per_source_and_in_total_and_counted_out_when_dropped() {
        let admission = admission(2, 3);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let first = admission.admit(a, "test").unwrap();
        let _second = admission.admit(a, "test").unwrap();
        assert_eq!(admission.admit(a, "test").unwrap_err(), Refused::PerSource);
        // The same address as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:198.51.100.1".parse().unwrap();
        assert_eq!(
            admission.admit(mapped, "test").unwrap_err(),
            Refused::PerSource
        );
        let _third = admission.admit(b, "test").unwrap();
        assert_eq!(admission.admit(b, "test").unwrap_err(), Refused::Total);
        drop(first);
        let _again = admission.admit(a, "test").unwrap();
        let status = admission.status();
        assert_eq!(status.open, 3);
        assert_eq!(status.refused_per_source, 2);
        assert_eq!(status.refused_total, 1);
    }

    #[test]
    fn an_ipv6_host_is_its_64_prefix() {
        let admission = admission(1, 10);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other_in_prefix: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let next_prefix: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _held = admission.admit(one, "test").unwrap();
        assert_eq!(
            admission.admit(other_in_prefix, "test").unwrap_err(),
            Refused::PerSource
        );
        assert!(admission.admit(next_prefix, "test").is_ok());
    }

    #[test]
    fn the_total_is_at_most_half_the_open_files_limit() {
        let admission = Admission::new(&ConnectionsConfig::default(), 1024);
        assert_eq!(admission.status().max_total, 512);
        let admission = Admission::new(&ConnectionsConfig::default(), 1 << 20);
        assert_eq!(admission.status().max_total, 16_384);
    }

    #[test]
    fn a_log_line_is_due_once_a_minute_with_the_count_since_the_last() {
        let mut every = EveryMinute::default();
        let start = Instant::now();
        assert_eq!(every.count(start), Some(1));
        assert_eq!(every.count(start + Duration::from_secs(1)), None);
        assert_eq!(every.count(start + Duration::from_secs(59)), None);
        assert_eq!(every.count(start + Duration::from_secs(60)), Some(3));
    }

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (_, after) = raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct given.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(after, limit.rlim_max);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
