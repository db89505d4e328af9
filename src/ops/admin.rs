//! The operator's HTTP endpoints, on one listener:
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `ok` while the gateway runs |
//! | `GET /sessions` | JSON list: device_id, session_id, transport, peer, shard, connected_since, frames_in/out |
//! | `POST /devices/{id}/send` | body = one message to that device (404 not connected, 413 over 1808 B) |
//! | `POST /broadcast` | body = one message to every device |
//! | `POST /devices/{id}/kick` | close its session with BYE (404 when none) |
//! | `POST /reload` | re-read the registry file (key rotation) |
//!
//! The admin routes (all but `/metrics` and `/healthz`) answer loopback clients only, unless an
//! admin token is configured: then any client presenting `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use super::http::{Handler, HttpServer, Request, Response};
use super::metrics;
use crate::gateway::GatewayHandle;
use crate::proto::crypto::ct_eq;
use crate::proto::reassembly::MAX_MESSAGE_LEN;
use crate::proto::ErrorKind;
use crate::psk::{format_device_id, parse_device_id, to_hex};

/// Options of the operations listener.
#[derive(Debug, Clone, Default)]
pub struct OpsOptions {
    /// Bearer token required by the admin routes; `None` = loopback clients only.
    pub admin_token: Option<String>,
}

fn authorized(req: &Request, opts: &OpsOptions) -> Result<(), Response> {
    match &opts.admin_token {
        Some(token) => {
            let given = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
            if ct_eq(given.as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err(Response::text(401, "bearer token required\n"))
            }
        }
        None if req.peer.ip().is_loopback() => Ok(()),
        None => Err(Response::text(403, "admin API is loopback-only without --admin-token\n")),
    }
}

fn sessions_json(h: &GatewayHandle) -> Response {
    let rows = h.sessions_detailed(Duration::from_secs(2));
    let list: Vec<_> = rows
        .iter()
        .map(|r| {
            let since = r.info.since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
            json!({
                "device_id": format_device_id(&r.info.device_id),
                "session_id": to_hex(&r.info.session_id),
                "transport": format!("{:?}", r.info.transport).to_lowercase(),
                "peer": r.info.peer.to_string(),
                "shard": r.info.shard,
                "connected_since": since,
                "frames_in": r.frames_in,
                "frames_out": r.frames_out,
            })
        })
        .collect();
    Response::json(200, &json!(list))
}

fn device_route(h: &GatewayHandle, req: &Request, id: &str, action: &str) -> Response {
    let Some(dev) = parse_device_id(id) else { return Response::text(400, "not a device id\n") };
    let id = format_device_id(&dev);
    match action {
        "send" => {
            if req.body.len() > MAX_MESSAGE_LEN {
                return Response::text(413, format!("message over {MAX_MESSAGE_LEN} bytes\n"));
            }
            match h.send_to(&id, &req.body) {
                Ok(()) => Response::json(202, &json!({"queued": true, "device_id": id})),
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    Response::text(404, "device not connected\n")
                }
                Err(e) => Response::text(500, format!("{e}\n")),
            }
        }
        "kick" => match h.kick(&id) {
            Ok(true) => Response::json(202, &json!({"kicked": true, "device_id": id})),
            Ok(false) => Response::text(404, "device not connected\n"),
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        _ => Response::text(404, "no such route\n"),
    }
}

/// Route one request.
pub fn route(h: &GatewayHandle, opts: &OpsOptions, req: &Request) -> Response {
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("GET", ["metrics"]) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics::render(h).into_bytes(),
        },
        ("GET", ["healthz"]) => Response::text(200, "ok\n"),
        (_, ["metrics"] | ["healthz"]) => Response::text(405, "method not allowed\n"),
        (method, route) => {
            if let Err(r) = authorized(req, opts) {
                return r;
            }
            match (method, route) {
                ("GET", ["sessions"]) => sessions_json(h),
                ("POST", ["devices", id, action]) => device_route(h, req, id, action),
                ("POST", ["broadcast"]) => {
                    if req.body.len() > MAX_MESSAGE_LEN {
                        return Response::text(413, format!("message over {MAX_MESSAGE_LEN} bytes\n"));
                    }
                    match h.broadcast(&req.body) {
                        Ok(n) => Response::json(202, &json!({"queued_for": n})),
                        Err(e) => Response::text(500, format!("{e}\n")),
                    }
                }
                ("POST", ["reload"]) => match h.reload_keys() {
                    Ok(r) => {
                        tracing::info!(
                            devices = r.devices,
                            wildcard = r.wildcard,
                            "key registry reloaded (admin API)"
                        );
                        Response::json(
                            200,
                            &json!({"reloaded": true, "devices": r.devices, "wildcard": r.wildcard}),
                        )
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "key registry reload failed: old keys stay in force");
                        Response::text(422, format!("{e}\n"))
                    }
                },
                _ => Response::text(404, "no such route\n"),
            }
        }
    }
}

/// Serve metrics, health and admin routes for `h` on `addr`.
pub fn serve(addr: SocketAddr, h: GatewayHandle, opts: OpsOptions) -> std::io::Result<HttpServer> {
    let handler: Handler = Arc::new(move |req: &Request| route(&h, &opts, req));
    HttpServer::start(addr, handler)
}
