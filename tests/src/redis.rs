//! A real redis-server (Debian's) inside a test's network namespace, on loopback, with
//! nothing kept on disk, plain or TLS only (certificates of a private CA made with openssl);
//! stopped, and its certificates removed, on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{netns::NetNs, process::Background};

pub struct RedisServer {
    process: Background,
    ns: String,
    /// The address it listens on.
    host: String,
    pub port: u16,
    tls: Option<Certificates>,
}

/// A private CA and a server certificate it signed for 127.0.0.1, in a directory of their
/// own.
pub struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn new() -> Certificates {
        let dir = std::env::temp_dir().join(crate::unique("redis-tls-"));
        std::fs::create_dir_all(&dir).expect("certificate directory");
        let certificates = Certificates { dir };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        certificates.openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.crt"],
            ],
            &["-days", "2", "-subj", "/CN=relay test Redis CA"],
        );
        certificates.openssl(
            &[
                &["req"],
                &ec[..],
                &["-keyout", "server.key", "-out", "server.csr"],
            ],
            &["-subj", "/CN=127.0.0.1"],
        );
        std::fs::write(
            certificates.dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("extensions file");
        certificates.openssl(
            &[&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-extfile",
                "server.ext",
            ]],
            &["-days", "2"],
        );
        certificates
    }

    fn openssl(&self, parts: &[&[&str]], rest: &[&str]) {
        let output = Command::new("openssl")
            .args(parts.iter().flat_map(|part| part.iter()))
            .args(rest)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {parts:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The password of a redis-server that listens beyond loopback.
const PASSWORD: &str = "a-redis-password-of-the-lab";

impl RedisServer {
    /// Starts redis-server on 127.0.0.1:`port` inside `ns` and waits until it answers PING.
    pub fn start(ns: &NetNs, port: u16) -> RedisServer {
        RedisServer::launch(ns, "127.0.0.1", port, None)
    }

    /// Starts redis-server on `host`:`port` inside `ns` (an address of `ns` others reach),
    /// with a password ([`Self::url`] carries it): clients from elsewhere must give one.
    pub fn start_on(ns: &NetNs, host: &str, port: u16) -> RedisServer {
        RedisServer::launch(ns, host, port, None)
    }

    /// The password of a server others reach.
    fn password(&self) -> Option<&str> {
        (self.host != "127.0.0.1").then_some(PASSWORD)
    }

    /// The same speaking TLS only, with a certificate of a private CA ([`Self::ca_file`]).
    pub fn start_tls(ns: &NetNs, port: u16) -> RedisServer {
        RedisServer::launch(ns, "127.0.0.1", port, Some(Certificates::new()))
    }

    fn launch(ns: &NetNs, host: &str, port: u16, tls: Option<Certificates>) -> RedisServer {
        let port_text = port.to_string();
        let mut args: Vec<String> = [
            "redis-server",
            "--bind",
            host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ]
        .map(str::to_owned)
        .to_vec();
        match &tls {
            None => args.extend(["--port".to_owned(), port_text]),
            Some(certificates) => args.extend([
                "--port".to_owned(),
                "0".to_owned(),
                "--tls-port".to_owned(),
                port_text,
                "--tls-cert-file".to_owned(),
                certificates.file("server.crt"),
                "--tls-key-file".to_owned(),
                certificates.file("server.key"),
                "--tls-ca-cert-file".to_owned(),
                certificates.file("ca.crt"),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ]),
        }
        if host != "127.0.0.1" {
            args.extend(["--requirepass".to_owned(), PASSWORD.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Background::spawn(ns, &args);
        let server = RedisServer {
            process,
            ns: ns.name.clone(),
            host: host.to_owned(),
            port,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} does not answer PING after 10 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => match self.password() {
                Some(password) => format!("redis://:{password}@{}:{}", self.host, self.port),
                None => format!("redis://{}:{}", self.host, self.port),
            },
            Some(_) => format!("rediss://{}:{}", self.host, self.port),
        }
    }

    /// The CA that signed a TLS server's certificate.
    pub fn ca_file(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|certificates| certificates.file("ca.crt"))
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.ns,
            "redis-cli",
            "-h",
            &self.host,
            "-p",
        ]);
        command.arg(self.port.to_string());
        if let Some(password) = self.password() {
            command.args(["-a", password, "--no-auth-warning"]);
        }
        if let Some(ca) = self.ca_file() {
            command.args(["--tls", "--cacert", &ca]);
        }
        let output = command.args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `redis-cli COMMAND ...`'s output, trimmed; panics if redis-cli fails.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed (redis-server {})", self.pid()))
    }

    /// `redis-cli args` until `done` holds of its output, at most `within`; the output.
    pub fn cli_until(
        &self,
        args: &[&str],
        within: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let got = self.cli(args);
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "redis-cli {args:?}: {got:?} after {within:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
