//! Delivery to buyers' webhooks. A buyer registers a URL and a secret for a subscription
//! (recorded on the chain); the node POSTs each delivery as JSON, signed with HMAC-SHA256
//! over `timestamp.body`, retried with exponential backoff until the receiver answers 2xx,
//! in order. Each delivery carries a stable id (`Kalima-Delivery-Id`), so a receiver that
//! sees one twice (after a retry whose answer was lost, or a restart) can drop the repeat.
//! The last sequence a receiver acknowledged is kept per node, so a restart resumes there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use kalima_core::Chain;
use kalima_core::ledger::market::{SUBSCRIPTIONS_ADDRESS, Subscription};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;

use crate::access::Access;
use crate::delivery::{Delivered, follow};
use kalima_core::now_ms;

/// Address of webhook registrations (key = subscription id).
pub const WEBHOOKS_ADDRESS: &str = "/_kalima/market/webhooks";
/// Header holding the delivery id.
pub const DELIVERY_ID_HEADER: &str = "kalima-delivery-id";
/// Header holding the signing timestamp (ms).
pub const TIMESTAMP_HEADER: &str = "kalima-timestamp";
/// Header holding `v1=<hex HMAC-SHA256(secret, timestamp "." body)>`.
pub const SIGNATURE_HEADER: &str = "kalima-signature";
/// Shortest secret accepted.
pub const MIN_SECRET: usize = 16;

/// A buyer's webhook for one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    /// Subscription id.
    pub subscription: String,
    /// Where deliveries are POSTed (http or https).
    pub url: String,
    /// HMAC key the buyer chose (16..=128 bytes).
    pub secret: String,
    /// Deliveries start after this global sequence (the chain's head at registration), so
    /// nothing committed after the registration is missed while the worker picks it up.
    pub after: u64,
}

/// How the webhook worker runs.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// First retry delay; doubled on each failure.
    pub first_retry: Duration,
    /// Longest retry delay.
    pub max_retry: Duration,
    /// Timeout of one POST.
    pub request_timeout: Duration,
    /// How often registrations are looked for.
    pub scan_every: Duration,
    /// How often delivery batches are recorded on the chain.
    pub record_every: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            first_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            scan_every: Duration::from_secs(1),
            record_every: Duration::from_secs(30),
        }
    }
}

/// `v1=` + hex HMAC-SHA256 of `timestamp "." body` under `secret`: what a receiver recomputes.
pub fn signature(secret: &str, timestamp_ms: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return String::new() };
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a webhook registration: an http(s) URL and a long enough secret.
pub fn validate(url: &str, secret: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("url {url:?} must be http(s)://host/..."));
    }
    if url.len() > 2048 {
        return Err("url must be at most 2048 bytes".into());
    }
    if secret.len() < MIN_SECRET || secret.len() > 128 {
        return Err(format!("secret must be {MIN_SECRET}..=128 bytes"));
    }
    Ok(())
}

fn state_name(sub: &str) -> String {
    format!("market/webhook/{sub}")
}

/// The worker that runs one delivery task per registered webhook of a current subscription.
pub struct WebhookService {
    stop: tokio::sync::watch::Sender<bool>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl WebhookService {
    /// Starts the worker.
    pub fn start(chain: Chain, options: WebhookOptions) -> Self {
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let http = match reqwest::Client::builder().timeout(options.request_timeout).build() {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(target: "bridge::marketplace", error = %e, "Webhooks disabled: no HTTP client.");
                    return;
                }
            };
            let mut running: HashMap<String, (Webhook, tokio::task::JoinHandle<()>)> = HashMap::new();
            loop {
                let hooks: Vec<Webhook> = chain
                    .memcache()
                    .values(WEBHOOKS_ADDRESS)
                    .iter()
                    .filter_map(|c| serde_json::from_slice(&c.tx.content.body).ok())
                    .collect();
                // A changed or removed registration, or a finished stream, is restarted (or
                // dropped) from its kept position.
                running.retain(|_, (hook, task)| {
                    let keep = hooks.contains(hook) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for hook in hooks {
                    if running.contains_key(&hook.subscription) {
                        continue;
                    }
                    let Some(access) = current_access(&chain, &hook.subscription) else { continue };
                    let task =
                        tokio::spawn(deliver(chain.clone(), http.clone(), hook.clone(), access, options.clone()));
                    running.insert(hook.subscription.clone(), (hook, task));
                }
                tokio::select! {
                    _ = tokio::time::sleep(options.scan_every) => {}
                    _ = rx.changed() => break,
                }
            }
            for (_, (_, t)) in running {
                t.abort();
            }
        });
        Self { stop, task: parking_lot::Mutex::new(Some(task)) }
    }

