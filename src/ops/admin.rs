//! The operator's HTTP endpoints, on one listener:
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `ok` while the gateway runs |
//! | `GET /sessions` | JSON list: device_id, session_id, transport, peer, shard, connected_since, frames_in/out |
//! | `POST /devices/{id}/send` | body = one message to that device (202 queued, 404 not connected, 413 over 1808 B, 503 busy); with the NATS bridge, wherever the device is connected (see below) |
//! | `GET /devices/{id}` | with the NATS bridge: the device's presence (200 JSON, 404 offline) |
//! | `POST /broadcast` | body = one message to every device |
//! | `POST /devices/{id}/kick` | close its session with BYE (404 when none) |
//! | `POST /reload` | re-read the registry file (key rotation) |
//!
//! The admin routes (all but `/metrics` and `/healthz`) answer loopback clients only, unless an
//! admin token is configured: then any client presenting `Authorization: Bearer <token>`.
//! Against a browser on the operator's host (CSRF, DNS rebinding), an admin request must name
//! the listener by an IP address, `localhost` or an allowed host name in `Host`, and any
//! request carrying an `Origin` (or `Sec-Fetch-Site: cross-site`) from another origin is
//! refused with 403.
//!
//! With the NATS bridge (`--mode nats`), `send` is a request on `P.down.<device>` like any
//! NATS client's, so it reaches the device on any gateway of the fleet; the reply's status maps
//! to 200 `delivered`, 202 `queued`, 404 `offline`, 413 `too_large`, 429 `queue_full`, 503
//! `rejected`, with the JSON reply as body.
//!
//! Add a route in [`router`]: handlers are async and get the [`GatewayHandle`] as state.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::http::{HttpServer, MAX_BODY};
use super::metrics;
use crate::gateway::GatewayHandle;
use crate::proto::crypto::ct_eq;
use crate::proto::reassembly::MAX_MESSAGE_LEN;
use crate::proto::DeviceId;
use crate::proto::ErrorKind;
use crate::psk::REDACTED;
use zeroize::Zeroizing;

/// Options of the operations listener.
#[derive(Clone, Default)]
pub struct OpsOptions {
    /// Bearer token required by the admin routes; `None` = loopback clients only.
    pub admin_token: Option<String>,
    /// Host names (besides IP addresses and `localhost`) an admin request may name in `Host`,
    /// for operators who reach the listener by a DNS name.
    pub allowed_hosts: Vec<String>,
    /// The NATS bridge, when the gateway runs one: downlinks and presence go through NATS.
    pub nats: Option<Arc<crate::nats::NatsBridge>>,
}

impl std::fmt::Debug for OpsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsOptions")
            .field("admin_token", &self.admin_token.as_ref().map(|_| REDACTED))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("nats", &self.nats.is_some())
            .finish()
    }
}

#[derive(Clone)]
struct Ops {
    gw: GatewayHandle,
    /// The options without the token, which lives in `token`.
    opts: Arc<OpsOptions>,
    /// The admin token, moved out of the options: zeroized when the router is dropped.
    token: Option<Arc<Zeroizing<String>>>,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

/// The host part of a `Host` header value (`[::1]:9100` → `::1`, `example:80` → `example`).
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    value.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(value, |(h, _)| h)
}

/// CSRF and DNS rebinding: the request must name us by address, `localhost` or an allowed
/// name, and must not come from another origin's page.
/// A refusal: status and the reason shown to the client.
type Refusal = (StatusCode, &'static str);

fn same_origin(headers: &HeaderMap, opts: &OpsOptions, admin: bool) -> Result<(), Refusal> {
    let forbidden = |m: &'static str| Err((StatusCode::FORBIDDEN, m));
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if admin {
        let name = host_name(host);
        let known = name.parse::<IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || opts.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(name));
        if host.is_empty() || !known {
            return forbidden(
                "the Host header must name this listener by IP address or an allowed host name",
            );
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        let ok = [format!("http://{host}"), format!("https://{host}")]
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin));
        if !ok {
            return forbidden("cross-origin requests are refused");
        }
    }
    if headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site") {
        return forbidden("cross-site requests are refused");
    }
    Ok(())
}

