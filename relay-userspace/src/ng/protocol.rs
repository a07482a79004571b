//! ng requests, parsed once into types: the command and what it names, and the options a
//! SIP proxy's `rtpengine` module passes (as dictionary keys, or as words of the `flags`
//! list: Kamailio's module sends `ICE=remove` as the key `ICE`, `replace-origin` as
//! `replace: [origin]`, unknown words in `flags`). Options rtpengine ignores are accepted and
//! ignored here; unknown ones are accepted and named in the reply's `warning`.

use std::net::IpAddr;

use super::bencode::Value;
use crate::session::streams::RtcpMux;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Offer(Signal),
    Answer(Signal),
    Delete(Target),
    Query(Target),
    List { limit: usize },
    Statistics,
}

impl Request {
    pub fn command(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Offer(_) => "offer",
            Request::Answer(_) => "answer",
            Request::Delete(_) => "delete",
            Request::Query(_) => "query",
            Request::List { .. } => "list",
            Request::Statistics => "statistics",
        }
    }
}

/// An `offer` or `answer`: the SDP of the side that sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub call_id: String,
    pub from_tag: String,
    /// Always in an answer; in an offer, a re-INVITE's.
    pub to_tag: Option<String>,
    pub via_branch: Option<String>,
    pub sdp: String,
    pub options: Options,
}

/// A `delete` or `query`: a call, or one branch of it (`to-tag`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub call_id: String,
    pub from_tag: Option<String>,
    pub to_tag: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ice {
    /// ICE attributes removed: the side is plain UDP.
    #[default]
    Remove,
    /// `ICE=force`: the relay as an ICE agent toward the side that gets the SDP.
    Force,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Options {
    pub ice: Ice,
    /// `DTLS=passive|active`: the relay terminating DTLS (not `off`).
    pub dtls: Option<String>,
    /// `transport-protocol=`: the profile the other side is to get.
    pub transport_protocol: Option<String>,
    /// `direction=`: the interface toward the sender, then toward the other side.
    pub direction: Vec<String>,
    pub replace_origin: bool,
    /// `received-from=[IP4, address]`: where the proxy got the SIP message.
    pub received_from: Option<IpAddr>,
    /// `trust-address`: the SDP's addresses, not the SIP source.
    pub trust_address: bool,
    /// `SIP-source-address`: the SIP source in place of the SDP's addresses.
    pub sip_source_address: bool,
    /// `asymmetric`: never learn a side's address from its media.
    pub asymmetric: bool,
    /// `full-rtcp-attribute`: `a=rtcp:PORT IN IP4 ADDRESS` rather than `a=rtcp:PORT`.
    pub full_rtcp_attribute: bool,
    /// `rtcp-mux-offer` / `rtcp-mux-demux`: add or remove a=rtcp-mux toward the other side.
    pub rtcp_mux: RtcpMux,
    /// Options this relay does not know, as the proxy wrote them.
    pub unknown: Vec<String>,
}

/// A request the relay refuses: the reply's `error-reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NgError(pub String);

impl NgError {
    pub fn new(reason: impl Into<String>) -> NgError {
        NgError(reason.into())
    }
}

/// Options rtpengine accepts and that change nothing for this relay's plain-UDP legs.
const IGNORED: &[&str] = &[
    "replace-session-connection",
    "replace-session-name",
    "replace-sdp-version",
    "replace-username",
    "symmetric",
    "port-latching",
    "no-rtcp-attribute",
    "loop-protect",
    "record-call",
    "strict-source",
    "media-handover",
    "rtcp-mux-accept",
    "sdes-off",
    "dtls=off",
    "ice=default",
    "codec-strip-all",
    "generate-mid",
];

/// An option's name as rtpengine compares them: `trust address`, `trust_address` and
/// `Trust-Address` are one option (the Perl client writes spaces, Kamailio dashes).
fn normal(name: &str) -> String {
    name.replace([' ', '_'], "-").to_ascii_lowercase()
}

/// A dictionary key, written with dashes or with spaces.
fn key<'a>(message: &'a Value, name: &str) -> Option<&'a Value> {
    message
        .get(name)
        .or_else(|| message.get(&name.replace('-', " ")))
}

