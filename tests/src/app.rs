//! An app as the relay's users run it: a signalling client with the token its controller
//! minted, and a webrtc-ice agent (an implementation we did not write) for the media. Used
//! by the calls test and the demo; runs in the namespace of the thread that creates it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use serde_json::{Value, json};
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
    network_type::NetworkType,
    udp_network::UDPNetwork,
    url::Url,
};

use crate::signalling_client::{Socket, call, connect_here, receive_within};

/// The app's media connection once ICE has connected.
pub type Media = Arc<dyn webrtc_util::Conn + Send + Sync>;

pub struct App {
    pub signalling: Socket,
    /// The app's own address (its host candidate's IP).
    ip: IpAddr,
    /// A TURN server its agents also gather a relayed candidate from (`turn:` URL with
    /// its username and password).
    turn: Option<Url>,
    /// Send its candidates after its answer, one `call.candidate` each (trickle ICE).
    trickle: bool,
    /// Events that arrived while the app waited for the answer to a request.
    pending: std::collections::VecDeque<Value>,
    agents: Vec<Arc<Agent>>,
}

impl App {
    /// Connects to the relay's signalling at `address` with `token`; `ip` is the app's
    /// address on its network (behind its NAT).
    pub async fn connect(address: SocketAddr, fingerprint: &str, token: &str, ip: IpAddr) -> App {
        let (signalling, _) = hello(address, fingerprint, token).await;
        App {
            signalling,
            ip,
            turn: None,
            trickle: false,
            pending: std::collections::VecDeque::new(),
            agents: Vec::new(),
        }
    }

    /// An app in the edge lab's app namespace (the calling thread must be in it), connected
    /// with `token`.
    pub async fn in_edge_lab(fingerprint: &str, token: &str) -> App {
        App::connect(
            crate::lab::EdgeLab::SIGNALLING.parse().expect("address"),
            fingerprint,
            token,
            crate::lab::EdgeLab::APP.parse().expect("address"),
        )
        .await
    }

    /// From now on the app answers without candidates and trickles them after its answer
    /// (RFC 8838), as WebRTC apps do.
    pub fn trickle(&mut self) {
        self.trickle = true;
    }

    /// A request and its answer (the `result` or `error` with its `id`); events that come
    /// meanwhile wait for [`App::next`].
    pub async fn request(&mut self, message: Value) -> Value {
        let id = message["id"].clone();
        crate::signalling_client::send(&mut self.signalling, message).await;
        loop {
            let message = receive_within(&mut self.signalling, Duration::from_secs(10))
                .await
                .expect("the relay keeps the session");
            if message["type"] != "event" && message["id"] == id {
                return message;
            }
            self.pending.push_back(message);
        }
    }

    /// The signalling connection drops (the phone's network blinked) and the app connects
    /// again with its token; returns the new session's `welcome` (which lists the calls it
    /// resumes). The media is not touched.
    pub async fn reconnect(
        &mut self,
        address: SocketAddr,
        fingerprint: &str,
        token: &str,
    ) -> Value {
        let (signalling, welcome) = hello(address, fingerprint, token).await;
        // Dropped without a close frame, as a lost connection is.
        drop(std::mem::replace(&mut self.signalling, signalling));
        welcome
    }

    /// From now on the app's agents also allocate on this TURN server (`turn:HOST:PORT`,
    /// UDP) and offer the relayed candidate: what an app does when only TURN gets through.
    pub fn use_turn(&mut self, url: &str, username: &str, password: &str) {
        let mut url = Url::parse_url(url).expect("a turn: URL");
        url.username = username.to_owned();
        url.password = password.to_owned();
        self.turn = Some(url);
    }

