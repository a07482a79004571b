//! A session's call requests (`call.create`, `call.answer`, `call.update`,
//! `call.candidate`, `call.hangup`): served by this relay's calls, or, in a cluster, by the
//! relay that anchors the call or is to anchor it (where the app is connected, or the
//! least loaded relay with room), whose reply comes back through Redis. Requests that
//! sessions of other relays sent here are served as if theirs were local sessions.

use std::sync::Arc;

use serde_json::Map;

use super::{
    calls::{answer, fields, requester},
    hub::{Identity, SessionId},
    protocol::{ErrorCode, Inbound, Outbound, Role, parse},
    server::Shared,
};
use crate::cluster::{Cluster, Load, Recipient, SessionRecord};

/// Where a call request is served.
enum Place {
    /// Here; `placed`: a new call for an app connected to another relay.
    Here { placed: bool },
    /// On this other relay of the cluster, which anchors the call or is to anchor it.
    Node(String),
}

/// A call request of a session here: served here, or sent to the relay of the cluster that
/// anchors the call (or is to anchor it, [`place`]) and its reply passed on.
pub(super) async fn call_request(
    context: &Shared,
    session: SessionId,
    identity: &Identity,
    request: Inbound,
    text: &str,
) -> Outbound {
    let Some(calls) = &context.calls else {
        return calls_disabled(request_id(&request));
    };
    let place = match &context.cluster {
        Some(cluster) => match place(context, cluster, calls, identity, &request).await {
            Ok(place) => place,
            Err(refused) => return refused,
        },
        None => Place::Here { placed: false },
    };
    let answered = match &request {
        Inbound::CallAnswer { call, .. } => Some(*call),
        _ => None,
    };
    let reply = match (place, &context.cluster) {
        (Place::Node(node), Some(cluster)) => {
            forward_call(cluster, &node, identity, request_id(&request), text).await
        }
        (Place::Here { placed }, _) => serve_call(calls, identity, request, placed).await,
        (Place::Node(_), None) => serve_call(calls, identity, request, false).await,
    };
    // The first of the user's apps to answer takes the call: the others are told.
    if let (Some(call), Outbound::Result { .. }, Role::Client, Some(user)) =
        (answered, &reply, identity.role, &identity.user)
    {
        let elsewhere = Outbound::Event {
            event: "call.ended".to_owned(),
            call,
            fields: fields([("reason", "answered-elsewhere".into())]),
        };
        context
            .hub
            .to_user_except(&identity.tenant, user, session, &elsewhere);
    }
    reply
}

