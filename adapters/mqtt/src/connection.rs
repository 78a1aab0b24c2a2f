//! One client connection: CONNECT with device credentials, puts committed before their
//! PUBACK/PUBREC (in the order they arrived), subscriptions to committed data filtered by
//! read grants, and the device's own refusals on `kalima/errors/<device>`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kalima_core::registry::Device;
use kalima_core::tx::TxContent;
use kalima_core::{Error as CoreError, Rejection};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec::{ConnRefusal, Incoming, Outgoing, Refusal, Version, connect_level};
use crate::topic::{self, FilterKind};
use crate::{INTERFACE, Shared, count};

/// What the writer sends next: a packet now, or one that waits for a commit (`None`: close).
enum Pending {
    Now(Outgoing),
    Later(oneshot::Receiver<Option<Outgoing>>),
}

fn refusal_of(r: &Rejection) -> Refusal {
    match r {
        Rejection::UnknownDevice | Rejection::Revoked(_) | Rejection::Forbidden { .. } | Rejection::AdminOnly => {
            Refusal::NotAuthorized
        }
        Rejection::Invalid(_) => Refusal::TopicNameInvalid,
        Rejection::TooLarge { .. } | Rejection::Overloaded | Rejection::BatchSize { .. } => Refusal::QuotaExceeded,
        Rejection::Malformed(_) | Rejection::BadSignature(_) | Rejection::SignatureRequired(_) => {
            Refusal::PayloadFormatInvalid
        }
        _ => Refusal::Unspecified,
    }
}

async fn refuse(version: Version, wr: &mut OwnedWriteHalf, why: ConnRefusal) {
    let mut out = BytesMut::new();
    let _ = version.write(&Outgoing::ConnAck(Err(why)), &mut out);
    let _ = wr.write_all(&out).await;
}

