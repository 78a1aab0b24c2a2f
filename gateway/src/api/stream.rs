//! Live data: `GET /api/v1/stream` (SSE) and `GET /api/v1/ws` (WebSocket) deliver every
//! committed transaction under an address prefix that the device may read. A subscriber
//! that cannot keep up is dropped (and counted) rather than slowing the chain. SSE clients
//! resume with `Last-Event-ID` (the global sequence), replayed from the store.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::Stream;
use kalima_core::registry::Device;
use kalima_core::tx::validate_prefix;
use kalima_core::{CommittedTx, Rejection};
use serde::Deserialize;
use tokio::sync::mpsc;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, Auth};
use super::model::TxJson;

/// Items buffered per client before it counts as too slow and is dropped.
const CLIENT_BUFFER: usize = 4096;
/// Transactions replayed per store read when resuming.
const REPLAY_PAGE: u32 = 1000;

/// Routes of this resource.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/stream", get(sse)).route("/ws", get(ws))
}

/// `?address=PREFIX`
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Address prefix to follow (`/` for everything the device may read).
    pub address: Option<String>,
    /// Resume after this global sequence (WebSocket; SSE clients send `Last-Event-ID`).
    pub after: Option<u64>,
}

/// What a subscriber receives.
enum Item {
    Tx(Arc<CommittedTx>),
    End(&'static str),
}

/// One open stream of a device; frees its slot when the stream task ends.
struct Slot {
    streams: Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
    device: String,
}

impl Slot {
    fn take(state: &AppState, device: &str) -> Result<Slot, ApiError> {
        let limit = state.config.api.max_streams_per_device;
        let mut open = state.streams.lock();
        let n = open.entry(device.to_string()).or_insert(0);
        if *n >= limit {
            return Err(ApiError::TooMany(format!(
                "device {device} already holds {limit} live streams ([api] max_streams_per_device)"
            )));
        }
        *n += 1;
        Ok(Slot { streams: state.streams.clone(), device: device.to_string() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        if let Some(n) = open.get_mut(&self.device) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.device);
            }
        }
    }
}

struct Gauge;
impl Gauge {
    fn new() -> Self {
        metrics::gauge!("kalima_stream_subscribers").increment(1.0);
        Gauge
    }
}
impl Drop for Gauge {
    fn drop(&mut self) {
        metrics::gauge!("kalima_stream_subscribers").decrement(1.0);
    }
}

fn check(auth: &Auth, prefix: &str) -> Result<(), ApiError> {
    validate_prefix(prefix).map_err(Rejection::from)?;
    let d = &auth.0;
    // Allowed when some read grant covers the prefix or lies below it; each item is still
    // filtered by the exact grants.
    let overlaps = d.is_admin()
        || d.grants.iter().any(|g| {
            g.read
                && (kalima_core::tx::prefix_matches(&g.prefix, prefix)
                    || kalima_core::tx::prefix_matches(prefix, &g.prefix))
        });
    if overlaps {
        Ok(())
    } else {
        Err(ApiError::Rejected(Rejection::Forbidden {
            device: d.id.clone(),
            access: "read",
            address: prefix.to_string(),
        }))
    }
}

fn visible(device: &Device, prefix: &str, c: &CommittedTx) -> bool {
    let a = &c.tx.content.address;
    kalima_core::tx::prefix_matches(prefix, a) && device.can_read(a)
}

