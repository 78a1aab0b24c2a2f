//! Marketplace buyers on the MQTT server. A buyer logs in with its subscription id as user
//! name and its access token as password, subscribes to `kalima/feeds/<feed>/#`, and receives
//! each delivery (JSON with its inclusion proofs) on `kalima/feeds/<feed>/<address>/<key>`.
//! A buyer may not publish, nor subscribe to anything else. When the subscription ends (or the
//! feed is delisted) the reason is sent on `kalima/feeds/<feed>/_end` and the connection closes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kalima_core::feeds::FeedGate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use crate::codec::{Incoming, Outgoing, Refusal, Version};
use crate::{Shared, count};

/// Topic prefix of feed deliveries.
pub const FEEDS: &str = "kalima/feeds";

/// The topic of a delivery of `feed` at `address`/`key`.
pub fn feed_topic(feed: &str, address: &str, key: &str) -> String {
    format!("{FEEDS}/{feed}/{}/{key}", address.trim_start_matches('/'))
}

/// True when `filter` asks for deliveries of `feed` only.
fn allowed(filter: &str, feed: &str) -> bool {
    let own = format!("{FEEDS}/{feed}/");
    filter.starts_with(&own) && !filter[own.len()..].is_empty()
}

pub(crate) struct Buyer {
    pub(crate) gate: Arc<dyn FeedGate>,
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) feed: String,
    pub(crate) version: Version,
}