/// Where a call request of a node in a cluster is served. A new call is anchored where
/// its app is connected, unless that relay anchors `cluster.max_calls` already: then on
/// the least loaded relay with room (busy when none has). An app's call needs its
/// tenant's controller connected to some relay. A request for a call this relay does not
/// have goes to the relay whose call ids it has.
async fn place(
    context: &Shared,
    cluster: &Cluster,
    calls: &crate::calls::Calls,
    identity: &Identity,
    request: &Inbound,
) -> Result<Place, Outbound> {
    let tenant = &identity.tenant;
    let id = request_id(request);
    let here_has_room = !cluster.is_full(calls.len());
    let no_room = || Outbound::Error {
        id: Some(id),
        code: ErrorCode::Busy,
        message: "every relay of the cluster anchors its cluster.max_calls calls; try again"
            .to_owned(),
    };
    // Of the relays `wanted` names (this one as ""), the least loaded with room, by calls.
    let least_loaded = |others: &[(String, Load)], wanted: &dyn Fn(&str) -> bool| {
        let mut with_room: Vec<(usize, &str)> = others
            .iter()
            .filter(|(node, load)| wanted(node) && load.has_room())
            .map(|(node, load)| (load.calls, node.as_str()))
            .collect();
        if here_has_room && wanted("") {
            with_room.push((calls.len(), ""));
        }
        with_room.into_iter().min().map(|(_, node)| node.to_owned())
    };
    let to_place = |node: String, app_here: bool| {
        if node.is_empty() {
            Place::Here { placed: !app_here }
        } else {
            Place::Node(node)
        }
    };
    match request {
        Inbound::CallCreate {
            user: Some(user), ..
        } if identity.role == Role::Controller => {
            let app = Recipient::User(user.clone());
            let app_here = context.hub.present(tenant, &app) > 0;
            if app_here && here_has_room {
                return Ok(Place::Here { placed: false });
            }
            let located = cluster.locate(tenant, &app).await.unwrap_or_default();
            if !app_here && located.is_empty() {
                // Nowhere: offline, or its devices woken by this relay's push.
                return Ok(Place::Here { placed: false });
            }
            let mut app_nodes: Vec<String> = located.into_iter().map(|(node, _)| node).collect();
            if app_here {
                app_nodes.push(String::new());
            }
            let others = cluster.others_alive();
            let node = least_loaded(&others, &|node| app_nodes.iter().any(|app| app == node))
                .or_else(|| least_loaded(&others, &|_| true))
                .ok_or_else(no_room)?;
            if !app_nodes.contains(&node) {
                tracing::info!(%tenant, %user, on = if node.is_empty() { cluster.node() } else { node.as_str() }, "signalling: the app's relay is at cluster.max_calls; the call is placed on the least loaded relay");
            }
            Ok(to_place(node, app_here))
        }
        Inbound::CallCreate { user: None, .. } if identity.role == Role::Client => {
            if context.hub.present(tenant, &Recipient::Controller) == 0
                && cluster
                    .locate(tenant, &Recipient::Controller)
                    .await
                    .is_some_and(|found| found.is_empty())
            {
                return Err(Outbound::Error {
                    id: Some(id),
                    code: ErrorCode::Offline,
                    message: format!(
                        "the controller of tenant {tenant} is not connected (on any relay of the cluster)"
                    ),
                });
            }
            if here_has_room {
                return Ok(Place::Here { placed: false });
            }
            let others = cluster.others_alive();
            Ok(to_place(
                least_loaded(&others, &|_| true).ok_or_else(no_room)?,
                true,
            ))
        }
        Inbound::CallAnswer { call, .. }
        | Inbound::CallUpdate { call, .. }
        | Inbound::CallCandidate { call, .. }
        | Inbound::CallHangup { call, .. }
            if !calls.exists(*call) =>
        {
            Ok(cluster
                .owner_of(*call)
                .map_or(Place::Here { placed: false }, Place::Node))
        }
        _ => Ok(Place::Here { placed: false }),
    }
}

/// A call request sent to the relay `node`; its reply, or `offline` when it has none.
async fn forward_call(
    cluster: &Cluster,
    node: &str,
    identity: &Identity,
    id: u64,
    text: &str,
) -> Outbound {
    let from = SessionRecord {
        tenant: identity.tenant.clone(),
        role: role_name(identity.role).to_owned(),
        user: identity.user.clone(),
    };
    match cluster.request(node, from, text.to_owned()).await {
        Ok(reply) => serde_json::from_value(reply).unwrap_or_else(|err| Outbound::Error {
            id: Some(id),
            code: ErrorCode::BadRequest,
            message: format!("relay {node} answered with what is not a reply: {err}"),
        }),
        Err(why) => {
            tracing::warn!(node, %why, "signalling: a call request for another relay got no reply");
            Outbound::Error {
                id: Some(id),
                code: ErrorCode::Offline,
                message: format!("the call's relay {node} cannot be reached: {why}"),
            }
        }
    }
}

/// A call request a session on another relay of the cluster sent here.
pub(super) async fn serve_remote(context: &Shared, from: SessionRecord, text: &str) -> Outbound {
    let refuse = |id, code, message: String| Outbound::Error { id, code, message };
    let role = match from.role.as_str() {
        "controller" => Role::Controller,
        "client" if from.user.is_some() => Role::Client,
        other => {
            return refuse(
                None,
                ErrorCode::Forbidden,
                format!("a request from another relay's {other:?} session"),
            );
        }
    };
    if !context
        .settings
        .tenants
        .iter()
        .any(|t| t.name == from.tenant)
    {
        return refuse(
            None,
            ErrorCode::Forbidden,
            format!(
                "tenant {}: not configured on relay {}",
                from.tenant,
                context.cluster.as_ref().map_or("", |c| c.node())
            ),
        );
    }
    let identity = Identity {
        tenant: from.tenant,
        role,
        user: from.user,
    };
    match parse(text) {
        Err((id, code, message)) => refuse(id, code, message),
        Ok(
            request @ (Inbound::CallCreate { .. }
            | Inbound::CallAnswer { .. }
            | Inbound::CallUpdate { .. }
            | Inbound::CallCandidate { .. }
            | Inbound::CallHangup { .. }),
        ) => match (&context.calls, &context.cluster) {
            // The sender placed it by a load up to a refresh old: a new call is refused
            // once this relay has no room after all.
            (Some(calls), Some(cluster))
                if matches!(request, Inbound::CallCreate { .. })
                    && cluster.is_full(calls.len()) =>
            {
                refuse(
                    Some(request_id(&request)),
                    ErrorCode::Busy,
                    format!(
                        "relay {} anchors its cluster.max_calls calls; try again",
                        cluster.node()
                    ),
                )
            }
            (Some(calls), _) => serve_call(calls, &identity, request, true).await,
            (None, _) => calls_disabled(request_id(&request)),
        },
        Ok(_) => refuse(
            None,
            ErrorCode::BadRequest,
            "only call requests are served for another relay's sessions".to_owned(),
        ),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Controller => "controller",
        Role::Client => "client",
    }
}