/// Subscribes first, then replays from the store, so no commit falls between the two.
fn follow(
    state: &AppState,
    slot: Slot,
    mut device: Arc<Device>,
    prefix: String,
    after: Option<u64>,
) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let mut sub = state.chain.bus().subscribe();
    let chain = state.chain.clone();
    let mut shutdown = state.shutdown.subscribe();
    tokio::spawn(async move {
        let _gauge = Gauge::new();
        let _slot = slot;
        let stopping = async move {
            if shutdown.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(stopping);
        let mut next = 0u64;
        if let Some(after) = after {
            next = after.saturating_add(1);
            let end = chain.tree_size();
            while next < end {
                let page = match chain.store().txs_between(next, end, REPLAY_PAGE).await {
                    Ok(p) if !p.is_empty() => p,
                    // A gap in the replay would be silent data loss for the client: end the
                    // stream and let it resume from its last event id.
                    _ => {
                        let _ = tx.send(Item::End("replay_failed")).await;
                        return;
                    }
                };
                match chain.registry().get(&device.id) {
                    Some(d) if !d.record.revoked => device = d,
                    _ => {
                        let _ = tx.send(Item::End("revoked")).await;
                        return;
                    }
                }
                for c in page {
                    next = c.tx.global_sequence + 1;
                    if visible(&device, &prefix, &c) && tx.send(Item::Tx(Arc::new(c))).await.is_err() {
                        return;
                    }
                }
            }
        }
        loop {
            let next_batch = tokio::select! {
                _ = &mut stopping => {
                    let _ = tx.try_send(Item::End("shutdown"));
                    return;
                }
                // The client went away: free the task and its bus receiver at once, even on a
                // prefix that never sees a commit.
                _ = tx.closed() => return,
                b = sub.next() => b,
            };
            let batch = match next_batch {
                Ok(b) => b,
                Err(end) => {
                    let _ = tx.try_send(Item::End(end.label()));
                    return;
                }
            };
            // Grants and revocation apply to open streams too: the registry is updated
            // before a commit is published, so this sees every change up to this batch.
            match chain.registry().get(&device.id) {
                Some(d) if !d.record.revoked => device = d,
                _ => {
                    let _ = tx.try_send(Item::End("revoked"));
                    return;
                }
            }
            for c in batch.iter() {
                if c.tx.global_sequence < next || !visible(&device, &prefix, c) {
                    continue;
                }
                match tx.try_send(Item::Tx(c.clone())) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => "slow_client")
                            .increment(1);
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        }
    });
    rx
}

fn json(c: &CommittedTx) -> String {
    serde_json::to_string(&TxJson::from(c)).unwrap_or_default()
}

/// Server-sent events of committed transactions under a prefix: `event: tx`, `id:` the global
/// sequence, `data:` the transaction JSON. Reconnect with `Last-Event-ID` to resume.
#[utoipa::path(get, path = "/api/v1/stream", tag = "streams", params(StreamQuery),
    responses((status = 200, description = "text/event-stream of transactions", content_type = "text/event-stream", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, description = "The device holds max_streams_per_device streams", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn sse(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let prefix = q.address.unwrap_or_else(|| "/".into());
    check(&auth, &prefix)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.after);
    let slot = Slot::take(&state, &auth.0.id)?;
    let rx = follow(&state, slot, auth.0.clone(), prefix, last);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await? {
            Item::Tx(c) => Event::default().event("tx").id(c.tx.global_sequence.to_string()).data(json(&c)),
            Item::End(reason) => Event::default().event("end").data(format!("{{\"reason\":\"{reason}\"}}")),
        };
        Some((Ok(ev), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(state.config.api.stream_keepalive_secs.max(1)))))
}

/// WebSocket equivalent of the SSE stream: one text frame (transaction JSON) per transaction.
#[utoipa::path(get, path = "/api/v1/ws", tag = "streams", params(StreamQuery),
    responses((status = 101, description = "Switching protocols; text frames of transactions"), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 429, description = "The device holds max_streams_per_device streams", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ws(
    State(state): State<AppState>,
    auth: Auth,
    ApiQuery(q): ApiQuery<StreamQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let prefix = q.address.unwrap_or_else(|| "/".into());
    check(&auth, &prefix)?;
    // Checked after auth and grants, so a plain GET learns nothing it may not know.
    let upgrade = upgrade.map_err(|r| ApiError::BadRequest("not_websocket", r.body_text()))?;
    let slot = Slot::take(&state, &auth.0.id)?;
    let rx = follow(&state, slot, auth.0.clone(), prefix, q.after);
    Ok(upgrade.on_upgrade(move |socket| pump(socket, rx)).into_response())
}

async fn pump(mut socket: WebSocket, mut rx: mpsc::Receiver<Item>) {
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some(Item::Tx(c)) => {
                    if socket.send(Message::Text(json(&c).into())).await.is_err() {
                        return;
                    }
                }
                Some(Item::End(reason)) => {
                    let _ = socket.send(Message::Close(Some(axum::extract::ws::CloseFrame { code: 1013, reason: reason.into() }))).await;
                    return;
                }
                None => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
