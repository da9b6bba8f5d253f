//! The admin HTTP endpoint (HTTP/1.1, hyper):
//!
//! | route | what |
//! |---|---|
//! | `GET /status` | the node and every volume: roles, epochs, replica states, lag, pins, mailboxes, recent recovery decisions (JSON) |
//! | `GET /volumes/{name}` | one volume, the same way |
//! | `POST /volumes/{name}/assignment` | applies a new assignment ([`AssignmentRequest`] as JSON); 409 when fenced |
//! | `POST /volumes/{name}/verify[?repair=true]` | compares every in-sync replica with the primary at one LSN; the report (JSON), 409 where this node is not the primary |
//! | `GET /recovery` | the recovery budget: limits, recoveries sending, rebuilds running and queued (JSON) |
//! | `POST /recovery` | changes the limits ([`RecoveryRequest`] as JSON); 400 with why when refused, nothing applied |
//! | `GET /metrics` | Prometheus text: mailboxes per actor, WAL sync latency, per-volume LSNs, lag in LSNs and bytes, states, pins, bytes shipped |

use crate::assignment::Assignment;
use crate::node::{Node, NodeError, VolumeReport};
use crate::serving::Serving;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use walship_actors::NodeStatus;

mod scrape;

use scrape::metrics;
pub(crate) use scrape::prometheus;

/// A new assignment, as `POST /volumes/{name}/assignment` takes it: the
/// one [`Assignment`] type (JSON: epoch, primary, commit_mode, replicas).
pub type AssignmentRequest = Assignment;

/// A change of the recovery budget, as `POST /recovery` takes it: each
/// field left out keeps its value; sizes per second like `"200MiB"`, or
/// `"unlimited"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRequest {
    /// Bytes per second all recoveries share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Bytes per second each running recovery keeps at least.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<String>,
    /// Rebuilds at once (a number, or `"unlimited"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rebuilds: Option<String>,
    /// Bytes per second all recoveries this node's replicas receive share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_rate: Option<String>,
}

impl RecoveryRequest {
    /// `current` with this change, checked; why not otherwise.
    pub fn apply_to(
        &self,
        current: walship_actors::RecoveryLimits,
    ) -> Result<walship_actors::RecoveryLimits, String> {
        fn value(
            text: &Option<String>,
            key: &str,
            parse: fn(&str) -> Option<u64>,
        ) -> Result<Option<Option<u64>>, String> {
            match text.as_deref().map(str::trim) {
                None => Ok(None),
                Some("unlimited") => Ok(Some(None)),
                Some(t) => parse(t).map(|v| Some(Some(v))).ok_or_else(|| {
                    format!("{key} = {t:?}: not a size like \"200MiB\" or \"unlimited\"")
                }),
            }
        }
        let mut limits = current;
        if let Some(rate) = value(&self.rate, "rate", crate::config::parse_rate)? {
            limits = limits.with_rate(rate);
        }
        if let Some(rate) = value(
            &self.receive_rate,
            "receive_rate",
            crate::config::parse_rate,
        )? {
            limits = limits.with_receive_rate(rate);
        }
        if let Some(floor) = value(&self.floor, "floor", crate::config::parse_rate)? {
            let floor = floor.ok_or("floor = \"unlimited\": a floor is a rate")?;
            limits = limits.with_floor(floor);
        }
        if let Some(max) = value(&self.max_rebuilds, "max_rebuilds", |t| t.parse().ok())? {
            limits =
                limits.with_max_rebuilds(max.map(|n| usize::try_from(n).unwrap_or(usize::MAX)));
        }
        limits.validate().map_err(|e| e.to_string())?;
        Ok(limits)
    }
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Node name.
    pub node: String,
    /// Cluster.
    pub cluster: String,
    /// Replication listener.
    pub replication: String,
    /// NBD listener.
    pub nbd: Option<String>,
    /// Multiplexed connections to peer nodes that are up: one per peer
    /// this node is primary towards, however many volumes.
    pub peer_links: usize,
    /// The volumes.
    pub volumes: Vec<VolumeReport>,
}

/// A running admin endpoint; [`stop`](Self::stop) waits for its requests.
#[derive(Debug)]
pub struct AdminServer(Serving);

