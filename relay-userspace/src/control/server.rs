//! Serves the control API on a Unix socket: one task per connection, one request per line.

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use super::protocol::{
    self as wire, CallIdParams, CallsListResult, CallsMedia, ClusterNodeParams,
    ClusterStatusResult, ConfigReloadResult, ErrorBody, ErrorKind, FlowAddParams, FlowAddResult,
    FlowIdParams, FlowListResult, MAX_REQUEST_BYTES, PROTOCOL_VERSION, PushCount, PushStatsResult,
    Request, Response, StatsResult, StatusResult, TurnAllocationsResult, TurnRevokeParams,
    TurnRevokeResult, method,
};
use crate::{
    cluster::ForgetRefusal,
    datapath::{
        FlowSpec,
        table::{FlowError, FlowTable},
    },
    reload::Reloader,
    time::monotonic_ns,
    turn::{driver::TurnService, server::RevokeTarget},
};

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Who may use the API besides root and relayd's own user: the socket's group.
    access: Arc<Access>,
}

impl ControlServer {
    /// Binds the socket, replacing a stale socket file but refusing to steal a live one,
    /// mode 0660 in `group` (empty: relayd's own).
    pub fn bind(path: &Path, group: &str) -> anyhow::Result<ControlServer> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "control.socket: {}: another relayd is listening there",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("control.socket: {}: cannot listen", path.display()))?;
        // Owner and group only: the API changes what the relay forwards.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        let gid = if group.is_empty() {
            // SAFETY: getegid has no preconditions.
            unsafe { libc::getegid() }
        } else {
            let gid = group_id(group)
                .with_context(|| format!("control.group: {group:?}: cannot look it up"))?
                .with_context(|| format!("control.group: {group:?}: no such group"))?;
            std::os::unix::fs::chown(path, None, Some(gid)).with_context(|| {
                format!(
                    "control.group: {group:?}: cannot give {} to it",
                    path.display()
                )
            })?;
            gid
        };
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            access: Arc::new(Access {
                gid,
                group: group.to_owned(),
            }),
        })
    }

    pub async fn serve(self, services: Services, mut shutdown: watch::Receiver<bool>) {
        let services = Arc::new(services);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let access = self.access.clone();
                        tokio::spawn(connection(stream, services.clone(), access, shutdown.clone()));
                    }
                    Err(err) => {
                        // Out of descriptors, mostly: trying again at once would spin.
                        tracing::warn!(%err, "control API: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What requests act on.
pub struct Services {
    pub table: Arc<FlowTable>,
    pub turn: Option<Arc<TurnService>>,
    pub signalling: Option<Arc<crate::signalling::server::Listening>>,
    pub calls: Option<Arc<crate::calls::Calls>>,
    pub ng: Option<Arc<crate::ng::calls::NgCalls>>,
    pub reloader: Arc<Reloader>,
    pub admission: Arc<crate::admission::Admission>,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// When relayd started (its uptime in `status`).
    pub started: Instant,
}

/// The group whose members may use the API.
struct Access {
    gid: u32,
    /// As configured (empty: relayd's own group), for the refusal's message.
    group: String,
}

impl Access {
    /// Whether the process at the other end of `stream` may use the API: root, relayd's
    /// own user, or a member of the socket's group. The socket's mode keeps others out
    /// already; this holds even when someone loosens it.
    fn check(&self, stream: &UnixStream) -> Result<(), String> {
        let credentials = stream
            .peer_cred()
            .map_err(|err| format!("cannot read the caller's credentials: {err}"))?;
        let uid = credentials.uid();
        // SAFETY: geteuid has no preconditions.
        if uid == 0 || uid == unsafe { libc::geteuid() } || credentials.gid() == self.gid {
            return Ok(());
        }
        if peer_groups(stream).contains(&self.gid) {
            return Ok(());
        }
        let group = if self.group.is_empty() {
            format!("gid {} (relayd's group)", self.gid)
        } else {
            format!("{:?} (gid {})", self.group, self.gid)
        };
        Err(format!(
            "permission denied: uid {uid} is not root, relayd's user or a member of the control socket's group {group}"
        ))
    }
}

/// The supplementary groups of the process at the other end (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0 as libc::gid_t; 1024];
    let mut length = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: the buffer and its length are given together; the kernel writes at most
    // `length` bytes and sets it to what it wrote.
    let read = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut length,
        )
    };
    if read != 0 {
        return Vec::new();
    }
    groups.truncate(length as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// The id of group `name`, None when there is no such group.
fn group_id(name: &str) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the name"))?;
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to memory of the length given, alive for the call;
    // getgrnam_r writes only there.
    let error = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if error != 0 {
        return Err(io::Error::from_raw_os_error(error));
    }
    Ok((!found.is_null()).then_some(group.gr_gid))
}

