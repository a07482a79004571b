//! relayd processes (stopped on drop) and relayctl invocations.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// A state store file for a relayd under test, in the temporary directory; removed on drop.
pub struct StateFile(pub PathBuf);

impl StateFile {
    pub fn new(prefix: &str) -> StateFile {
        StateFile(std::env::temp_dir().join(format!("{}.redb", crate::unique(prefix))))
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Path of a binary of this workspace, in the profile directory the running executable was
/// built into (tests run from its `deps/` subdirectory, benchmarks from the directory itself).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("executable directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile directory")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p relay-userspace; cargo xtask test does)",
        path.display()
    );
    path
}

/// A running relayd, sent SIGTERM (then killed) on drop.
pub struct Relayd {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Relayd {
    /// Starts relayd (inside `ns` when given) with its control socket in a fresh temporary
    /// path, and waits until the socket answers.
    pub fn start(ns: Option<&NetNs>, args: &[&str]) -> Relayd {
        let command = match ns {
            // nsenter changes only the network namespace. (`ip netns exec` also gives the
            // process a private mount of /sys, and with it a private bpffs whose pins vanish
            // when relayd exits.)
            Some(ns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{}", ns.name))
                    .arg("--")
                    .arg(binary("relayd"));
                command
            }
            None => Command::new(binary("relayd")),
        };
        Relayd::start_command(command, args)
    }

    /// Starts relayd in the network namespace named `ns` with `args`, keeping what a restart
    /// needs in the state store file `state` (a name, so that a thread can restart it).
    pub fn start_with_state(ns: &str, args: &[&str], state: &Path) -> Relayd {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(binary("relayd"))
            .env("RELAY_STATE_PATH", state);
        Relayd::start_command(command, args)
    }

    /// Starts relayd through `command`, which ends with relayd itself (wrapped the way a
    /// test needs: another user, another mount namespace), with `args` and a control
    /// socket in a fresh temporary path; waits until the socket answers.
    pub fn start_command(mut command: Command, args: &[&str]) -> Relayd {
        let name = crate::unique("relayd-");
        let socket = std::env::temp_dir().join(format!("{name}.sock"));
        let log = std::env::temp_dir().join(format!("{name}.log"));
        // Info unless the caller decided about RELAY_LOG (set it, or removed it so that the
        // configuration file's log.level counts).
        if !command.get_envs().any(|(key, _)| key == "RELAY_LOG") {
            command.env("RELAY_LOG", "info");
        }
        // No state store unless the test asks for one: the default path is the system's.
        if !command.get_envs().any(|(key, _)| key == "RELAY_STATE_PATH") {
            command.env("RELAY_STATE_PATH", "");
        }
        command
            .args(args)
            .arg("--control-socket")
            .arg(&socket)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log file"),
            );
        let child = command.spawn().expect("spawn relayd");
        let mut relayd = Relayd { child, socket, log };
        relayd.wait_ready();
        relayd
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "relayd exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("relayd not ready after 20 s:\n{}", self.log());
    }

    /// The SHA-256 fingerprint of the signalling certificate, as relayd logs it at start.
    pub fn signalling_fingerprint(&self) -> String {
        let log = self.log();
        log.lines()
            .find(|line| line.contains("signalling: listening"))
            .and_then(|line| line.split("sha256=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no signalling fingerprint logged:\n{log}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs relayctl against this relayd.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(binary("relayctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run relayctl")
    }

    /// Runs relayctl, panics unless it succeeds, returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "relayctl {args:?} failed: {}\nrelayd log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).expect("utf-8")
    }

    /// `relayctl --json ...` parsed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        serde_json::from_str(&self.ctl_ok(&full)).expect("relayctl --json prints JSON")
    }

    /// `relayctl --json ...` until `done` holds of what it prints (relayd's bookkeeping may
    /// trail what a peer saw by a moment), at most `within`; the last print either way.
    pub fn ctl_json_until(
        &self,
        args: &[&str],
        within: std::time::Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let printed = self.ctl_json(args);
            if done(&printed) || std::time::Instant::now() >= deadline {
                return printed;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits until the flow table is empty (a call's end removed its flows), at most
    /// `within`; panics naming `what` with the flows left and the log.
    pub fn wait_for_no_flows(&self, within: std::time::Duration, what: &str) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let flows = self.ctl_json(&["flow", "list"]);
            if flows["flows"]
                .as_array()
                .is_some_and(|flows| flows.is_empty())
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {flows}\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Flows, stats and log, for a failing test's message.
    pub fn diagnostics(&self) -> String {
        format!(
            "flows: {}\nstats: {}\nrelayd log:\n{}",
            self.ctl_ok(&["flow", "list"]),
            self.ctl_ok(&["stats"]),
            self.log()
        )
    }

    /// SIGKILL, as a crash or the OOM killer would: nothing of relayd's shutdown runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for relayd to exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        // SAFETY: kill on the pid of a child we own and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Relayd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.socket);
        if !thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// `GET path` from `addr` inside `ns`: the response body, or a panic saying what failed.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> String {
    let addr = addr.to_owned();
    let path = path.to_owned();
    ns.enter(move || http_get_here(&addr, &path))
}

/// `GET path` from `addr` in the test's own network namespace (loopback).
pub fn http_get_here(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|err| panic!("connect {addr}: {err}"));
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

/// The value of the sample `series` (name and labels, as printed) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