/// The id of a call request.
fn request_id(request: &Inbound) -> u64 {
    match request {
        Inbound::CallCreate { id, .. }
        | Inbound::CallAnswer { id, .. }
        | Inbound::CallUpdate { id, .. }
        | Inbound::CallCandidate { id, .. }
        | Inbound::CallHangup { id, .. }
        | Inbound::TokenMint { id, .. }
        | Inbound::Send { id, .. }
        | Inbound::PushRegister { id, .. }
        | Inbound::PushUnregister { id, .. }
        | Inbound::PushDevices { id, .. } => *id,
        Inbound::Hello { .. } => 0,
    }
}

/// A call request served by this relay's calls; `placed`: a new call whose app is
/// connected to another relay.
async fn serve_call(
    calls: &Arc<crate::calls::Calls>,
    identity: &Identity,
    request: Inbound,
    placed: bool,
) -> Outbound {
    let error = |id, code, message: String| Outbound::Error {
        id: Some(id),
        code,
        message,
    };
    let who = requester(identity);
    match request {
        Inbound::CallCreate {
            id,
            user,
            sdp,
            caller,
        } => {
            let created = |call: u64| fields([("call", call.into())]);
            match (identity.role, user) {
                (Role::Controller, Some(user)) => {
                    let result = if placed {
                        calls
                            .create_placed(&who, &user, &sdp, caller.as_deref())
                            .await
                    } else {
                        calls.create(&who, &user, &sdp, caller.as_deref()).await
                    };
                    answer(id, result.map(created))
                }
                (Role::Client, None) if caller.is_some() => error(
                    id,
                    ErrorCode::BadRequest,
                    "call.create: an app's call has no caller field (the controller says who calls)"
                        .to_owned(),
                ),
                (Role::Client, None) => {
                    answer(id, calls.create_from_app(&who, &sdp).await.map(created))
                }
                (Role::Controller, None) => error(
                    id,
                    ErrorCode::BadRequest,
                    "call.create: a controller names the user to call".to_owned(),
                ),
                (Role::Client, Some(_)) => error(
                    id,
                    ErrorCode::Forbidden,
                    "call.create: an app calls the PBX, not another user".to_owned(),
                ),
            }
        }
        Inbound::CallAnswer { id, call, sdp } => {
            let result = calls.answer(&who, call, &sdp).await;
            answer(id, result.map(|()| Map::new()))
        }
        Inbound::CallUpdate { id, call, sdp } => {
            let result = calls.update(&who, call, &sdp).await;
            answer(id, result.map(|sdp| fields([("sdp", sdp.into())])))
        }
        Inbound::CallCandidate {
            id,
            call,
            candidate,
        } => {
            let result = calls.candidate(&who, call, &candidate);
            answer(id, result.map(|()| Map::new()))
        }
        Inbound::CallHangup { id, call } => {
            let result = calls.hangup(&who, call).await;
            answer(id, result.map(|()| Map::new()))
        }
        other => error(
            request_id(&other),
            ErrorCode::BadRequest,
            "not a call request".to_owned(),
        ),
    }
}

pub(super) fn calls_disabled(id: u64) -> Outbound {
    Outbound::Error {
        id: Some(id),
        code: ErrorCode::Forbidden,
        message: "calls are not enabled on this relay ([calls] enabled)".to_owned(),
    }
}