fn authorized(headers: &HeaderMap, peer: SocketAddr, token: Option<&str>) -> Result<(), Refusal> {
    match token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if ct_eq(given.as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err((StatusCode::UNAUTHORIZED, "bearer token required"))
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err((StatusCode::FORBIDDEN, "admin API is loopback-only without an admin token")),
    }
}

/// Every route: the origin check.
async fn guard_all(State(ops): State<Ops>, req: Request, next: Next) -> Response {
    if let Err((status, why)) = same_origin(req.headers(), &ops.opts, false) {
        return text(status, format!("{why}\n"));
    }
    next.run(req).await
}

/// Admin routes: the host check, then the token or loopback rule.
async fn guard_admin(State(ops): State<Ops>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let Some(peer) = peer else { return text(StatusCode::FORBIDDEN, "unknown client\n") };
    if let Err(r) = same_origin(req.headers(), &ops.opts, true)
        .and_then(|()| authorized(req.headers(), peer, ops.token.as_ref().map(|t| t.as_str())))
    {
        return text(r.0, format!("{}\n", r.1));
    }
    next.run(req).await
}

async fn metrics_route(State(ops): State<Ops>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics::render(&ops.gw)).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn sessions(State(ops): State<Ops>) -> Response {
    let gw = ops.gw.clone();
    // The shards answer through a blocking wait: off the runtime's thread.
    let rows = match tokio::task::spawn_blocking(move || gw.sessions_detailed(Duration::from_secs(2))).await {
        Ok(rows) => rows,
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "listing failed\n"),
    };
    let list: Vec<_> = rows
        .iter()
        .map(|r| {
            let since = r.info.since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            json!({
                "device_id": r.info.device_id.to_string(),
                "session_id": r.info.session_id.to_string(),
                "transport": format!("{:?}", r.info.transport).to_lowercase(),
                "peer": r.info.peer.to_string(),
                "shard": r.info.shard,
                "connected_since": since,
                "frames_in": r.frames_in,
                "frames_out": r.frames_out,
            })
        })
        .collect();
    Json(list).into_response()
}

/// A malformed device id in a route is the client's error (400), never "not connected".
fn bad_id(e: crate::proto::ParseIdError) -> Response {
    text(StatusCode::BAD_REQUEST, format!("{e}\n"))
}

fn too_big(body: &Bytes) -> Option<Response> {
    (body.len() > MAX_MESSAGE_LEN)
        .then(|| text(StatusCode::PAYLOAD_TOO_LARGE, format!("message over {MAX_MESSAGE_LEN} bytes\n")))
}