async fn connection(
    stream: UnixStream,
    services: Arc<Services>,
    access: Arc<Access>,
    mut shutdown: watch::Receiver<bool>,
) {
    let refusal = access.check(&stream).err();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = Vec::new();
    if let Some(reason) = refusal {
        tracing::warn!(%reason, "control API: a connection refused");
        // The answer comes after the caller's request, which it is sending: closing
        // before reading it would break its write, not tell it why.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_line(&mut lines, &mut line),
        )
        .await;
        let response = error_response(0, ErrorKind::PermissionDenied, None, reason);
        let _ = send(&mut write, &response).await;
        return;
    }
    loop {
        line.clear();
        let read = tokio::select! {
            read = read_line(&mut lines, &mut line) => read,
            _ = shutdown.changed() => return,
        };
        let response = match read {
            Ok(0) => return,
            Ok(_) => handle_line(&line, &services),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                // Oversized: answer, then close, since the rest of the line is unread.
                let response = error_response(0, ErrorKind::BadRequest, None, err.to_string());
                let _ = send(&mut write, &response).await;
                return;
            }
            Err(_) => return,
        };
        if send(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// Reads one line of at most MAX_REQUEST_BYTES.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut limited = reader.take(MAX_REQUEST_BYTES as u64 + 1);
    let read = limited.read_until(b'\n', line).await?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request longer than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    Ok(read)
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(response).expect("responses serialize");
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

/// Answers one request line.
pub fn handle_line(line: &[u8], services: &Services) -> Response {
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(err) => {
            return error_response(0, ErrorKind::BadRequest, None, format!("not JSON: {err}"));
        }
    };
    let id = value.get("id").and_then(Value::as_u64).unwrap_or(0);
    let request: Request = match serde_json::from_value(value) {
        Ok(request) => request,
        Err(err) => {
            return error_response(
                id,
                ErrorKind::BadRequest,
                None,
                format!("not a request: {err}"),
            );
        }
    };
    if request.version != PROTOCOL_VERSION {
        return error_response(
            id,
            ErrorKind::UnsupportedVersion,
            Some("version"),
            format!(
                "version {} is not supported; this relayd speaks version {PROTOCOL_VERSION}",
                request.version
            ),
        );
    }
    match dispatch(&request, services) {
        Ok(result) => Response {
            version: PROTOCOL_VERSION,
            id,
            result: Some(result),
            error: None,
        },
        Err(error) => Response {
            version: PROTOCOL_VERSION,
            id,
            result: None,
            error: Some(error),
        },
    }
}

