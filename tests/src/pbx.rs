//! The PBX end of the calls tests: an RTP echo on the PBX's LAN address (what a phone
//! behind the PBX sends back), and SIP toward sipp as a real PBX-side user agent.

/// The PBX's RTP address in the edge lab, and its plain offer (PCMU and DTMF, RTCP on the
/// next port).
pub const RTP: &str = "10.30.0.2:40000";
pub const SDP: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

/// The PBX's offer when it speaks DTLS-SRTP (as Asterisk or FreeSWITCH with DTLS on a
/// trunk): its certificate's `fingerprint`, `a=setup:actpass`, rtcp-mux, no ICE.
pub fn dtls_sdp(fingerprint: &str) -> String {
    [
        "v=0",
        "o=pbx 1 1 IN IP4 10.30.0.2",
        "s=pbx",
        "c=IN IP4 10.30.0.2",
        "t=0 0",
        "m=audio 40000 UDP/TLS/RTP/SAVP 0 8",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        &format!("a=fingerprint:{fingerprint}"),
        "a=setup:actpass",
        "a=rtcp-mux",
        "a=sendrecv",
        "",
    ]
    .join("\r\n")
}

/// Echoes every datagram back to its sender, until the task is aborted.
pub async fn rtp_echo(socket: std::net::UdpSocket) {
    socket.set_nonblocking(true).expect("nonblocking");
    let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
    let mut buf = vec![0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// sipp (Debian `sip-tester`) as the user agent behind the PBX: its default UAS scenario
/// answers INVITEs with its SDP (PCMU on `media`) and, with `-rtp_echo`, sends back every
/// RTP packet to its sender. It exits by itself after `calls` calls (BYE and 4 s of
/// time-wait); killed on drop otherwise.
pub struct Sipp {
    process: crate::process::Background,
    output: std::path::PathBuf,
    pub sip: std::net::SocketAddr,
    pub media: std::net::SocketAddr,
}

impl Sipp {
    pub fn uas(
        ns: &crate::netns::NetNs,
        sip: std::net::SocketAddr,
        media: std::net::SocketAddr,
        calls: u32,
    ) -> Sipp {
        let output = std::env::temp_dir().join(crate::unique("relay-sipp-"));
        let (ip, port, media_ip, media_port, calls) = (
            sip.ip().to_string(),
            sip.port().to_string(),
            media.ip().to_string(),
            media.port().to_string(),
            calls.to_string(),
        );
        let process = crate::process::Background::spawn_with_output(
            ns,
            &[
                "sipp",
                "-sn",
                "uas",
                "-i",
                &ip,
                "-p",
                &port,
                "-mi",
                &media_ip,
                "-mp",
                &media_port,
                "-rtp_echo",
                "-m",
                &calls,
                "-nostdin",
            ],
            &output,
        );
        Sipp {
            process,
            output,
            sip,
            media,
        }
    }

    /// sipp as the calling user agent: its `uac_pcap` scenario calls `remote` from `sip`
    /// with its SDP (PCMA and DTMF on `media`'s address), plays 8 s of G.711 audio and a
    /// DTMF digit as RTP (the recordings Debian ships) and hangs up; `calls` calls.
    pub fn uac_pcap(
        ns: &crate::netns::NetNs,
        sip: std::net::SocketAddr,
        media: std::net::SocketAddr,
        remote: std::net::SocketAddr,
        calls: u32,
    ) -> Sipp {
        let output = std::env::temp_dir().join(crate::unique("relay-sipp-"));
        // The scenario plays pcap/<name>.pcap relative to its working directory.
        let dir = std::env::temp_dir().join(crate::unique("relay-sipp-uac-"));
        std::fs::create_dir_all(&dir).expect("sipp dir");
        let _ = std::os::unix::fs::symlink("/usr/share/sip-tester", dir.join("pcap"));
        let command = format!(
            "cd {} && exec sipp -sn uac_pcap {remote} -i {} -p {} -mi {} -mp {} -m {calls} -nostdin",
            dir.display(),
            sip.ip(),
            sip.port(),
            media.ip(),
            media.port(),
        );
        let process =
            crate::process::Background::spawn_with_output(ns, &["sh", "-c", &command], &output);
        Sipp {
            process,
            output,
            sip,
            media,
        }
    }

    /// Waits for sipp to finish its calls; its final screen.
    pub fn finish(&mut self) -> String {
        let exited = self.process.wait_exit(std::time::Duration::from_secs(15));
        let screen = std::fs::read_to_string(&self.output).unwrap_or_default();
        assert!(exited, "sipp did not finish its calls:\n{screen}");
        screen
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.output);
    }
}

/// The calls sipp counts as successful (INVITE, ACK, BYE as its scenario expects), from
/// its final statistics screen ("Successful call", cumulative column).
pub fn sipp_successful_calls(screen: &str) -> Option<u64> {
    screen
        .lines()
        .filter(|line| line.trim_start().starts_with("Successful call"))
        .filter_map(|line| line.rsplit('|').next()?.trim().parse().ok())
        .next_back()
}

/// The controller's SIP side toward sipp: one dialog over UDP (INVITE, ACK, BYE), as a PBX
/// trunk would run it. Only what the tests need: no authentication, no forking.
pub struct SipDialog {
    socket: std::net::UdpSocket,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    call_id: String,
    from_tag: String,
    to_tag: String,
    cseq: u32,
}

/// A SIP response: its status code and body.
pub struct SipResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl SipDialog {
    /// Sends an INVITE from `socket` to `remote` (with `sdp`, or none for a late offer) and
    /// waits for its 200 OK, retransmitting every 500 ms (RFC 3261 timer A, simplified).
    pub fn invite(
        socket: std::net::UdpSocket,
        remote: std::net::SocketAddr,
        sdp: Option<&str>,
    ) -> (SipDialog, SipResponse) {
        let local = socket.local_addr().expect("SIP socket");
        let unique = crate::unique("");
        let mut dialog = SipDialog {
            socket,
            local,
            remote,
            call_id: format!("{unique}@{}", local.ip()),
            from_tag: format!("t{unique}"),
            to_tag: String::new(),
            cseq: 1,
        };
        let invite = dialog.request("INVITE", sdp);
        let ok = dialog.transaction(&invite, "INVITE");
        dialog.to_tag = ok
            .header("To")
            .and_then(|to| to.split(";tag=").nth(1))
            .map(|tag| tag.split(';').next().unwrap_or(tag).to_owned())
            .expect("a To tag in the 200 OK");
        (dialog, ok)
    }

    /// The ACK of the 2xx, with the answer when the INVITE had no offer.
    pub fn ack(&mut self, sdp: Option<&str>) {
        let ack = self.request("ACK", sdp);
        self.socket
            .send_to(ack.as_bytes(), self.remote)
            .expect("SIP send");
    }

    /// Ends the dialog: BYE, and its 200 OK.
    pub fn bye(&mut self) {
        self.cseq += 1;
        let bye = self.request("BYE", None);
        let ok = self.transaction(&bye, "BYE");
        assert_eq!(ok.status, 200);
    }

    fn request(&self, method: &str, body: Option<&str>) -> String {
        let (local, remote) = (self.local, self.remote);
        let to_tag = if self.to_tag.is_empty() {
            String::new()
        } else {
            format!(";tag={}", self.to_tag)
        };
        let cseq = if method == "ACK" { 1 } else { self.cseq };
        let body = body.unwrap_or("");
        let content_type = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/sdp\r\n"
        };
        format!(
            "{method} sip:echo@{remote} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:pbx@{local}>;tag={}\r\n\
             To: <sip:echo@{remote}>{to_tag}\r\n\
             Call-ID: {}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:pbx@{local}>\r\n\
             {content_type}Content-Length: {}\r\n\r\n{body}",
            crate::unique(""),
            self.from_tag,
            self.call_id,
            body.len(),
        )
    }

    /// Sends `request` until a final response to `method` comes (provisional ones are
    /// skipped); at most 10 s.
    fn transaction(&self, request: &str, method: &str) -> SipResponse {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        self.socket
            .set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .expect("SIP socket timeout");
        let mut buf = vec![0u8; 65536];
        let mut resend = true;
        while std::time::Instant::now() < deadline {
            if resend {
                self.socket
                    .send_to(request.as_bytes(), self.remote)
                    .expect("SIP send");
            }
            let Ok((n, _)) = self.socket.recv_from(&mut buf) else {
                resend = true;
                continue;
            };
            resend = false;
            let response = parse_response(&String::from_utf8_lossy(&buf[..n]));
            if let Some(response) = response
                && response.status >= 200
                && response
                    .header("CSeq")
                    .is_some_and(|cseq| cseq.ends_with(method))
            {
                return response;
            }
        }
        panic!("no final response to {method} from {}", self.remote);
    }
}

impl SipResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

fn parse_response(text: &str) -> Option<SipResponse> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("SIP/2.0 ")?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Some(SipResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}