async fn device_route(
    State(ops): State<Ops>,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let id: DeviceId = match id.parse() {
        Ok(id) => id,
        Err(e) => return bad_id(e),
    };
    let dev: [u8; 6] = id.into();
    match action.as_str() {
        "send" => {
            if let Some(nats) = &ops.opts.nats {
                return nats_send(nats, dev, &body).await;
            }
            if let Some(r) = too_big(&body) {
                return r;
            }
            match ops.gw.deliver(id, &body).await {
                Ok(()) => (StatusCode::ACCEPTED, Json(json!({"queued": true, "device_id": id.to_string()})))
                    .into_response(),
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    text(StatusCode::NOT_FOUND, "device not connected\n")
                }
                Err(e) if e.kind() == ErrorKind::Timeout => {
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("busy: {e}\n"))
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "kick" => match (ops.gw.kick(id), ops.gw.device_shard(id).is_some()) {
            (true, _) => (StatusCode::ACCEPTED, Json(json!({"kicked": true, "device_id": id.to_string()})))
                .into_response(),
            (false, false) => text(StatusCode::NOT_FOUND, "device not connected\n"),
            (false, true) => text(StatusCode::SERVICE_UNAVAILABLE, "busy: the shard's inbox is full\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "no such route\n"),
    }
}

/// A downlink through the NATS bridge, answered as the fleet answers it.
async fn nats_send(nats: &crate::nats::NatsBridge, dev: [u8; 6], body: &[u8]) -> Response {
    let reply = nats.send_downlink(dev, body, Duration::from_secs(25)).await;
    let status = match reply.status {
        "delivered" => StatusCode::OK,
        "queued" => StatusCode::ACCEPTED,
        "offline" => StatusCode::NOT_FOUND,
        "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "queue_full" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body: serde_json::Value = serde_json::from_slice(&reply.to_json()).unwrap_or_default();
    (status, Json(body)).into_response()
}

/// `GET /devices/{id}`: the device's presence, from the fleet's presence bucket.
async fn device_info(State(ops): State<Ops>, Path(id): Path<String>) -> Response {
    let dev: DeviceId = match id.parse() {
        Ok(id) => id,
        Err(e) => return bad_id(e),
    };
    let Some(nats) = &ops.opts.nats else {
        return match ops.gw.sessions().into_iter().find(|s| s.device_id == dev) {
            Some(s) => Json(json!({
                "device_id": dev.to_string(),
                "session": s.session_id.to_string(),
                "transport": format!("{:?}", s.transport).to_lowercase(),
                "peer": s.peer.to_string(),
            }))
            .into_response(),
            None => (StatusCode::NOT_FOUND, Json(json!({"online": false}))).into_response(),
        };
    };
    match nats.presence(dev.into()).await {
        Ok(Some(p)) => Json(p).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, Json(json!({"online": false}))).into_response(),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("presence unavailable: {e}\n")),
    }
}

async fn broadcast(State(ops): State<Ops>, body: Bytes) -> Response {
    if let Some(r) = too_big(&body) {
        return r;
    }
    match ops.gw.broadcast(&body) {
        Ok(n) => (StatusCode::ACCEPTED, Json(json!({"queued_for": n}))).into_response(),
        Err(e) if e.kind() == ErrorKind::Timeout => {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("busy: {e}\n"))
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn reload(State(ops): State<Ops>) -> Response {
    match ops.gw.reload_keys() {
        Ok(r) => {
            tracing::info!(devices = r.devices, wildcard = r.wildcard, "key registry reloaded (admin API)");
            Json(json!({"reloaded": true, "devices": r.devices, "wildcard": r.wildcard})).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "key registry reload failed: old keys stay in force");
            text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n"))
        }
    }
}

async fn no_route() -> Response {
    text(StatusCode::NOT_FOUND, "no such route\n")
}

/// The route table: open routes, then the admin routes behind their guard.
pub fn router(gw: GatewayHandle, mut opts: OpsOptions) -> Router {
    // Moved, not copied: the one heap copy of the token is the one zeroized.
    let token = opts.admin_token.take().map(|t| Arc::new(Zeroizing::new(t)));
    let ops = Ops { gw, opts: Arc::new(opts), token };
    let admin = Router::new()
        .route("/sessions", get(sessions))
        .route("/devices/{id}/{action}", post(device_route))
        .route("/devices/{id}", get(device_info))
        .route("/broadcast", post(broadcast))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(ops.clone(), guard_admin));
    Router::new()
        .route("/metrics", get(metrics_route))
        .route("/healthz", get(healthz))
        .merge(admin)
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(ops.clone(), guard_all))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(ops)
}

/// Serve metrics, health and admin routes for `h` on `addr`.
pub fn serve(addr: SocketAddr, h: GatewayHandle, opts: OpsOptions) -> std::io::Result<HttpServer> {
    HttpServer::start(addr, router(h, opts))
}