/// Serves one accepted TCP connection until it ends.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let max = shared.config.max_packet_bytes;
    let connect_timeout = Duration::from_secs(shared.config.connect_timeout_secs);

    // The protocol level decides which codec reads everything, CONNECT included.
    let version = loop {
        match connect_level(&buf) {
            Ok(Some(4)) => break Version::V4,
            Ok(Some(5)) => break Version::V5,
            Ok(Some(_)) => {
                count("refused_version");
                let mut out = BytesMut::new();
                let _ = Version::V4.write(&Outgoing::ConnAck(Err(ConnRefusal::Version)), &mut out);
                let _ = wr.write_all(&out).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                count("malformed");
                tracing::debug!(target: "adapter::mqtt", peer = ?peer, error = %e, "Refused a connection.");
                return;
            }
        }
        match tokio::time::timeout(connect_timeout, rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && buf.len() <= max => {}
            _ => return,
        }
    };
    let connect = loop {
        match version.read(&mut buf, max) {
            Ok(Some(p)) => break p,
            Ok(None) => match tokio::time::timeout(connect_timeout, rd.read_buf(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            Err(e) => {
                count("malformed");
                tracing::debug!(target: "adapter::mqtt", peer = ?peer, error = %e, "Malformed CONNECT.");
                return;
            }
        }
    };
    let Incoming::Connect { client_id, keep_alive, login, has_will } = connect else {
        count("malformed");
        return;
    };
    let (user, password) = login.unwrap_or_default();
    let device = match shared.ingest.authenticate(INTERFACE, Some(&password)) {
        Ok(d) if d.id == user => d,
        Ok(_) | Err(_) => {
            count("refused_credentials");
            tracing::debug!(target: "adapter::mqtt", peer = ?peer, user = %user, "Refused credentials.");
            refuse(version, &mut wr, ConnRefusal::BadUserNamePassword).await;
            return;
        }
    };
    if shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.config.max_connections {
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        count("refused_busy");
        refuse(version, &mut wr, ConnRefusal::ServerBusy).await;
        return;
    }
    metrics::gauge!("kalima_mqtt_connections").increment(1.0);
    if has_will {
        // Will messages are not published; the client is told nothing, so log it once.
        tracing::debug!(target: "adapter::mqtt", device = %device.id, "Will message ignored.");
    }
    let conn = Conn {
        shared: shared.clone(),
        device,
        version,
        client_id,
        subs: Arc::new(Mutex::new(Vec::new())),
        qos2: HashSet::new(),
        tasks: Vec::new(),
    };
    conn.run(rd, wr, buf, keep_alive).await;
    shared.connections.fetch_sub(1, Ordering::SeqCst);
    metrics::gauge!("kalima_mqtt_connections").decrement(1.0);
}

struct Conn {
    shared: Arc<Shared>,
    device: Arc<Device>,
    version: Version,
    client_id: String,
    subs: Arc<Mutex<Vec<(String, u8)>>>,
    qos2: HashSet<u16>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A put that passed the per-message checks and waits for the batch commit.
struct Accepted {
    content: TxContent,
    qos: u8,
    pkid: u16,
    topic: String,
}

impl Conn {
    async fn run(
        mut self,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        wr: OwnedWriteHalf,
        mut buf: BytesMut,
        keep_alive: u16,
    ) {
        let (tx, rx) = mpsc::channel::<Pending>(self.shared.config.max_inflight.max(1));
        let (closed_tx, mut closed) = watch::channel(false);
        let writer = tokio::spawn(writer(self.version, wr, rx, closed_tx));
        if tx.send(Pending::Now(Outgoing::ConnAck(Ok(())))).await.is_err() {
            return;
        }
        tracing::debug!(target: "adapter::mqtt", device = %self.device.id, client = %self.client_id, "Client connected.");
        // MQTT: the server may close a connection silent for 1.5 x the keep-alive.
        let idle = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let max = self.shared.config.max_packet_bytes;
        'conn: loop {
            let read = async {
                match idle {
                    Some(t) => tokio::time::timeout(t, rd.read_buf(&mut buf)).await.unwrap_or(Ok(0)),
                    None => rd.read_buf(&mut buf).await,
                }
            };
            let n = tokio::select! {
                r = read => r.unwrap_or(0),
                _ = closed.changed() => 0,
            };
            if n == 0 {
                break;
            }
            let mut batch: Vec<Accepted> = Vec::new();
            loop {
                let pkt = match self.version.read(&mut buf, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        count("malformed");
                        tracing::debug!(target: "adapter::mqtt", device = %self.device.id, error = %e, "Malformed packet; closing.");
                        self.submit(std::mem::take(&mut batch), &tx).await;
                        break 'conn;
                    }
                };
                match pkt {
                    Incoming::Publish { qos, dup: _, retain: _, topic, pkid, payload, user_properties } => {
                        if qos == 2 && self.qos2.contains(&pkid) {
                            // A resend before PUBREL: already committed once.
                            let _ = tx.send(Pending::Now(Outgoing::PubRec(pkid, None))).await;
                            continue;
                        }
                        match self.check(&topic, payload, user_properties) {
                            Ok(content) => batch.push(Accepted { content, qos, pkid, topic }),
                            Err(r) => {
                                kalima_core::ingest::count_rejection(INTERFACE, &r);
                                self.report(&topic, &r);
                                let why = Some(refusal_of(&r));
                                let ack = match qos {
                                    1 => Some(Outgoing::PubAck(pkid, why)),
                                    2 => Some(Outgoing::PubRec(pkid, why)),
                                    _ => None,
                                };
                                if let Some(a) = ack
                                    && tx.send(Pending::Now(a)).await.is_err()
                                {
                                    break 'conn;
                                }
                            }
                        }
                    }
                    Incoming::PubRel(pkid) => {
                        self.qos2.remove(&pkid);
                        let _ = tx.send(Pending::Now(Outgoing::PubComp(pkid))).await;
                    }
                    Incoming::Subscribe { pkid, filters } => {
                        let codes = self.subscribe(&filters, &tx);
                        let _ = tx.send(Pending::Now(Outgoing::SubAck(pkid, codes))).await;
                    }
                    Incoming::Unsubscribe { pkid, filters } => {
                        self.subs.lock().retain(|(f, _)| !filters.contains(f));
                        let _ = tx.send(Pending::Now(Outgoing::UnsubAck(pkid, filters.len()))).await;
                    }
                    Incoming::PingReq => {
                        let _ = tx.send(Pending::Now(Outgoing::PingResp)).await;
                    }
                    Incoming::PubAck(_) | Incoming::PubRec(_) | Incoming::PubComp(_) => {}
                    Incoming::Disconnect => {
                        self.submit(std::mem::take(&mut batch), &tx).await;
                        break 'conn;
                    }
                    Incoming::Connect { .. } | Incoming::ServerOnly(_) => {
                        count("protocol_error");
                        self.submit(std::mem::take(&mut batch), &tx).await;
                        break 'conn;
                    }
                }
            }
            self.submit(batch, &tx).await;
        }
        // Let every pending acknowledgement go out, then close.
        drop(tx);
        let _ = writer.await;
        for t in &self.tasks {
            t.abort();
        }
        tracing::debug!(target: "adapter::mqtt", device = %self.device.id, client = %self.client_id, "Client disconnected.");
    }

    /// Turns a put into a transaction and runs the per-transaction checks.
    fn check(
        &self,
        topic: &str,
        payload: Bytes,
        user_properties: Vec<(String, String)>,
    ) -> Result<TxContent, Rejection> {
        let (address, key) = topic::parse_put(topic).map_err(Rejection::Malformed)?;
        let mut content = TxContent {
            device_id: self.device.id.clone(),
            address,
            key,
            body: payload.to_vec(),
            ..TxContent::default()
        };
        for (k, v) in user_properties {
            // One property makes retries exactly-once on the chain; the rest become props.
            if k == "idempotency_key" {
                content.idempotency_key = v;
            } else {
                content.props.insert(k, v);
            }
        }
        self.shared.ingest.check(&self.device, &content)?;
        Ok(content)
    }

    /// Publishes a refusal on `kalima/errors/<device>`.
    fn report(&self, topic: &str, r: &Rejection) {
        let msg = serde_json::json!({ "topic": topic, "code": r.code(), "message": r.to_string() });
        let _ = self.shared.errors.send((self.device.id.clone(), Bytes::from(msg.to_string())));
    }

    /// Commits `batch` in the background; its acknowledgements are queued now, in order.
    async fn submit(&mut self, batch: Vec<Accepted>, tx: &mpsc::Sender<Pending>) {
        if batch.is_empty() {
            return;
        }
        let mut acks = Vec::new();
        for a in &batch {
            if a.qos == 0 {
                continue;
            }
            if a.qos == 2 {
                self.qos2.insert(a.pkid);
            }
            let (s, r) = oneshot::channel();
            acks.push((a.qos, a.pkid, a.topic.clone(), s));
            if tx.send(Pending::Later(r)).await.is_err() {
                return;
            }
        }
        let ingest = self.shared.ingest.clone();
        let device = self.device.clone();
        let version = self.version;
        let errors = self.shared.errors.clone();
        let items: Vec<TxContent> = batch.into_iter().map(|a| a.content).collect();
        tokio::spawn(async move {
            let n = items.len();
            let res = ingest.write(INTERFACE, &device, items).await;
            let refusal = match &res {
                Ok(_) => None,
                Err(CoreError::Rejected(r)) => Some((refusal_of(r), r.code(), r.to_string())),
                Err(e) => Some((Refusal::Unspecified, "commit_failed", e.to_string())),
            };
            if let Some((_, code, msg)) = &refusal {
                tracing::debug!(target: "adapter::mqtt", device = %device.id, messages = n, error = %msg, "Batch not committed.");
                let m = serde_json::json!({ "code": code, "message": msg, "messages": n });
                let _ = errors.send((device.id.clone(), Bytes::from(m.to_string())));
            }
            for (qos, pkid, _topic, s) in acks {
                let out = match (&refusal, version) {
                    (None, _) => {
                        Some(if qos == 1 { Outgoing::PubAck(pkid, None) } else { Outgoing::PubRec(pkid, None) })
                    }
                    (Some((why, _, _)), Version::V5) => Some(if qos == 1 {
                        Outgoing::PubAck(pkid, Some(*why))
                    } else {
                        Outgoing::PubRec(pkid, Some(*why))
                    }),
                    // MQTT 3.1.1 cannot refuse a publish: close, so the client resends later.
                    (Some(_), Version::V4) => None,
                };
                let _ = s.send(out);
            }
        });
    }

    /// Grants what the device may follow; starts delivering on the first grant.
    fn subscribe(&mut self, filters: &[(String, u8)], tx: &mpsc::Sender<Pending>) -> Vec<Option<u8>> {
        let mut codes = Vec::new();
        for (f, qos) in filters {
            match topic::classify(f, &self.device.id) {
                Some(FilterKind::Out) => {
                    let granted = (*qos).min(1);
                    let first = self.subs.lock().is_empty();
                    self.subs.lock().push((f.clone(), granted));
                    if first {
                        self.tasks.push(tokio::spawn(deliver(
                            self.shared.clone(),
                            self.device.id.clone(),
                            self.subs.clone(),
                            tx.clone(),
                        )));
                    }
                    codes.push(Some(granted));
                }
                Some(FilterKind::Errors) => {
                    let mut rx = self.shared.errors.subscribe();
                    let (me, tx, t) = (self.device.id.clone(), tx.clone(), f.clone());
                    self.tasks.push(tokio::spawn(async move {
                        while let Ok((dev, payload)) = rx.recv().await {
                            if dev == me
                                && tx
                                    .try_send(Pending::Now(Outgoing::Publish {
                                        topic: t.clone(),
                                        payload,
                                        qos: 0,
                                        pkid: 0,
                                    }))
                                    .is_err()
                            {
                                return;
                            }
                        }
                    }));
                    codes.push(Some(0));
                }
                None => {
                    count("subscribe_refused");
                    codes.push(None);
                }
            }
        }
        codes
    }
}

