//! The HTTP/1.1 API on the unix socket: authentication, routing from [`crate::routes::ROUTES`],
//! body limits, JSON errors, and the console upgrade.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::daemon::{Caller, CreateRequest, Daemon, ExecBody, IntrospectBody, json_error};
use crate::error::ApiError;
use crate::routes::{Action, Role, Route, Routed, route};

/// Largest request body accepted (413 above).
pub const MAX_BODY: usize = 1 << 20;
/// How much of a too-large body is read and dropped before answering 413.
const MAX_DRAIN: u64 = 8 << 20;
/// The `Upgrade` protocol of the console route.
pub const CONSOLE_PROTOCOL: &str = "bulwark-console";
/// Default `stop` timeout before falling back to Kill.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 30_000;

type Body = Full<Bytes>;

/// The peer of a connection, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, Default)]
struct Peer {
    pid: Option<i32>,
    uid: Option<u32>,
}

/// Accepts connections forever.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = stream
            .peer_cred()
            .map(|c| Peer {
                pid: c.pid(),
                uid: Some(c.uid()),
            })
            .unwrap_or_default();
        let d = daemon.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let d = d.clone();
                async move { Ok::<_, Infallible>(handle(d, peer, req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status(), &e.body())
}

async fn handle(d: Arc<Daemon>, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let (label, resp) = match route(&method, &path) {
        Routed::Found { route: rt, name } => {
            let name = name.map(str::to_string);
            let label = format!("{} {}", rt.method, rt.path);
            let resp = match dispatch(&d, peer, rt, name.as_deref(), req).await {
                Ok(r) => r,
                Err(e) => {
                    if matches!(e, ApiError::Unauthorized(_) | ApiError::Forbidden(_)) {
                        warn!(
                            peer_pid = peer.pid,
                            peer_uid = peer.uid,
                            route = %label,
                            vm = name.as_deref().unwrap_or(""),
                            code = e.code(),
                            "refused: {e}"
                        );
                    }
                    error_response(&e)
                }
            };
            (label, resp)
        }
        Routed::WrongMethod => (
            "other".to_string(),
            error_response(&ApiError::MethodNotAllowed(format!(
                "{path} does not take {method}; see docs/api.md"
            ))),
        ),
        Routed::NotFound => (
            "other".to_string(),
            error_response(&ApiError::NotFound(format!(
                "no route {method} {}; see docs/api.md",
                path.chars().take(200).collect::<String>()
            ))),
        ),
    };
    let status = resp.status().as_u16();
    d.metrics.record(&label, status, started.elapsed());
    info!(method = %method, path = %path, status, ms = started.elapsed().as_millis() as u64, "request");
    resp
}

/// Reads a body of at most [`MAX_BODY`] bytes. A larger one is read on and dropped up to
/// [`MAX_DRAIN`] bytes before the 413, so that a client that writes its whole body before
/// reading the answer gets the 413 instead of a broken pipe.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_DRAIN) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut body = req.into_body();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::BadJson(format!("cannot read the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total = total.saturating_add(data.len());
            if total as u64 > MAX_DRAIN {
                return Err(ApiError::PayloadTooLarge);
            }
            if total <= MAX_BODY {
                buf.extend_from_slice(&data);
            }
        }
    }
    if total > MAX_BODY {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(Bytes::from(buf))
}

/// Parses a JSON body; an empty body is `{}`.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| json_error(&e, "request body"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    key: String,
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    snapshot: String,
    key: String,
    /// Resume at once and restore memory on first touch (see docs/snapshot-format.md).
    #[serde(default)]
    lazy: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn query_flag(req: &Request<Incoming>, key: &str) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == format!("{key}=true") || kv == format!("{key}=1"))
    })
}

