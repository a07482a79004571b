//! `ICE=force` over ng: Kamailio (Debian `kamailio`, its `rtpengine` module) between a
//! WebRTC-style caller whose media is a webrtc-ice agent (an implementation we did not
//! write) on the relay's WAN side and sipp echoing on its LAN side. Kamailio passes
//! `ICE=force` in the offer and the answer: the offer toward sipp carries the relay's ICE,
//! sipp answers without any and its leg stays plain UDP; the answer toward the caller
//! carries the relay's credentials and its one host candidate (the stream's own port), the
//! agent checks and nominates, and the media of the selected pair goes both ways in XDP.
//! The BYE removes every flow.

use std::{net::SocketAddr, time::Duration};

use relay_tests::{
    app::{IceAgent, connect_ice, offer_sdp, talk},
    config_file::ConfigFile,
    kamailio::Kamailio,
    lab::{ThreeHosts, ng_config},
    netns::{PinDir, enter_by_name},
    pbx::{SipDialog, Sipp, sipp_successful_calls},
    relayd::Relayd,
    require_root, runtime,
};
use serde_json::Value;

const NG: &str = "127.0.0.1:2223";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

fn xdp_packets_from(flows: &Value, source: &str) -> u64 {
    flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|flow| flow["src"] == source)
        .map(|flow| flow["counters"]["xdp_packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn a_webrtc_ice_caller_through_kamailio_gets_the_relays_ice_and_its_media_goes_in_xdp() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(&pins.path, NG, "media_timeout_secs = 30"));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let kamailio = Kamailio::start(
        &lab.relay,
        &[addr("10.10.1.1:5060"), addr("10.10.2.1:5060")],
        addr(NG),
        addr("10.10.2.2:5060"),
        "replace-origin ICE=force direction=wan direction=lan",
    );
    let mut callee = Sipp::uas(&lab.peer, addr("10.10.2.2:5060"), addr("10.10.2.2:6000"), 1);
    let sip = lab.client.udp_socket(addr("10.10.1.2:5070"));
    let client = lab.client.name.clone();

    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_by_name(&client);
                runtime().block_on(async {
                    let agent = IceAgent::gather("10.10.1.2".parse().unwrap(), None).await;
                    let offer = offer_sdp(&agent.ufrag, &agent.pwd, &agent.candidates, agent.host);
                    let (mut dialog, ok) = tokio::task::spawn_blocking(move || {
                        let (mut dialog, ok) =
                            SipDialog::invite(sip, addr("10.10.1.1:5060"), Some(&offer));
                        dialog.ack(None);
                        (dialog, ok)
                    })
                    .await
                    .unwrap();

                    // The relay's answer: its ICE on the stream's own port, RTCP multiplexed.
                    let answer = ok.body.clone();
                    let streams = relay::session::streams::streams(&answer, None)
                        .unwrap_or_else(|err| panic!("{err}: {answer}"));
                    let relay_rtp = streams[0].endpoint.expect("audio kept").rtp;
                    assert_eq!(relay_rtp.ip().to_string(), "10.10.1.1", "{answer}");
                    let ice = streams[0]
                        .ice
                        .clone()
                        .expect("the relay's ICE in the answer");
                    assert_eq!(ice.candidates.len(), 1, "{answer}");
                    assert!(
                        ice.candidates[0]
                            .contains(&format!("10.10.1.1 {} typ host", relay_rtp.port())),
                        "{answer}"
                    );
                    assert!(answer.contains("a=rtcp-mux\r\n"), "{answer}");
                    assert!(!answer.contains("10.10.2.2"), "{answer}");

                    // The caller made the offer: its agent is the controlling one.
                    let media =
                        connect_ice(&agent.agent, ice.ufrag, ice.pwd, &ice.candidates, true).await;
                    let talked = talk(&media, 1, 250).await;
                    assert!(
                        talked.echoed >= 240,
                        "{} of 250 packets came back through the relay\n{}",
                        talked.echoed,
                        relayd.log()
                    );

                    // Both directions in the kernel: from the agent's selected address to
                    // the relay's WAN port, and from sipp's echo.
                    let pair = agent
                        .agent
                        .get_selected_candidate_pair()
                        .expect("a selected pair");
                    assert_eq!(pair.remote.addr(), relay_rtp);
                    let flows = relayd.ctl_json(&["flow", "list"]);
                    let from_agent = pair.local.addr().to_string();
                    assert!(
                        xdp_packets_from(&flows, &from_agent) >= 200,
                        "the agent's RTP in XDP: {flows}"
                    );
                    assert!(
                        xdp_packets_from(&flows, "10.10.2.2:6000") >= 200,
                        "the echo in XDP: {flows}"
                    );
                    // The operator sees the call's ICE.
                    let listed = relayd.ctl_json(&["calls", "list"]);
                    assert_eq!(listed["ng_calls"][0]["ice"], "connected", "{listed}");
                    let table = relayd.ctl_ok(&["calls", "list"]);
                    assert!(
                        table.contains(" ICE ") && table.contains("connected"),
                        "{table}"
                    );

                    tokio::task::spawn_blocking(move || dialog.bye())
                        .await
                        .unwrap();
                    let _ = agent.agent.close().await;
                });
            })
            .join()
            .expect("the caller's side");
    });

    // The BYE deleted the call: no flow is left.
    relayd.wait_for_no_flows(Duration::from_secs(5), "the BYE removed every flow");
    let screen = callee.finish();
    assert_eq!(
        sipp_successful_calls(&screen),
        Some(1),
        "{screen}\n{}",
        kamailio.log()
    );
    let log = relayd.log();
    assert!(log.contains("ng: ICE connected"), "{log}");
    // sipp ignored the relay's ICE offer: its leg is plain.
    assert!(
        log.contains("the answer has no ICE for the relay's ICE offer"),
        "{log}"
    );
}
