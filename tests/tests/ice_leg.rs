//! The relay's ICE leg against an app that is a webrtc-ice agent of its own, across the
//! namespace lab: the relay's leg on the shared ICE port (UDP mux on 10.10.1.1:3479) offers
//! its host candidate, the app answers with its own, the checks run, and both sides agree
//! on the selected pair: the relay's ICE port and the app's address, which is what the
//! call's flows are installed on.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, mpsc},
    time::Duration,
};

use relay::ice::leg::{IceLeg, IcePort, LocalIce};
use relay_tests::{lab::ThreeHosts, require_root, runtime};
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
    network_type::NetworkType,
    udp_network::UDPNetwork,
};

const ICE_PORT: &str = "10.10.1.1:3479";
const APP_IP: &str = "10.10.1.2";

/// The app: a webrtc-ice agent with its host candidate on the client namespace's address.
/// Gets the relay's offer, answers, and accepts (controlled); returns its selected pair
/// (local, remote).
async fn app(
    offers: mpsc::Receiver<LocalIce>,
    answers: mpsc::Sender<LocalIce>,
) -> (SocketAddr, SocketAddr) {
    let app_ip: IpAddr = APP_IP.parse().unwrap();
    let agent = Arc::new(
        Agent::new(AgentConfig {
            network_types: vec![NetworkType::Udp4],
            candidate_types: vec![CandidateType::Host],
            udp_network: UDPNetwork::Ephemeral(Default::default()),
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| ip == app_ip))),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let (gathered_tx, mut gathered) = tokio::sync::mpsc::unbounded_channel();
    agent.on_candidate(Box::new(move |candidate| {
        let _ = gathered_tx.send(candidate.map(|c| c.marshal()));
        Box::pin(async {})
    }));
    agent.gather_candidates().unwrap();
    let mut candidates = Vec::new();
    while let Some(Some(candidate)) = gathered.recv().await {
        candidates.push(candidate);
    }
    let (ufrag, pwd) = agent.get_local_user_credentials().await;
    let offer = tokio::task::spawn_blocking(move || offers.recv().unwrap())
        .await
        .unwrap();
    answers
        .send(LocalIce {
            ufrag,
            pwd,
            candidates,
        })
        .unwrap();
    for candidate in &offer.candidates {
        let candidate: Arc<dyn Candidate + Send + Sync> =
            Arc::new(unmarshal_candidate(candidate).unwrap());
        agent.add_remote_candidate(&candidate).unwrap();
    }
    let (_cancel, cancel_rx) = tokio::sync::mpsc::channel(1);
    agent
        .accept(cancel_rx, offer.ufrag, offer.pwd)
        .await
        .expect("the app's ICE connects");
    let pair = agent.get_selected_candidate_pair().unwrap();
    let selected = (pair.local.addr(), pair.remote.addr());
    // Stay up a little, so the relay's side sees the checks through.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = agent.close().await;
    selected
}

#[test]
fn the_relays_leg_and_an_app_agent_select_the_same_pair() {
    require_root();
    let lab = ThreeHosts::new();
    let socket = lab.relay.udp_socket(ICE_PORT.parse().unwrap());
    let (offers_tx, offers) = mpsc::channel();
    let (answers_tx, answers) = mpsc::channel::<LocalIce>();

    // Each side in its own namespace: candidates are gathered from the namespace's
    // interfaces.
    let app_side = {
        let client = lab.client.name.clone();
        std::thread::spawn(move || {
            relay_tests::netns::enter_by_name(&client);
            runtime().block_on(app(offers, answers_tx))
        })
    };
    let relay_pair = lab.relay.enter(move || {
        runtime().block_on(async move {
            let port = IcePort::new(socket).unwrap();
            let (mut leg, offer) = IceLeg::new(&port, Duration::from_secs(30)).await.unwrap();
            assert_eq!(offer.candidates.len(), 1, "{offer:?}");
            assert!(
                offer.candidates[0].contains("10.10.1.1 3479 typ host"),
                "{offer:?}"
            );
            offers_tx.send(offer).unwrap();
            let answer = tokio::task::spawn_blocking(move || answers.recv().unwrap())
                .await
                .unwrap();
            for candidate in &answer.candidates {
                leg.add_remote_candidate(candidate).unwrap();
            }
            let pair = tokio::time::timeout(
                Duration::from_secs(10),
                leg.connect(true, answer.ufrag, answer.pwd),
            )
            .await
            .expect("ICE connects within 10 s")
            .unwrap();
            assert_eq!(*leg.pairs().borrow(), Some(pair));
            // A candidate that is not one is refused with its text.
            let refused = leg.add_remote_candidate("not a candidate").unwrap_err();
            assert!(refused.to_string().contains("not a candidate"), "{refused}");
            tokio::time::sleep(Duration::from_millis(300)).await;
            leg.close().await;
            pair
        })
    });
    let app_pair = app_side.join().unwrap();
    let relay_address: SocketAddr = ICE_PORT.parse().unwrap();
    assert_eq!(relay_pair.local, relay_address);
    assert_eq!(relay_pair.remote.ip().to_string(), APP_IP);
    assert_eq!(app_pair, (relay_pair.remote, relay_pair.local));
    // No NAT between them: both host candidates.
    assert_eq!(
        (relay_pair.local_type, relay_pair.remote_type),
        (CandidateType::Host, CandidateType::Host)
    );
}