pub fn parse(message: &Value) -> Result<Request, NgError> {
    let Value::Dict(_) = message else {
        return Err(NgError::new("the message is not a bencode dictionary"));
    };
    let text = |key: &str| -> Result<Option<String>, NgError> {
        match message.get(key) {
            None => Ok(None),
            Some(value) => match value.as_str() {
                Some(text) => Ok(Some(text.into_owned())),
                None => Err(NgError::new(format!("{key}: expected a string"))),
            },
        }
    };
    let required = |key: &str| -> Result<String, NgError> {
        text(key)?
            .filter(|value| !value.is_empty())
            .ok_or_else(|| NgError::new(format!("no {key} in the message")))
    };
    let command = required("command")?;
    let request = match command.as_str() {
        "ping" => Request::Ping,
        "offer" | "answer" => {
            let signal = Signal {
                call_id: required("call-id")?,
                from_tag: required("from-tag")?,
                to_tag: text("to-tag")?.filter(|tag| !tag.is_empty()),
                via_branch: text("via-branch")?,
                sdp: required("sdp")?,
                options: options(message)?,
            };
            if command == "offer" {
                Request::Offer(signal)
            } else {
                if signal.to_tag.is_none() {
                    return Err(NgError::new("no to-tag in the answer"));
                }
                Request::Answer(signal)
            }
        }
        "delete" | "query" => {
            let target = Target {
                call_id: required("call-id")?,
                from_tag: text("from-tag")?.filter(|tag| !tag.is_empty()),
                to_tag: text("to-tag")?.filter(|tag| !tag.is_empty()),
            };
            if command == "delete" {
                Request::Delete(target)
            } else {
                Request::Query(target)
            }
        }
        "list" => Request::List {
            limit: match message.get("limit") {
                None => 32,
                Some(Value::Int(n)) if *n > 0 => usize::try_from(*n).unwrap_or(usize::MAX),
                Some(value) => match value.as_str().and_then(|s| s.parse().ok()) {
                    Some(n) if n > 0 => n,
                    _ => return Err(NgError::new("limit: expected a positive integer")),
                },
            },
        },
        "statistics" => Request::Statistics,
        other => return Err(NgError::new(format!("unknown command {other:?}"))),
    };
    Ok(request)
}

