//! The REST/OpenAPI server: resources under `/api/v1`, Kalima's own REST paths as a
//! compatibility surface, operations endpoints, the OpenAPI document and Swagger UI.

pub mod adapters;
pub mod anchors;
pub mod bridge;
pub mod chain;
pub mod cluster;
pub mod compat;
pub mod devices;
pub mod error;
pub mod extract;
pub mod klx;
pub mod market;
pub mod model;
pub mod ops;
pub mod stream;
pub mod tx;
pub mod values;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use kalima_core::{Chain, Ingest};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;

/// Metrics label of writes through this API.
pub const INTERFACE: &str = "rest";

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The chain.
    pub chain: Chain,
    /// The write path.
    pub ingest: Ingest,
    /// The configuration.
    pub config: Arc<Config>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Set to true when the node stops: live streams end so graceful shutdown completes.
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    /// Open live streams per device, bounded by `[api] max_streams_per_device`.
    pub streams: Arc<parking_lot::Mutex<std::collections::HashMap<String, usize>>>,
    /// The Modbus adapter, when `[modbus]` configures devices.
    pub modbus: Option<Arc<kalima_adapter_modbus::ModbusAdapter>>,
    /// The LoRaWAN adapter, when `[lorawan] listen` is set.
    pub lorawan: Option<Arc<kalima_adapter_lorawan::LorawanAdapter>>,
    /// The cluster, when this node is a master.
    pub cluster: Option<Arc<kalima_core::cluster::Cluster>>,
    /// The bridge relayer, when `[bridge] relayer_device` is set.
    pub relayer: Option<Arc<kalima_bridge_ethereum::Relayer>>,
    /// Checkpoint anchoring, when `[anchor]` names targets.
    pub anchors: Option<Arc<kalima_core::anchor::AnchorService>>,
    /// The Lightning payment backend, when `[lightning] enabled`.
    pub invoices: Option<Arc<dyn kalima_bridge_lightning::InvoiceBackend>>,
}

impl AppState {
    /// State over a running chain.
    pub fn new(chain: Chain, config: Arc<Config>) -> Self {
        let ingest = Ingest::new(chain.clone(), config.api.max_body_bytes);
        AppState {
            chain,
            ingest,
            config,
            metrics: metrics_handle(),
            shutdown: Arc::new(tokio::sync::watch::channel(false).0),
            streams: Arc::default(),
            modbus: None,
            lorawan: None,
            cluster: None,
            relayer: None,
            anchors: None,
            invoices: None,
        }
    }
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_transactions".into()),
                        &[1.0, 10.0, 100.0, 1000.0, 10000.0],
                    )
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                // Another recorder is installed (tests): render from a detached one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            describe_metrics();
            handle
        })
        .clone()
}