impl AdminServer {
    /// Serves `node` to the clients of `listener`.
    pub fn start(listener: TcpListener, node: Arc<Node>) -> std::io::Result<Self> {
        let serving = Serving::start("admin", listener, move |stream, _, mut stopped| {
            let node = Arc::clone(&node);
            async move {
                let service = hyper::service::service_fn(move |request| {
                    let node = Arc::clone(&node);
                    async move { Ok::<_, std::convert::Infallible>(route(&node, request).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let connection =
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service);
                tokio::pin!(connection);
                let stopping = async {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = stopping => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
        })?;
        Ok(Self(serving))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    /// Stops accepting, lets requests being answered finish, and returns
    /// when every connection has closed.
    pub async fn stop(&self) {
        self.0.stop().await;
    }
}

/// Largest request body taken (an assignment is a few hundred bytes).
const MAX_BODY: usize = 64 << 10;

async fn route(node: &Node, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), parts.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &status(node).await),
        (&Method::GET, ["volumes", name]) => match node.volume_status(name).await {
            Ok(report) => json(StatusCode::OK, &report),
            Err(e) => refusal(&e),
        },
        (&Method::POST, ["volumes", name, "assignment"]) => {
            if let Some(plane) = node.control_plane() {
                // Two sources of epochs would give two primaries one epoch.
                return text(
                    StatusCode::CONFLICT,
                    format!("assignments come from {plane} on this node\n"),
                );
            }
            let name = (*name).to_owned();
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
            };
            let wanted: AssignmentRequest = match serde_json::from_slice(&body) {
                Ok(wanted) => wanted,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("assignment: {e}\n")),
            };
            match node.apply_assignment(&name, wanted.applied()).await {
                Ok(()) => match node.volume_status(&name).await {
                    Ok(report) => json(StatusCode::OK, &report),
                    Err(e) => refusal(&e),
                },
                Err(e) => refusal(&e),
            }
        }
        (&Method::POST, ["volumes", name, "verify"]) => {
            let repair = request
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == "repair=true" || kv == "repair"));
            match node.verify(name, repair).await {
                Ok(report) => json(StatusCode::OK, &report),
                Err(e) => refusal(&e),
            }
        }
        (&Method::GET, ["recovery"]) => json(StatusCode::OK, &node.recovery().status()),
        (&Method::POST, ["recovery"]) => {
            let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
            };
            let wanted: RecoveryRequest = match serde_json::from_slice(&body) {
                Ok(wanted) => wanted,
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("recovery: {e}\n")),
            };
            let budget = node.recovery();
            let applied = wanted
                .apply_to(budget.limits())
                .and_then(|limits| budget.set_limits(limits).map_err(|e| e.to_string()));
            match applied {
                Ok(()) => json(StatusCode::OK, &budget.status()),
                Err(why) => text(StatusCode::BAD_REQUEST, format!("recovery: {why}\n")),
            }
        }
        (&Method::GET, ["metrics"]) => text(StatusCode::OK, metrics(node).await),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no route {} {path}\n", request.method()),
        ),
    }
}

/// The node's status report.
pub async fn status(node: &Node) -> StatusReport {
    StatusReport {
        node: node.name().to_owned(),
        cluster: node.config().cluster.clone(),
        replication: node.replication_addr().to_string(),
        nbd: node.nbd_addr().map(|a| a.to_string()),
        peer_links: node.peer_links().await,
        volumes: node.report().await,
    }
}

fn refusal(error: &NodeError) -> Response<Full<Bytes>> {
    let status = match error {
        NodeError::NoSuchVolume(_) => StatusCode::NOT_FOUND,
        NodeError::Fenced { .. } | NodeError::NotPrimary { .. } => StatusCode::CONFLICT,
        NodeError::BadAssignment { .. } | NodeError::Config(_) => StatusCode::BAD_REQUEST,
        NodeError::Volume {
            source: walship_actors::VolumeError::VerifyRunning,
            ..
        } => StatusCode::CONFLICT,
        NodeError::Volume { .. } | NodeError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(status, format!("{error}\n"))
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(status, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.into_bytes())
}

fn respond(status: StatusCode, kind: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    response
}

/// A client's request to a node's admin endpoint: `GET` when `body` is
/// `None`, else `POST` with the JSON body. Returns the status and body.
pub async fn request(
    addr: &str,
    path: &str,
    body: Option<String>,
) -> Result<(StatusCode, String), AdminClientError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let builder = Request::builder()
        .uri(path)
        .header(hyper::header::HOST, addr);
    let request = match body {
        None => builder.method(Method::GET).body(Full::new(Bytes::new())),
        Some(body) => builder
            .method(Method::POST)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body))),
    }
    .map_err(|e| AdminClientError::Request(e.to_string()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The node could not be reached.
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    /// HTTP failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(String),
}