impl Buyer {
    pub(crate) async fn run(
        self,
        shared: Arc<Shared>,
        mut rd: OwnedReadHalf,
        mut wr: OwnedWriteHalf,
        mut buf: BytesMut,
        keep_alive: u16,
    ) {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(shared.config.max_inflight.max(16));
        let version = self.version;
        let writer = tokio::spawn(async move {
            let mut out = BytesMut::with_capacity(16 * 1024);
            while let Some(p) = rx.recv().await {
                out.clear();
                if version.write(&p, &mut out).is_err() || wr.write_all(&out).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        if tx.send(Outgoing::ConnAck(Ok(()))).await.is_err() {
            return;
        }
        metrics::counter!("kalima_mqtt_buyers_total").increment(1);
        tracing::debug!(target: "adapter::mqtt", feed = %self.feed, "Buyer connected.");
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let max = shared.config.max_packet_bytes;
        let (ended_tx, mut ended) = tokio::sync::watch::channel(false);
        let mut delivery: Option<tokio::task::JoinHandle<()>> = None;
        'conn: loop {
            let read = async {
                match idle {
                    Some(t) => tokio::time::timeout(t, rd.read_buf(&mut buf)).await.unwrap_or(Ok(0)),
                    None => rd.read_buf(&mut buf).await,
                }
            };
            let n = tokio::select! {
                r = read => r.unwrap_or(0),
                _ = ended.changed() => 0,
            };
            if n == 0 {
                break;
            }
            loop {
                let pkt = match self.version.read(&mut buf, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(_) => {
                        count("malformed");
                        break 'conn;
                    }
                };
                match pkt {
                    Incoming::Subscribe { pkid, filters } => {
                        let mut codes = Vec::with_capacity(filters.len());
                        let mut qos = None;
                        for (f, q) in &filters {
                            if allowed(f, &self.feed) {
                                let granted = (*q).min(1);
                                qos = Some(qos.map_or(granted, |g: u8| g.max(granted)));
                                codes.push(Some(granted));
                            } else {
                                count("buyer_subscribe_refused");
                                codes.push(None);
                            }
                        }
                        // Subscribed before SUBACK goes out, so nothing after it is missed.
                        if let (Some(qos), None) = (qos, &delivery)
                            && let Some(feed_rx) = self.gate.follow(&self.user, &self.password, "mqtt")
                        {
                            delivery = Some(tokio::spawn(deliver(
                                feed_rx,
                                tx.clone(),
                                self.feed.clone(),
                                qos,
                                ended_tx.clone(),
                            )));
                        }
                        if tx.send(Outgoing::SubAck(pkid, codes)).await.is_err() {
                            break 'conn;
                        }
                    }
                    Incoming::Publish { qos, pkid, .. } => {
                        // Buyers read; they never write.
                        count("buyer_publish_refused");
                        let ack = match qos {
                            1 => Some(Outgoing::PubAck(pkid, Some(Refusal::NotAuthorized))),
                            2 => Some(Outgoing::PubRec(pkid, Some(Refusal::NotAuthorized))),
                            _ => None,
                        };
                        if let Some(a) = ack
                            && tx.send(a).await.is_err()
                        {
                            break 'conn;
                        }
                        if version == Version::V4 && qos > 0 {
                            // MQTT 3.1.1 has no refusal code for a publish: close instead.
                            break 'conn;
                        }
                    }
                    Incoming::PubRel(pkid) => {
                        let _ = tx.send(Outgoing::PubComp(pkid)).await;
                    }
                    Incoming::Unsubscribe { pkid, filters } => {
                        let _ = tx.send(Outgoing::UnsubAck(pkid, filters.len())).await;
                    }
                    Incoming::PingReq => {
                        let _ = tx.send(Outgoing::PingResp).await;
                    }
                    Incoming::PubAck(_) | Incoming::PubRec(_) | Incoming::PubComp(_) => {}
                    Incoming::Disconnect => break 'conn,
                    Incoming::Connect { .. } | Incoming::ServerOnly(_) => {
                        count("protocol_error");
                        break 'conn;
                    }
                }
            }
        }
        if let Some(d) = delivery {
            d.abort();
            // Let the end notice (if any) reach the writer before it closes.
            let _ = d.await;
        }
        drop(tx);
        let _ = writer.await;
        tracing::debug!(target: "adapter::mqtt", feed = %self.feed, "Buyer disconnected.");
    }
}

/// Publishes the feed's deliveries; on its end, the reason on `.../_end`, then closes.
async fn deliver(
    mut feed_rx: kalima_core::feeds::FeedReceiver,
    tx: mpsc::Sender<Outgoing>,
    feed: String,
    qos: u8,
    ended: tokio::sync::watch::Sender<bool>,
) {
    let mut pkid: u16 = 0;
    while let Some(item) = feed_rx.recv().await {
        let (topic, payload) = match item {
            Ok(i) => (feed_topic(&feed, &i.address, &i.key), Bytes::from(i.payload)),
            Err(reason) => {
                let p = Outgoing::Publish {
                    topic: format!("{FEEDS}/{feed}/_end"),
                    payload: Bytes::from(format!("{{\"reason\":\"{reason}\"}}")),
                    qos: 0,
                    pkid: 0,
                };
                let _ = tx.send(p).await;
                break;
            }
        };
        if qos == 1 {
            pkid = pkid.checked_add(1).unwrap_or(1);
        }
        let p = Outgoing::Publish { topic, payload, qos, pkid: if qos == 1 { pkid } else { 0 } };
        if tx.try_send(p).is_err() {
            // The buyer does not keep up: cut it off rather than hold the feed.
            metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => "slow_client").increment(1);
            break;
        }
    }
    let _ = ended.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buyers_subscribe_to_their_own_feed_only() {
        for ok in ["kalima/feeds/line-1/#", "kalima/feeds/line-1/plant-1/+/temp", "kalima/feeds/line-1/x"] {
            assert!(allowed(ok, "line-1"), "{ok}");
        }
        for bad in [
            "kalima/feeds/#",
            "kalima/feeds/line-10/#",
            "kalima/feeds/line-1/",
            "kalima/out/#",
            "#",
            "kalima/feeds/+/#",
        ] {
            assert!(!allowed(bad, "line-1"), "{bad}");
        }
        assert_eq!(feed_topic("line-1", "/plant-1/line-1", "temp"), "kalima/feeds/line-1/plant-1/line-1/temp");
    }
}