    /// Stops every delivery.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

/// The subscription with its feed, when it is current and its feed listed.
fn current_access(chain: &Chain, sub_id: &str) -> Option<Access> {
    let sub: Subscription = chain
        .memcache()
        .get(SUBSCRIPTIONS_ADDRESS, sub_id)
        .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())?;
    let feed: kalima_core::ledger::market::Feed = chain
        .memcache()
        .get(kalima_core::ledger::market::FEEDS_ADDRESS, &sub.feed)
        .and_then(|c| serde_json::from_slice(&c.tx.content.body).ok())?;
    (feed.listed && sub.expires_at_ms > now_ms()).then_some(Access { subscription: sub, feed })
}

/// Delivers one subscription to its webhook until the stream ends; every delivery is
/// retried until acknowledged, in order.
async fn deliver(chain: Chain, http: reqwest::Client, hook: Webhook, access: Access, o: WebhookOptions) {
    let name = state_name(&hook.subscription);
    let kept = match chain.store().node_state(&name).await {
        Ok(Some(v)) => v.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    };
    let after = Some(kept.map_or(hook.after, |k| k.max(hook.after)));
    let mut stream = follow(&chain, access, after, "webhook", o.record_every);
    let hook = Arc::new(hook);
    while let Some(item) = stream.next().await {
        let Ok(d) = item else { return };
        let body = match serde_json::to_vec(&d) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let id = d.delivery_id(&hook.subscription);
        let mut wait = o.first_retry;
        loop {
            match post(&http, &hook, &id, &body).await {
                Ok(()) => break,
                Err(reason) => {
                    metrics::counter!("kalima_market_webhook_failures_total", "reason" => reason).increment(1);
                    tracing::debug!(target: "bridge::marketplace", subscription = %hook.subscription, reason, "Webhook delivery failed; retrying.");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(o.max_retry);
                }
            }
        }
        metrics::counter!("kalima_market_webhook_delivered_total").increment(1);
        let seq = d.last_sequence();
        if matches!(d, Delivered::Reading { .. })
            && let Err(e) = chain.store().put_node_state(&[(&name, seq.to_be_bytes().to_vec())]).await
        {
            tracing::warn!(target: "bridge::marketplace", error = %e, "Could not keep the webhook's position.");
        }
    }
}

async fn post(http: &reqwest::Client, hook: &Webhook, id: &str, body: &[u8]) -> Result<(), &'static str> {
    let ts = now_ms();
    let r = http
        .post(&hook.url)
        .header("content-type", "application/json")
        .header(DELIVERY_ID_HEADER, id)
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, signature(&hook.secret, ts, body))
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| if e.is_timeout() { "timeout" } else { "connect" })?;
    if r.status().is_success() { Ok(()) } else { Err("status") }
}

/// `[marketplace]`: how this node serves the marketplace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MarketplaceSection {
    /// Deliver to buyers' webhooks from this node (in a cluster, enable it on one or two
    /// masters: each enabled node delivers, and receivers drop repeats by delivery id).
    pub webhooks: bool,
    /// Timeout of one webhook POST.
    pub webhook_timeout_ms: u64,
    /// Longest delay between two attempts of a webhook delivery.
    pub webhook_max_retry_secs: u64,
}

impl Default for MarketplaceSection {
    fn default() -> Self {
        Self { webhooks: true, webhook_timeout_ms: 10_000, webhook_max_retry_secs: 300 }
    }
}

impl MarketplaceSection {
    /// Every problem with the section, one message each.
    pub fn validate(&self) -> Vec<String> {
        let mut e = Vec::new();
        if !(100..=120_000).contains(&self.webhook_timeout_ms) {
            e.push("marketplace.webhook_timeout_ms must be 100..=120000".into());
        }
        if !(1..=86_400).contains(&self.webhook_max_retry_secs) {
            e.push("marketplace.webhook_max_retry_secs must be 1..=86400".into());
        }
        e
    }

    /// The worker's options.
    pub fn options(&self) -> WebhookOptions {
        WebhookOptions {
            request_timeout: Duration::from_millis(self.webhook_timeout_ms),
            max_retry: Duration::from_secs(self.webhook_max_retry_secs),
            ..WebhookOptions::default()
        }
    }
}