fn dispatch(request: &Request, services: &Services) -> Result<Value, ErrorBody> {
    let (table, turn, started) = (
        services.table.as_ref(),
        services.turn.as_ref(),
        services.started,
    );
    let now = monotonic_ns();
    let result = match request.method.as_str() {
        method::STATUS => to_value(StatusResult {
            relay_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: PROTOCOL_VERSION,
            uptime_secs: started.elapsed().as_secs(),
            datapath: table.status().into(),
            flows: table.len(),
            idle_timeout_secs: table.idle_timeout_secs(),
            turn: turn.map(|turn| turn.status().into()),
            signalling: services.signalling.as_ref().map(|s| s.status().into()),
            calls: services.calls.as_ref().map(|calls| calls.len()),
            calls_ice: services.calls.as_ref().map(|calls| calls.ice_address()),
            calls_media: services.calls.as_ref().map(|calls| {
                let (app_media, pbx_media, dtls_fingerprint) = calls.media_policy();
                CallsMedia {
                    app_media: app_media.to_owned(),
                    pbx_media: pbx_media.to_owned(),
                    dtls_fingerprint,
                }
            }),
            connections: services.admission.status().into(),
            cluster: services
                .cluster
                .as_ref()
                .map(|cluster| (&cluster.status()).into()),
        }),
        method::STATS => to_value(StatsResult {
            flows: table.len(),
            flows_expired: table.expired_total(),
            datapath: table.stats().into(),
        }),
        method::FLOW_ADD => {
            let params: FlowAddParams = params(request)?;
            let spec = FlowSpec {
                src: endpoint("src", &params.src)?,
                dst: endpoint("dst", &params.dst)?,
                new_src: endpoint("new_src", &params.new_src)?,
                new_dst: endpoint("new_dst", &params.new_dst)?,
                channel: params.channel.map(Into::into),
                rtcp_to_userspace: false,
                opaque_payload: false,
                to_worker: false,
            };
            let specs = if params.reverse {
                vec![spec, spec.reverse()]
            } else {
                vec![spec]
            };
            let ids = table.add(&specs, now).map_err(flow_error)?;
            for (id, spec) in ids.iter().zip(&specs) {
                tracing::info!(id, src = %spec.src, dst = %spec.dst, new_src = %spec.new_src, new_dst = %spec.new_dst, "flow added");
            }
            to_value(FlowAddResult { ids })
        }
        method::FLOW_DEL => {
            let params: FlowIdParams = params(request)?;
            let info = table.remove(params.id, now).map_err(flow_error)?;
            tracing::info!(
                id = info.id,
                packets = info.counters.packets(),
                "flow removed"
            );
            to_value(wire::FlowInfo::from(info))
        }
        method::FLOW_LIST => to_value(FlowListResult {
            flows: table.list(now).into_iter().map(Into::into).collect(),
        }),
        method::FLOW_SHOW => {
            let params: FlowIdParams = params(request)?;
            let flow = table.get(params.id, now).map_err(flow_error)?;
            to_value(wire::FlowInfo::from(flow))
        }
        method::PUSH_STATS => {
            let push = services
                .signalling
                .as_ref()
                .and_then(|signalling| signalling.hub.push())
                .ok_or_else(|| {
                    body(
                        ErrorKind::NotFound,
                        None,
                        "push is not enabled (push.enabled)".to_owned(),
                    )
                })?;
            let outcomes = push.outcomes();
            to_value(PushStatsResult {
                devices: push.registered() as u64,
                pushes: crate::push::Provider::ALL
                    .into_iter()
                    .flat_map(|provider| {
                        crate::push::Outcome::ALL.map(move |outcome| (provider, outcome))
                    })
                    .map(|(provider, outcome)| PushCount {
                        provider: provider.name().to_owned(),
                        outcome: outcome.name().to_owned(),
                        count: outcomes.get(&(provider, outcome)).copied().unwrap_or(0),
                    })
                    .collect(),
            })
        }
        method::TURN_ALLOCATIONS => to_value(TurnAllocationsResult {
            allocations: turn_service(turn)?
                .report()
                .into_iter()
                .map(Into::into)
                .collect(),
        }),
        method::TURN_REVOKE => {
            let params: TurnRevokeParams = params(request)?;
            let target = match (params.username, params.relay) {
                (Some(username), None) => RevokeTarget::User(username),
                (None, Some(relay)) => RevokeTarget::Relay(endpoint("relay", &relay)?),
                _ => {
                    return Err(body(
                        ErrorKind::BadRequest,
                        Some("params"),
                        "turn.revoke: give either username or relay".to_owned(),
                    ));
                }
            };
            let revoked = turn_service(turn)?.revoke(&target);
            tracing::info!(?target, revoked, "turn: allocations revoked");
            to_value(TurnRevokeResult { revoked })
        }
        method::CALLS_LIST => {
            // App calls and ng calls side by side; an error only when neither is on.
            let calls = match (&services.calls, &services.ng) {
                (Some(calls), _) => calls.list().into_iter().map(Into::into).collect(),
                (None, Some(_)) => Vec::new(),
                (None, None) => {
                    return Err(body(
                        ErrorKind::NotFound,
                        None,
                        "neither calls nor ng are enabled ([calls] enabled, [ng] listen)"
                            .to_owned(),
                    ));
                }
            };
            let ng_calls = services
                .ng
                .iter()
                .flat_map(|ng| ng.infos())
                .map(Into::into)
                .collect();
            to_value(CallsListResult { calls, ng_calls })
        }
        method::CALLS_SHOW => {
            let params: CallIdParams = params(request)?;
            let calls = calls_service(services)?;
            let call = calls
                .list()
                .into_iter()
                .find(|call| call.call == params.call)
                .ok_or_else(|| {
                    body(
                        ErrorKind::NotFound,
                        Some("call"),
                        format!("call: {}: no such call", params.call),
                    )
                })?;
            to_value(wire::CallInfo::from(call))
        }
        method::CALLS_HANGUP => {
            let params: CallIdParams = params(request)?;
            let calls = calls_service(services)?.clone();
            if !calls.exists(params.call) {
                return Err(body(
                    ErrorKind::NotFound,
                    Some("call"),
                    format!("call: {}: no such call", params.call),
                ));
            }
            tokio::spawn(async move { calls.hangup_by_operator(params.call).await });
            tracing::info!(call = params.call, "calls: hung up by the operator");
            to_value(serde_json::json!({}))
        }
        method::CLUSTER_STATUS => to_value(ClusterStatusResult::from(&cluster(services)?.status())),
        method::CLUSTER_FORGET => {
            let params: ClusterNodeParams = params(request)?;
            cluster(services)?.forget(&params.node).map_err(|refusal| {
                let code = match refusal {
                    ForgetRefusal::NotMember(_) => ErrorKind::NotFound,
                    _ => ErrorKind::InvalidArgument,
                };
                body(code, Some("node"), format!("node: {refusal}"))
            })?;
            to_value(serde_json::json!({}))
        }
        method::CONFIG_RELOAD => {
            let changes = services.reloader.reload().map_err(|problems| {
                body(
                    ErrorKind::InvalidArgument,
                    Some("configuration"),
                    format!("nothing changed: {problems}"),
                )
            })?;
            to_value(ConfigReloadResult {
                applied: changes.live.iter().map(|k| k.to_string()).collect(),
                needs_restart: changes.restart.iter().map(|k| k.to_string()).collect(),
            })
        }
        other => {
            return Err(body(
                ErrorKind::BadRequest,
                Some("method"),
                format!("unknown method {other:?}"),
            ));
        }
    };
    Ok(result)
}