/// Describes every series and creates the unlabelled ones at zero, so dashboards and alerts
/// see them before the first event.
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("kalima_writes_accepted_total", "Transactions accepted, by interface");
    describe_counter!("kalima_writes_rejected_total", "Writes rejected, by reason and interface");
    describe_counter!("kalima_tx_committed_total", "Transactions durably committed");
    describe_counter!("kalima_blocks_committed_total", "Blocks durably committed");
    describe_counter!("kalima_commit_failures_total", "Group commits whose durable write failed");
    describe_counter!("kalima_checkpoints_total", "Signed checkpoints produced");
    describe_counter!("kalima_ttl_deletes_total", "Deletes issued by the node when a TTL expired");
    describe_counter!("kalima_bus_subscribers_dropped_total", "Live subscribers dropped, by reason");
    describe_histogram!("kalima_commit_seconds", metrics::Unit::Seconds, "Enqueue to durable commit, per write call");
    describe_histogram!("kalima_store_write_seconds", metrics::Unit::Seconds, "Durable store write per group commit");
    describe_histogram!("kalima_store_checkpoint_seconds", metrics::Unit::Seconds, "SQLite WAL checkpoint duration");
    describe_histogram!("kalima_commit_batch_transactions", "Transactions per group commit");
    describe_gauge!("kalima_block_height", "Height of the latest committed block");
    describe_gauge!("kalima_tree_size", "Transactions on the chain");
    describe_gauge!("kalima_memcache_values", "Live values held in the memcache");
    describe_gauge!("kalima_stream_subscribers", "Open SSE and WebSocket subscribers");
    describe_counter!("kalima_adapter_polls_total", "Field-device requests, by adapter and outcome");
    describe_counter!(
        "kalima_adapter_readings_total",
        "Field readings, by adapter and outcome (written, unchanged, invalid, rejected)"
    );
    describe_counter!("kalima_mqtt_events_total", "MQTT connection events and refusals, by outcome");
    describe_gauge!("kalima_mqtt_connections", "Open MQTT client connections");
    describe_counter!(
        "kalima_adapter_frames_total",
        "Radio frames and datagrams, by adapter and outcome (accepted, join, duplicate, replay, bad_mic, ...)"
    );
    describe_counter!("kalima_adapter_setpoints_total", "Set-point writes to field devices, by adapter and outcome");
    describe_histogram!("kalima_adapter_poll_seconds", metrics::Unit::Seconds, "One poll of a field device's schedule");
    describe_gauge!(
        "kalima_adapter_devices",
        "Field devices by adapter and state (connecting, ok, failing, unauthorized)"
    );
    describe_counter!("kalima_bridge_deposits_attested_total", "Bridge deposits this relayer attested, by chain");
    describe_counter!("kalima_bridge_release_signatures_total", "Release signatures this relayer made, by chain");
    describe_counter!("kalima_bridge_releases_sent_total", "Release transactions sent, by chain and outcome");
    describe_counter!("kalima_bridge_round_errors_total", "Relayer rounds that failed (RPC, configuration), by chain");
    describe_counter!("kalima_bridge_halts_total", "Halts this relayer issued, by chain");
    describe_counter!("kalima_bridge_bad_signatures_total", "Release signatures that do not recover to their relayer");
    describe_counter!(
        "kalima_bridge_logs_ignored_total",
        "Bridge logs ignored, by chain and reason (emitter, token, ...)"
    );
    describe_counter!("kalima_bridge_conservation_breaches_total", "Conservation checks that found a breach");
    describe_gauge!("kalima_bridge_halted", "1 while a bridge is halted, by chain");
    describe_gauge!("kalima_bridge_safe_block", "Last block the relayer treats as final, by chain");
    describe_gauge!("kalima_bridge_locked_klx", "KLX locked in a bridge contract at its final block, by chain");
    describe_gauge!("kalima_klx_circulating", "Native KLX in circulation (minted - burned)");
    for name in [
        "kalima_tx_committed_total",
        "kalima_blocks_committed_total",
        "kalima_commit_failures_total",
        "kalima_checkpoints_total",
        "kalima_ttl_deletes_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["lagged", "slow_client"] {
        metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => reason).increment(0);
    }
    metrics::gauge!("kalima_stream_subscribers").increment(0.0);
    // Adapter series exist from the start, so dashboards show zero rather than no data.
    metrics::gauge!("kalima_mqtt_connections").increment(0.0);
    for adapter in ["modbus", "lorawan"] {
        for outcome in ["written", "rejected"] {
            metrics::counter!("kalima_adapter_readings_total", "adapter" => adapter, "outcome" => outcome).increment(0);
        }
    }
    for state in ["ok", "failing", "unauthorized"] {
        metrics::gauge!("kalima_adapter_devices", "adapter" => "modbus", "state" => state).increment(0.0);
    }
    metrics::counter!("kalima_adapter_polls_total", "adapter" => "modbus", "outcome" => "ok").increment(0);
    metrics::counter!("kalima_adapter_frames_total", "adapter" => "lorawan", "outcome" => "accepted").increment(0);
}

/// Every authenticated operation can answer 401 (unknown or revoked token) and 400 (a
/// malformed query or path); documenting them once here keeps the document complete.
struct CommonResponses;

