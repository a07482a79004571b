//! What benchmarks read: UDP counters of a namespace, CPU time of the host and of a
//! process, and the XDP program's own run-time statistics.

use std::process::Command;

use relay_common::XDP_RELAY_PROGRAM;

use crate::netns::NetNs;

/// UDP datagrams that reached the peer's UDP layer (delivered to the socket, or dropped
/// there because the sink could not keep up: either way the relay delivered them).
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

/// CPU time (user + system) `pid` has used, in ns.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0)) * 1_000_000_000 / clock_ticks()
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