fn cluster(services: &Services) -> Result<&Arc<crate::cluster::Cluster>, ErrorBody> {
    services.cluster.as_ref().ok_or_else(|| {
        body(
            ErrorKind::NotFound,
            None,
            "this relayd is not in a cluster ([cluster] enabled = false)".to_owned(),
        )
    })
}

fn calls_service(services: &Services) -> Result<&Arc<crate::calls::Calls>, ErrorBody> {
    services.calls.as_ref().ok_or_else(|| {
        body(
            ErrorKind::NotFound,
            None,
            "calls are not enabled ([calls] enabled)".to_owned(),
        )
    })
}

fn turn_service(turn: Option<&Arc<TurnService>>) -> Result<&Arc<TurnService>, ErrorBody> {
    turn.ok_or_else(|| {
        body(
            ErrorKind::NotFound,
            None,
            "the TURN server is not enabled (turn.enabled)".to_owned(),
        )
    })
}

fn params<T: DeserializeOwned>(request: &Request) -> Result<T, ErrorBody> {
    serde_json::from_value(request.params.clone()).map_err(|err| {
        body(
            ErrorKind::BadRequest,
            Some("params"),
            format!("{}: params: {err}", request.method),
        )
    })
}

fn endpoint(field: &'static str, text: &str) -> Result<SocketAddr, ErrorBody> {
    parse_endpoint(text).map_err(|reason| {
        body(
            ErrorKind::InvalidArgument,
            Some(field),
            format!("{field}: {text}: {reason}"),
        )
    })
}

/// Parses `ip:port` (`[v6]:port` for IPv6) with a reason an operator can act on.
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)".to_owned());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("{host:?} is not an IPv4 or IPv6 address"));
    }
    match port.parse::<u64>() {
        Ok(port) if port > 65_535 => Err(format!("port {port} out of range (1-65535)")),
        Ok(_) => Err("IPv6 addresses need brackets: [ADDRESS]:PORT".to_owned()),
        Err(_) => Err(format!("port {port:?} is not a number")),
    }
}

fn flow_error(err: FlowError) -> ErrorBody {
    let code = match err {
        FlowError::Invalid(_) => ErrorKind::InvalidArgument,
        FlowError::Duplicate { .. } | FlowError::DuplicateInRequest { .. } => {
            ErrorKind::AlreadyExists
        }
        FlowError::Full { .. } => ErrorKind::TableFull,
        FlowError::UnknownFlow(_) => ErrorKind::NotFound,
        FlowError::Datapath(crate::datapath::DatapathError::Bind { .. }) => {
            ErrorKind::InvalidArgument
        }
        FlowError::Datapath(_) => ErrorKind::Internal,
    };
    body(code, err.field(), err.to_string())
}

fn body(code: ErrorKind, field: Option<&str>, message: String) -> ErrorBody {
    ErrorBody {
        code,
        field: field.map(str::to_owned),
        message,
    }
}

fn error_response(id: u64, code: ErrorKind, field: Option<&str>, message: String) -> Response {
    Response {
        version: PROTOCOL_VERSION,
        id,
        result: None,
        error: Some(body(code, field, message)),
    }
}

fn to_value<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).expect("results serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_reason() {
        assert_eq!(parse_endpoint("10.0.0.1:5004").unwrap().port(), 5004);
        assert_eq!(parse_endpoint("[fd00::1]:5004").unwrap().port(), 5004);
        assert_eq!(
            parse_endpoint("10.0.0.5:70000").unwrap_err(),
            "port 70000 out of range (1-65535)"
        );
        assert_eq!(
            parse_endpoint("10.0.0.300:1").unwrap_err(),
            "\"10.0.0.300\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            parse_endpoint("10.0.0.1:rtp").unwrap_err(),
            "port \"rtp\" is not a number"
        );
        assert_eq!(
            parse_endpoint("10.0.0.1").unwrap_err(),
            "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)"
        );
        assert_eq!(
            parse_endpoint("fd00::1:5004").unwrap_err(),
            "IPv6 addresses need brackets: [ADDRESS]:PORT"
        );
    }
}
