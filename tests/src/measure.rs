//! What benchmarks read: UDP counters of a namespace, CPU time of the host and of a
//! process, and the XDP program's own run-time statistics.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use relay_common::XDP_RELAY_PROGRAM;

use crate::netns::NetNs;

/// UDP datagrams that reached the namespace's UDP layer and were read by a socket, or
/// dropped there because the reader could not keep up: either way the relay delivered them.
/// The kernel counts InDatagrams when the application reads a datagram, so the receiving
/// socket must be drained ([`Sink`]): what sits unread in a buffer is counted nowhere.
pub fn udp_arrived(ns: &NetNs) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&snmp.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let field = |name: &str| -> u64 {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| values[i].parse().ok())
            .unwrap_or(0)
    };
    field("InDatagrams") + field("RcvbufErrors")
}

/// A UDP socket in a namespace that reads and discards everything until dropped: the far
/// end of a benchmark's traffic.
pub struct Sink {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn bind(ns: &NetNs, address: SocketAddr) -> Sink {
        let socket = ns.udp_socket(address);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let _ = socket.recv_from(&mut buf);
                }
            })
        };
        Sink {
            stop,
            reader: Some(reader),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Busy CPU time of the whole host in ns (all CPUs, everything but idle and iowait).
pub fn host_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let busy: u64 = cpu.iter().sum::<u64>() - cpu[3] - cpu[4];
    busy * 1_000_000_000 / clock_ticks()
}

/// CPU time (user + system) `pid` has used, in ns, threads that ended included: its
/// process CPU-time clock (`clock_getcpuclockid`), which counts nanoseconds where
/// `/proc/PID/stat` counts 10 ms ticks (a tick's few milliseconds a second would read as
/// 0% or 1%). `/proc/PID/stat` when the clock cannot be read.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let mut clock: libc::clockid_t = 0;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls write only into the variables passed, which outlive them.
    let read = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut now) == 0
    };
    if read {
        return now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    }
    let (user, system) = user_and_system_ticks(pid);
    (user + system) * 1_000_000_000 / clock_ticks()
}

/// The CPU time a process spent in user mode, all threads, in ns (clock-tick precision):
/// its own work, without the system calls (and what the kernel runs inside them).
pub fn process_user_ns(pid: u32) -> u64 {
    user_and_system_ticks(pid).0 * 1_000_000_000 / clock_ticks()
}

/// utime and stime from /proc/PID/stat, in clock ticks.
fn user_and_system_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (*fields.get(11).unwrap_or(&0), *fields.get(12).unwrap_or(&0))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

pub fn sysctl_bpf_stats(on: bool) {
    let _ = std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    );
}

/// (run_time_ns, run_cnt) of the relay program, summed over loaded instances.
pub fn xdp_run_stats() -> Option<(u64, u64)> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "name", XDP_RELAY_PROGRAM, "--json"])
        .output()
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let progs = match value {
        serde_json::Value::Array(progs) => progs,
        single => vec![single],
    };
    Some(progs.iter().fold((0, 0), |(t, c), p| {
        (
            t + p["run_time_ns"].as_u64().unwrap_or(0),
            c + p["run_cnt"].as_u64().unwrap_or(0),
        )
    }))
}