    /// The next event or message from the relay.
    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(5)).await
    }

    /// The next event or message, waiting up to `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Value {
        if let Some(message) = self.pending.pop_front() {
            return message;
        }
        receive_within(&mut self.signalling, limit)
            .await
            .expect("the relay keeps the session")
    }

    /// A fresh ICE agent with its host candidate gathered: (agent, ufrag, pwd, candidates,
    /// the candidate's address).
    async fn agent(&self) -> (Arc<Agent>, String, String, Vec<String>, SocketAddr) {
        let agent = IceAgent::gather(self.ip, self.turn.clone()).await;
        (
            agent.agent,
            agent.ufrag,
            agent.pwd,
            agent.candidates,
            agent.host,
        )
    }

    /// Calls out (to the PBX) with an offer for PCMU and DTMF; returns the call's id and
    /// the media connection once ICE has connected (the app offered: it is controlling).
    pub async fn call_out(&mut self) -> (Value, Media) {
        let (call, media, _) = self.call_out_edited(|offer| offer).await;
        (call, media)
    }

    /// [`App::call_out`] with `edit` applied to the app's offer (media security of its
    /// own); returns the relay's answer too.
    pub async fn call_out_edited(
        &mut self,
        edit: impl FnOnce(String) -> String,
    ) -> (Value, Media, String) {
        self.call_out_until(edit, Some("connected")).await
    }

    /// [`App::call_out_edited`] that returns once ICE has connected and, if `state` is
    /// given, the relay has said it (a DTLS-SRTP app has its handshake to do first).
    pub async fn call_out_until(
        &mut self,
        edit: impl FnOnce(String) -> String,
        state: Option<&str>,
    ) -> (Value, Media, String) {
        let (agent, ufrag, pwd, candidates, host) = self.agent().await;
        let offer = edit(offer_sdp(&ufrag, &pwd, &candidates, host));
        let created = call(
            &mut self.signalling,
            json!({"type": "call.create", "id": 2, "sdp": offer}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let answered = self.next_within(Duration::from_secs(10)).await;
        assert_eq!(answered["event"], "call.answered", "{answered}");
        let answer = answered["sdp"].as_str().expect("an answer").to_owned();
        let media = self.run_ice(agent, &answer, true, state).await;
        (created["call"].clone(), media, answer)
    }

    /// Answers a `call.incoming` with a fresh ICE agent and connects it (controlled);
    /// returns the media connection once the relay says `connected`.
    pub async fn answer(&mut self, incoming: &Value) -> Media {
        self.answer_edited(incoming, |answer| answer, Some("connected"))
            .await
    }

    /// [`App::answer`] with `edit` applied to the app's SDP answer (media security of its
    /// own); returns the media connection once ICE has connected and, if `state` is given,
    /// the relay has said it (a bridged call is `connected` only after its DTLS handshake).
    pub async fn answer_edited(
        &mut self,
        incoming: &Value,
        edit: impl FnOnce(String) -> String,
        state: Option<&str>,
    ) -> Media {
        assert_eq!(incoming["event"], "call.incoming", "{incoming}");
        let offer = incoming["sdp"].as_str().expect("an offer").to_owned();
        let (agent, ufrag, pwd, candidates, host) = self.agent().await;
        let in_sdp: &[String] = if self.trickle { &[] } else { &candidates };
        let answer = edit(answer_sdp(&offer, &ufrag, &pwd, in_sdp, host));
        let result = self
            .request(
                json!({"type": "call.answer", "id": 1, "call": incoming["call"], "sdp": answer}),
            )
            .await;
        assert_eq!(result["type"], "result", "{result}");
        if self.trickle {
            for (n, candidate) in candidates.iter().enumerate() {
                let result = self
                    .request(json!({"type": "call.candidate", "id": 100 + n, "call": incoming["call"], "candidate": format!("candidate:{candidate}")}))
                    .await;
                assert_eq!(result["type"], "result", "{result}");
            }
        }
        self.run_ice(agent, &offer, false, state).await
    }

    /// The app moved to another network (its address is now `ip`): an ICE restart with a
    /// fresh agent there (`controlling` as in the call's first run), offered to the relay
    /// in a `call.update`; returns the media connection once the relay says the route
    /// changed.
    pub async fn restart(&mut self, call_id: &Value, ip: IpAddr, controlling: bool) -> Media {
        self.ip = ip;
        let (agent, ufrag, pwd, candidates, host) = self.agent().await;
        let offer = offer_sdp(&ufrag, &pwd, &candidates, host);
        let updated = call(
            &mut self.signalling,
            json!({"type": "call.update", "id": 3, "call": call_id, "sdp": offer}),
        )
        .await;
        assert_eq!(updated["type"], "result", "{updated}");
        let answer = updated["sdp"]
            .as_str()
            .expect("the relay's answer")
            .to_owned();
        self.run_ice(agent, &answer, controlling, Some("route-changed"))
            .await
    }

    /// Runs ICE with the relay's credentials and candidates from its SDP (`controlling`
    /// when the app made the first offer); returns the media connection once the relay
    /// says `state` (connected, or route-changed after a restart), or at once when None.
    async fn run_ice(
        &mut self,
        agent: Arc<Agent>,
        relay_sdp: &str,
        controlling: bool,
        state: Option<&str>,
    ) -> Media {
        let remote = relay::session::sdp::audio(relay_sdp).expect("the relay's SDP");
        let media = connect_ice(
            &agent,
            remote.ice_ufrag.expect("ICE in the relay's SDP"),
            remote.ice_pwd.expect("ICE in the relay's SDP"),
            &remote.candidates,
            controlling,
        )
        .await;
        if let Some(state) = state {
            let said = self.next().await;
            assert_eq!(
                (&said["event"], &said["state"]),
                (&json!("call.state"), &json!(state)),
                "{said}"
            );
        }
        self.agents.push(agent);
        media
    }

    /// Closes the ICE agents (no more media, no more consent answers); signalling stays.
    pub async fn close_agents(&mut self) {
        for agent in self.agents.drain(..) {
            let _ = agent.close().await;
        }
    }

    pub async fn close(mut self) {
        self.close_agents().await;
    }
}

/// A client session with `token`: the socket and its `welcome`.
async fn hello(address: SocketAddr, fingerprint: &str, token: &str) -> (Socket, Value) {
    let mut signalling = connect_here(address, fingerprint).await;
    let welcome = call(
        &mut signalling,
        json!({"type": "hello", "v": 1, "role": "client", "token": token}),
    )
    .await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (signalling, welcome)
}

/// A webrtc-ice agent with its candidates gathered on `ip` (and a TURN server's relayed
/// one when given).
pub struct IceAgent {
    pub agent: Arc<Agent>,
    pub ufrag: String,
    pub pwd: String,
    pub candidates: Vec<String>,
    /// The host candidate's address: what the SDP's c= and m= lines name.
    pub host: SocketAddr,
}

impl IceAgent {
    pub async fn gather(ip: IpAddr, turn: Option<Url>) -> IceAgent {
        let agent = Arc::new(
            Agent::new(AgentConfig {
                network_types: vec![NetworkType::Udp4],
                candidate_types: if turn.is_some() {
                    vec![CandidateType::Host, CandidateType::Relay]
                } else {
                    vec![CandidateType::Host]
                },
                urls: turn.into_iter().collect(),
                udp_network: UDPNetwork::Ephemeral(Default::default()),
                ip_filter: Arc::new(Some(Box::new(move |candidate: IpAddr| candidate == ip))),
                ..Default::default()
            })
            .await
            .expect("ICE agent"),
        );
        let (gathered_tx, mut gathered) = tokio::sync::mpsc::unbounded_channel();
        agent.on_candidate(Box::new(move |candidate| {
            let _ = gathered_tx.send(candidate.map(|c| c.marshal()));
            Box::pin(async {})
        }));
        agent.gather_candidates().expect("gathering");
        let mut candidates = Vec::new();
        while let Some(Some(candidate)) = gathered.recv().await {
            candidates.push(candidate);
        }
        let (ufrag, pwd) = agent.get_local_user_credentials().await;
        let host = candidates
            .iter()
            .filter_map(|candidate| unmarshal_candidate(candidate).ok())
            .find(|candidate| candidate.candidate_type() == CandidateType::Host)
            .expect("a host candidate")
            .addr();
        IceAgent {
            agent,
            ufrag,
            pwd,
            candidates,
            host,
        }
    }
}

/// Runs `agent`'s checks against the relay's credentials and candidates (`controlling`
/// when the agent's side made the offer); the media connection once connected (10 s at
/// most).
pub async fn connect_ice(
    agent: &Agent,
    ufrag: String,
    pwd: String,
    candidates: &[String],
    controlling: bool,
) -> Media {
    for candidate in candidates {
        let candidate: Arc<dyn Candidate + Send + Sync> =
            Arc::new(unmarshal_candidate(candidate).expect("the relay's candidate"));
        agent.add_remote_candidate(&candidate).expect("candidate");
    }
    let (_cancel, cancel_rx) = tokio::sync::mpsc::channel(1);
    let connecting = async {
        if controlling {
            agent.dial(cancel_rx, ufrag, pwd).await.map(|c| c as Media)
        } else {
            agent
                .accept(cancel_rx, ufrag, pwd)
                .await
                .map(|c| c as Media)
        }
    };
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("ICE connects in time")
        .expect("ICE connects")
}

/// What came back of a stretch of [`talk`].
pub struct Talked {
    /// Distinct packets of the stretch that came back, however late (within the grace
    /// period after the last send).
    pub echoed: u32,
    /// When the first packet came back.
    pub first_echo: Option<std::time::Instant>,
    /// The slowest round trip among the packets that came back.
    pub worst_round_trip: Duration,
}

/// How long [`talk`] keeps listening after its last send: a slow round trip on a busy
/// machine is latency, not loss.
const ECHO_GRACE: Duration = Duration::from_secs(1);

/// Sends `count` numbered RTP packets from `first` at 50 per second (one every 20 ms, as a
/// voice call does) and counts, by sequence number, those the PBX's echo sent back over the
/// whole exchange and a grace period after it; the worst round trip is reported apart.
pub async fn talk(media: &Media, first: u32, count: u32) -> Talked {
    let mut talked = Talked {
        echoed: 0,
        first_echo: None,
        worst_round_trip: Duration::ZERO,
    };
    if count == 0 {
        return talked;
    }
    let mut sent_at: Vec<Option<tokio::time::Instant>> = vec![None; count as usize];
    let mut echoed = vec![false; count as usize];
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut buf = vec![0u8; 2048];
    let mut next = first;
    let mut done_sending: Option<tokio::time::Instant> = None;
    loop {
        let grace_over = async {
            match done_sending {
                Some(at) => tokio::time::sleep_until(at + ECHO_GRACE).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pace.tick(), if done_sending.is_none() => {
                let index = (next - first) as usize;
                if media.send(&crate::traffic::numbered(next)).await.is_ok() {
                    sent_at[index] = Some(tokio::time::Instant::now());
                }
                next += 1;
                if next == first + count {
                    done_sending = Some(tokio::time::Instant::now());
                }
            }
            received = media.recv(&mut buf) => {
                let Ok(n) = received else { continue };
                let Some(index) = crate::traffic::sequence_of(&buf[..n])
                    .and_then(|sequence| sequence.checked_sub(first))
                    .filter(|index| *index < count)
                    .map(|index| index as usize)
                else {
                    continue;
                };
                let Some(sent) = sent_at[index] else { continue };
                if !echoed[index] {
                    echoed[index] = true;
                    talked.echoed += 1;
                    talked.first_echo.get_or_insert_with(std::time::Instant::now);
                    talked.worst_round_trip = talked.worst_round_trip.max(sent.elapsed());
                }
                if done_sending.is_some() && talked.echoed == count {
                    break;
                }
            }
            _ = grace_over => break,
        }
    }
    talked
}

/// The app's own offer: PCMU and DTMF over RTP, multiplexed RTCP, its ICE.
pub fn offer_sdp(ufrag: &str, pwd: &str, candidates: &[String], rtp: SocketAddr) -> String {
    let mut lines = vec![
        "v=0".to_owned(),
        format!("o=app 1 1 IN IP4 {}", rtp.ip()),
        "s=-".to_owned(),
        format!("c=IN IP4 {}", rtp.ip()),
        "t=0 0".to_owned(),
        format!("m=audio {} RTP/AVP 0 101", rtp.port()),
        "a=rtpmap:0 PCMU/8000".to_owned(),
        "a=rtpmap:101 telephone-event/8000".to_owned(),
        "a=rtcp-mux".to_owned(),
        "a=sendrecv".to_owned(),
        format!("a=ice-ufrag:{ufrag}"),
        format!("a=ice-pwd:{pwd}"),
    ];
    lines.extend(candidates.iter().map(|c| format!("a=candidate:{c}")));
    lines.join("\r\n") + "\r\n"
}

/// The app's answer to the relay's offer: the offer's codecs, the app's ICE credentials
/// and candidates, its own address.
pub fn answer_sdp(
    offer: &str,
    ufrag: &str,
    pwd: &str,
    candidates: &[String],
    rtp: SocketAddr,
) -> String {
    let mut lines: Vec<String> = offer
        .split("\r\n")
        .filter(|line| !line.is_empty())
        .filter(|line| {
            ![
                "a=candidate",
                "a=end-of-candidates",
                "a=ice-ufrag",
                "a=ice-pwd",
            ]
            .iter()
            .any(|prefix| line.starts_with(prefix))
        })
        .map(|line| {
            if line.starts_with("c=") {
                format!("c=IN IP4 {}", rtp.ip())
            } else if let Some(rest) = line.strip_prefix("m=audio ") {
                let (_, tail) = rest.split_once(' ').expect("m= has a port and more");
                format!("m=audio {} {tail}", rtp.port())
            } else if line.starts_with("o=") {
                format!("o=app 2 2 IN IP4 {}", rtp.ip())
            } else {
                line.to_owned()
            }
        })
        .collect();
    lines.push(format!("a=ice-ufrag:{ufrag}"));
    lines.push(format!("a=ice-pwd:{pwd}"));
    lines.extend(candidates.iter().map(|c| format!("a=candidate:{c}")));
    lines.join("\r\n") + "\r\n"
}