/// Sends committed data matching the connection's filters, as far as its read grants allow.
async fn deliver(
    shared: Arc<Shared>,
    device_id: String,
    subs: Arc<Mutex<Vec<(String, u8)>>>,
    tx: mpsc::Sender<Pending>,
) {
    let mut sub = shared.ingest.chain().bus().subscribe();
    let mut pkid: u16 = 0;
    while let Ok(batch) = sub.next().await {
        // Grants are read per batch, so a revoked grant stops deliveries at once.
        let Some(device) = shared.ingest.chain().registry().get(&device_id).filter(|d| !d.record.revoked) else {
            return;
        };
        for c in batch.iter() {
            let content = &c.tx.content;
            if content.body.is_empty() || !device.can_read(&content.address) {
                continue;
            }
            let t = topic::out_topic(&content.address, &content.key);
            let qos = subs.lock().iter().filter(|(f, _)| topic::matches(f, &t)).map(|(_, q)| *q).max();
            let Some(qos) = qos else { continue };
            if qos == 1 {
                pkid = pkid.checked_add(1).unwrap_or(1);
            }
            let p = Outgoing::Publish {
                topic: t,
                payload: Bytes::from(content.body.clone()),
                qos,
                pkid: if qos == 1 { pkid } else { 0 },
            };
            if tx.try_send(Pending::Now(p)).is_err() {
                // A subscriber that cannot keep up is dropped rather than slowing anyone else.
                metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => "slow_client").increment(1);
                return;
            }
        }
    }
}

/// Writes packets in queue order; a pending acknowledgement holds back what follows it.
async fn writer(
    version: Version,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Pending>,
    closed: watch::Sender<bool>,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(p) = next.take() {
            let pkt = match p {
                Pending::Now(p) => Some(p),
                Pending::Later(r) => {
                    if !out.is_empty() && wr.write_all(&out).await.is_err() {
                        break 'outer;
                    }
                    out.clear();
                    match r.await {
                        Ok(Some(p)) => Some(p),
                        // The commit failed and MQTT 3.1.1 cannot say so: close the connection.
                        Ok(None) => break 'outer,
                        Err(_) => None,
                    }
                }
            };
            if let Some(p) = pkt
                && version.write(&p, &mut out).is_err()
            {
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = wr.shutdown().await;
    let _ = closed.send(true);
}