/// Every option the message carries, from its keys and its `flags` words.
fn options(message: &Value) -> Result<Options, NgError> {
    let mut words: Vec<(String, Option<String>)> = Vec::new();
    let list = |key: &str| -> Result<Vec<String>, NgError> {
        match self::key(message, key) {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(|s| s.into_owned())
                        .ok_or_else(|| NgError::new(format!("{key}: expected a list of strings")))
                })
                .collect(),
            // A single word where a list is usual.
            Some(value) => value
                .as_str()
                .map(|s| vec![s.into_owned()])
                .ok_or_else(|| NgError::new(format!("{key}: expected a list of strings"))),
        }
    };
    for word in list("flags")? {
        match word.split_once('=') {
            Some((key, value)) => words.push((key.to_owned(), Some(value.to_owned()))),
            None => words.push((word, None)),
        }
    }
    for (key, prefix) in [
        ("replace", "replace-"),
        ("rtcp-mux", "rtcp-mux-"),
        ("SDES", "SDES-"),
    ] {
        for word in list(key)? {
            words.push((format!("{prefix}{word}"), None));
        }
    }
    for key in ["ICE", "DTLS", "transport-protocol"] {
        if let Some(value) = self::key(message, key) {
            let value = value
                .as_str()
                .ok_or_else(|| NgError::new(format!("{key}: expected a string")))?;
            words.push((key.to_owned(), Some(value.into_owned())));
        }
    }
    let mut options = Options {
        direction: list("direction")?,
        ..Options::default()
    };
    if let Some(from) = self::key(message, "received-from") {
        let parts = list("received-from").ok().filter(|parts| parts.len() == 2);
        let address = parts
            .and_then(|parts| parts[1].parse::<IpAddr>().ok())
            .ok_or_else(|| {
                NgError::new(format!(
                    "received-from: expected [IP4|IP6, address], got {}",
                    String::from_utf8_lossy(&from.encode())
                ))
            })?;
        options.received_from = Some(address);
    }
    for (key, value) in words {
        let word = match &value {
            Some(value) => format!("{key}={value}"),
            None => key.clone(),
        };
        let name = normal(&key);
        let lowered = value.as_deref().map(str::to_ascii_lowercase);
        if IGNORED.contains(&normal(&word).as_str()) {
            continue;
        }
        match (name.as_str(), lowered.as_deref()) {
            ("ice", Some("remove")) => options.ice = Ice::Remove,
            ("ice", Some("force" | "force-relay")) => options.ice = Ice::Force,
            ("ice", Some(other)) => {
                return Err(NgError::new(format!(
                    "ICE={other}: expected remove, force or default"
                )));
            }
            ("dtls", Some(mode @ ("passive" | "active"))) => options.dtls = Some(mode.to_owned()),
            ("transport-protocol", Some(_)) => options.transport_protocol = value.clone(),
            (
                "rtp/avp" | "rtp/savp" | "rtp/avpf" | "rtp/savpf" | "udp/tls/rtp/savp"
                | "udp/tls/rtp/savpf",
                None,
            ) => options.transport_protocol = Some(key.to_ascii_uppercase()),
            ("direction", Some(_)) => options.direction.extend(value.clone()),
            ("replace-origin", None) => options.replace_origin = true,
            ("trust-address", None) => options.trust_address = true,
            ("sip-source-address", None) => options.sip_source_address = true,
            ("asymmetric", None) => options.asymmetric = true,
            ("full-rtcp-attribute", None) => options.full_rtcp_attribute = true,
            ("rtcp-mux-offer", None) => options.rtcp_mux = RtcpMux::Offer,
            ("rtcp-mux-demux", None) => options.rtcp_mux = RtcpMux::Demux,
            _ if name.starts_with("sdes-") => {}
            _ => options.unknown.push(word),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ng::bencode::decode;

    fn request(text: &str) -> Result<Request, NgError> {
        parse(&decode(text.as_bytes()).unwrap())
    }

    #[test]
    fn kamailios_offer_with_its_options_as_keys_and_flags() {
        let offer = "d7:call-id3:c-19:directionl3:lan3:wane13:received-froml3:IP49:10.40.0.2e3:ICE6:remove7:command5:offer5:flagsl13:trust-address7:bogus=1e8:from-tag2:t17:replacel6:origine3:sdp3:v=018:transport-protocol7:RTP/AVP8:rtcp-muxl5:demuxee";
        let Request::Offer(signal) = request(offer).unwrap() else {
            panic!("an offer")
        };
        assert_eq!(signal.call_id, "c-1");
        assert_eq!(signal.from_tag, "t1");
        assert_eq!(signal.to_tag, None);
        let options = signal.options;
        assert_eq!(options.direction, ["lan", "wan"]);
        assert_eq!(options.received_from, Some("10.40.0.2".parse().unwrap()));
        assert_eq!(options.ice, Ice::Remove);
        assert!(options.trust_address && options.replace_origin);
        assert_eq!(options.transport_protocol.as_deref(), Some("RTP/AVP"));
        assert_eq!(options.rtcp_mux, RtcpMux::Demux);
        assert_eq!(options.unknown, ["bogus=1"]);
    }

    #[test]
    fn flags_words_say_the_same_as_keys() {
        let offer = "d7:call-id1:c7:command5:offer5:flagsl9:ICE=force13:direction=lan14:rtcp-mux-offer8:SDES-off8:RTP/SAVPe8:from-tag1:f3:sdp3:v=0e";
        let Request::Offer(signal) = request(offer).unwrap() else {
            panic!("an offer")
        };
        let options = signal.options;
        assert_eq!(options.ice, Ice::Force);
        assert_eq!(options.direction, ["lan"]);
        assert_eq!(options.rtcp_mux, RtcpMux::Offer);
        assert_eq!(options.transport_protocol.as_deref(), Some("RTP/SAVP"));
        assert!(options.unknown.is_empty(), "{:?}", options.unknown);
    }

    #[test]
    fn the_perl_clients_spaces_are_kamailios_dashes() {
        let offer = "d7:call-id1:c7:command5:offer5:flagsl13:trust address18:SIP source address19:full rtcp attributee8:from-tag1:f7:replacel18:session connectione3:sdp3:v=018:transport protocol8:RTP/SAVPe";
        let Request::Offer(signal) = request(offer).unwrap() else {
            panic!("an offer")
        };
        let options = signal.options;
        assert!(options.trust_address && options.sip_source_address && options.full_rtcp_attribute);
        assert_eq!(options.transport_protocol.as_deref(), Some("RTP/SAVP"));
        assert!(options.unknown.is_empty(), "{:?}", options.unknown);
    }

    #[test]
    fn each_bad_request_says_what_is_wrong() {
        for (message, reason) in [
            ("le", "the message is not a bencode dictionary"),
            ("d4:call1:xe", "no command in the message"),
            ("d7:command4:fonde", "unknown command \"fond\""),
            ("d7:commandi1ee", "command: expected a string"),
            ("d7:command5:offere", "no call-id in the message"),
            (
                "d7:call-id1:c7:command5:offer8:from-tag1:fe",
                "no sdp in the message",
            ),
            (
                "d7:call-id1:c7:command6:answer8:from-tag1:f3:sdp3:v=0e",
                "no to-tag in the answer",
            ),
            (
                "d7:call-id1:c7:command5:offer8:from-tag1:f3:ICE4:hmm!3:sdp3:v=0e",
                "ICE=hmm!: expected remove, force or default",
            ),
            (
                "d7:call-id1:c7:command5:offer8:from-tag1:f13:received-froml3:IP4e3:sdp3:v=0e",
                "received-from: expected [IP4|IP6, address], got l3:IP4e",
            ),
            (
                "d7:command4:list5:limiti0ee",
                "limit: expected a positive integer",
            ),
        ] {
            assert_eq!(request(message), Err(NgError::new(reason)), "{message}");
        }
    }

    #[test]
    fn delete_query_list_and_the_rest() {
        assert_eq!(request("d7:command4:pinge").unwrap(), Request::Ping);
        assert_eq!(
            request("d7:call-id1:c7:command6:delete8:from-tag1:f6:to-tag0:e").unwrap(),
            Request::Delete(Target {
                call_id: "c".into(),
                from_tag: Some("f".into()),
                to_tag: None
            })
        );
        assert_eq!(
            request("d7:command4:list5:limit1:5e").unwrap(),
            Request::List { limit: 5 }
        );
        assert_eq!(
            request("d7:command10:statisticse").unwrap(),
            Request::Statistics
        );
    }
}