async fn dispatch(
    d: &Arc<Daemon>,
    peer: Peer,
    rt: &Route,
    name: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // Public routes (health) need no caller; every other route is authorized here.
    let caller = if rt.role == Role::Public {
        None
    } else {
        let caller = d.caller(crate::auth::bearer(token))?;
        d.authorize(&caller, rt.role, name)?;
        Some(caller)
    };
    let name = name.unwrap_or_default();
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match rt.action {
        Action::Create => {
            let body: CreateRequest = parse(&read_body(req).await?)?;
            let (rec, token) = d.create(body)?;
            let mut v = d.describe_json(&rec, None);
            if let Some(t) = token {
                v["owner_token"] = json!(t);
            }
            Ok(json_response(StatusCode::CREATED, &v))
        }
        Action::List => ok(d.list()),
        Action::Describe => ok(d.describe(name).await?),
        Action::Delete => {
            let force = query_flag(&req, "force");
            ok(d.delete(name, force).await?)
        }
        Action::Start => {
            let _: Empty = parse(&read_body(req).await?)?;
            ok(d.start(name, None).await?)
        }
        Action::Pause | Action::Resume => {
            let _: Empty = parse(&read_body(req).await?)?;
            ok(d.pause_resume(name, rt.action == Action::Pause).await?)
        }
        Action::Stop => {
            let b: StopBody = parse(&read_body(req).await?)?;
            let t = b.timeout_ms.unwrap_or(DEFAULT_STOP_TIMEOUT_MS);
            ok(d.stop(name, Duration::from_millis(t)).await?)
        }
        Action::Kill => {
            let _: Empty = parse(&read_body(req).await?)?;
            ok(d.kill(name).await?)
        }
        Action::Console => console(d, peer, name, req).await,
        Action::Exec => {
            let b: ExecBody = parse(&read_body(req).await?)?;
            ok(d.exec(name, b).await?)
        }
        Action::Ps => ok(d.ps(name).await?),
        Action::CrossView => ok(d.crossview(name).await?),
        Action::Introspect => {
            let b: IntrospectBody = parse(&read_body(req).await?)?;
            ok(d.introspect(name, b.view, b.symbol).await?)
        }
        Action::Snapshot => {
            let b: SnapshotBody = parse(&read_body(req).await?)?;
            ok(d.snapshot(name, &b.key, b.name).await?)
        }
        Action::Restore => {
            let b: RestoreBody = parse(&read_body(req).await?)?;
            ok(d.restore(name, &b.snapshot, &b.key, b.lazy).await?)
        }
        Action::Health => ok(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })),
        Action::Progress => ok(d.progress(name)?),
        Action::Metrics => {
            debug_assert!(caller == Some(Caller::Operator));
            let vms = d.snapshot_all().await;
            let text = d.metrics.render(&vms);
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(r)
        }
    }
}

/// `GET /v1/vms/{name}/console` with `Upgrade: bulwark-console`: answers 101 and splices the
/// connection to the monitor's console socket both ways until either side closes.
async fn console(
    d: &Arc<Daemon>,
    peer: Peer,
    name: &str,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let wants_upgrade = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    if !wants_upgrade {
        return Err(ApiError::InvalidRequest(format!(
            "the console is a byte stream: send `Connection: Upgrade` and `Upgrade: {CONSOLE_PROTOCOL}`"
        )));
    }
    let sock = d.console_socket(name)?;
    let mut console = tokio::net::UnixStream::connect(&sock).await.map_err(|e| {
        ApiError::MonitorGone(format!("cannot reach the console of VM `{name}`: {e}"))
    })?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let vm = name.to_string();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                info!(vm = %vm, peer_pid = peer.pid, "console attached");
                let mut up = TokioIo::new(up);
                let r = tokio::io::copy_bidirectional(&mut up, &mut console).await;
                info!(vm = %vm, result = ?r, "console detached");
            }
            Err(e) => warn!(vm = %vm, error = %e, "console upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        UPGRADE,
        hyper::header::HeaderValue::from_static(CONSOLE_PROTOCOL),
    );
    Ok(r)
}