impl utoipa::Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder, content::ContentBuilder};
        let error = |desc: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(desc)
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody"))).build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post, &mut item.put, &mut item.delete].into_iter().flatten() {
                if op.security.as_ref().is_none_or(|s| s.is_empty()) {
                    continue;
                }
                let r = &mut op.responses.responses;
                r.entry("400".into()).or_insert_with(|| error("Malformed request, query or path"));
                r.entry("401".into()).or_insert_with(|| error("Unknown or revoked device token"));
            }
        }
    }
}

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Device token from POST /api/v1/devices (admin token: DIR/admin.token)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A buyer's feed access token, <subscription id>.<secret>, whose SHA-256 the purchase carried",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of `/api/v1`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kalima node API",
        description = "Write readings, read current values and history, follow live data, and get proofs from a Kalima node. Canonical encodings: openapi/ENCODING.md.",
        license(name = "Apache-2.0")
    ),
    paths(
        tx::write_one, tx::write_batch, tx::move_key, tx::read_tx, tx::read_receipt,
        values::values, values::addresses, values::history,
        chain::list_blocks, chain::block, chain::latest_checkpoint, chain::new_checkpoint, chain::consistency,
        stream::sse, stream::ws,
        devices::register, devices::list, devices::show, devices::revoke, devices::grant, devices::remove_grant,
        adapters::modbus_devices, adapters::modbus_setpoint, adapters::lorawan_status,
        cluster::status, cluster::add_member, cluster::remove_member,
        klx::account, klx::supply, klx::transfer,
        bridge::chains, bridge::configure, bridge::resume, bridge::deposits_by_tx, bridge::deposit,
        bridge::withdraw, bridge::withdrawal, bridge::status,
        anchors::list, anchors::anchor_now,
        market::list, market::one, market::list_feed, market::delist, market::purchase, market::stream, market::ws,
        market::invoice, market::invoice_status, market::subscription, market::set_webhook, market::remove_webhook, market::statement, market::config, market::set_config,
        bridge::register_exchange, bridge::exchange, bridge::add_addresses, bridge::exchange_address,
        ops::healthz, ops::readyz, ops::metrics_text,
    ),
    modifiers(&SecurityAddon, &CommonResponses),
    tags(
        (name = "transactions", description = "Writes (answered after the durable commit unless wait=false) and transactions with proofs"),
        (name = "values", description = "Current values and history"),
        (name = "chain", description = "Blocks, signed checkpoints and consistency proofs"),
        (name = "streams", description = "Live committed data (SSE, WebSocket)"),
        (name = "devices", description = "Devices, tokens and grants (admin)"),
        (name = "adapters", description = "Field adapters: device status and set-points"),
        (name = "cluster", description = "Master cluster: membership, leader, Raft and chain positions (admin)"),
        (name = "klx", description = "Native KLX: accounts, supply, holder-signed transfers"),
        (name = "bridge", description = "Ethereum/Polygon bridge: deposits, withdrawals, totals, relayer status"),
        (name = "anchors", description = "Checkpoints anchored on public chains"),
        (name = "marketplace", description = "Oracle feeds: catalogue, listing, purchases in KLX, delivery with proofs, provider statements"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what is committed under `openapi/`).
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

/// Every `/api/v1` resource.
pub fn api_router() -> Router<AppState> {
    Router::new()
        .merge(tx::router())
        .merge(values::router())
        .merge(chain::router())
        .merge(stream::router())
        .merge(devices::router())
        .merge(adapters::router())
        .merge(cluster::router())
        .merge(klx::router())
        .merge(bridge::router())
        .merge(anchors::router())
        .merge(market::router())
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let timeout = Duration::from_secs(state.config.api.request_timeout_secs);
    let max_request = state.config.api.max_request_bytes;
    let doc: utoipa::openapi::OpenApi = serde_json::from_str(&openapi_json()).unwrap_or_else(|_| ApiDoc::openapi());
    Router::new()
        .nest("/api/v1", api_router().fallback(not_found).method_not_allowed_fallback(method_not_allowed))
        .merge(ops::router())
        .merge(compat::router())
        .merge(SwaggerUi::new("/docs").url("/api/v1/openapi.json", doc))
        .fallback(compat::unknown_request)
        .layer(DefaultBodyLimit::max(max_request))
        // Outside the timeout layer, so the 408 it produces passes through.
        .layer(TimeoutLayer::with_status_code(axum::http::StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(axum::middleware::map_response(timeout_body))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_default();
            tracing::debug_span!(target: "api", "request", method = %req.method(), path = %path)
        }))
        .with_state(state)
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
}

/// The timeout layer answers 408 with no body; give it the API's error body.
async fn timeout_body(resp: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;
    if resp.status() == axum::http::StatusCode::REQUEST_TIMEOUT && resp.headers().get("content-type").is_none() {
        let msg = "the request took longer than [api] request_timeout_secs".to_string();
        let mut r = error::ApiError::BadRequest("timeout", msg).into_response();
        *r.status_mut() = axum::http::StatusCode::REQUEST_TIMEOUT;
        return r;
    }
    resp
}

async fn not_found() -> error::ApiError {
    error::ApiError::NotFound("no such route; see /docs".into())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_timeout_answers_the_api_error_body() {
        let empty = axum::http::Response::builder()
            .status(axum::http::StatusCode::REQUEST_TIMEOUT)
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = super::timeout_body(empty).await;
        assert_eq!(resp.status(), axum::http::StatusCode::REQUEST_TIMEOUT);
        let bytes = axum::body::to_bytes(resp.into_body(), 4096).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["code"], "timeout");
    }

    /// The committed document must be what the code generates, so clients never read a
    /// stale contract. Regenerate with `cargo run -p kalima-gateway -- openapi > openapi/openapi.json`.
    #[test]
    fn committed_openapi_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");
        let generated = super::openapi_json();
        if std::env::var_os("KALIMA_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "openapi/openapi.json differs from the code: run `cargo run -p kalima-gateway -- openapi > openapi/openapi.json` and commit it"
        );
    }
}
