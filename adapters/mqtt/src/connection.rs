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
        Rejection::Invalid(f) if matches!(f.field, "address" | "key" | "topic") => Refusal::TopicNameInvalid,
        Rejection::Invalid(_) => Refusal::PayloadFormatInvalid,
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
    // A marketplace buyer: its subscription id and access token open one feed, read-only.
    if let Some(gate) = shared.feeds.clone()
        && user.len() == 64
        && let Some(feed) = gate.open(&user, &password)
    {
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= shared.config.max_connections {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            count("refused_busy");
            refuse(version, &mut wr, ConnRefusal::ServerBusy).await;
            return;
        }
        let buyer = crate::buyer::Buyer { gate, user, password, feed, version };
        buyer.run(shared.clone(), rd, wr, buf, keep_alive).await;
        shared.connections.fetch_sub(1, Ordering::SeqCst);
        return;
    }
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
        qos2: Arc::new(Mutex::new(HashSet::new())),
        delivery: None,
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
    /// QoS 2 packet ids committed and waiting for PUBREL.
    qos2: Arc<Mutex<HashSet<u16>>>,
    delivery: Option<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A put that passed the per-message checks, with the slot its acknowledgement goes into.
struct Job {
    /// Moved into the chain's queue; `payload` and `user_properties` rebuild it for a retry.
    content: TxContent,
    payload: Bytes,
    user_properties: Vec<(String, String)>,
    qos: u8,
    pkid: u16,
    topic: String,
    ack: Option<oneshot::Sender<Option<Outgoing>>>,
}

/// The transaction a put on `topic` makes (MQTT 5 user properties become props).
fn content_of(
    device_id: &str,
    topic: &str,
    payload: &[u8],
    user_properties: Vec<(String, String)>,
) -> Result<TxContent, Rejection> {
    let (address, key) =
        topic::parse_put(topic).map_err(|m| Rejection::Invalid(kalima_core::tx::FieldError::new("topic", m)))?;
    let mut content =
        TxContent { device_id: device_id.to_string(), address, key, body: payload.to_vec(), ..TxContent::default() };
    for (k, v) in user_properties {
        // One property makes retries exactly-once on the chain; the rest become props.
        if k == "idempotency_key" {
            content.idempotency_key = v;
        } else {
            content.props.insert(k, v);
        }
    }
    Ok(content)
}

/// Closes the connection from any task (a slow subscriber, a failed write).
type Closer = Arc<watch::Sender<bool>>;

impl Conn {
    async fn run(
        mut self,
        mut rd: tokio::net::tcp::OwnedReadHalf,
        wr: OwnedWriteHalf,
        mut buf: BytesMut,
        keep_alive: u16,
    ) {
        let (tx, rx) = mpsc::channel::<Pending>(self.shared.config.max_inflight.max(1));
        let closer: Closer = Arc::new(watch::channel(false).0);
        let mut closed = closer.subscribe();
        let writer = tokio::spawn(writer(self.version, wr, rx, closer.clone()));
        // One committer per connection: puts reach the chain in the order they were sent.
        let (jobs, jobs_rx) = mpsc::channel::<Vec<Job>>(64);
        let committer = tokio::spawn(commit_loop(
            self.shared.clone(),
            self.device.id.clone(),
            self.version,
            self.qos2.clone(),
            jobs_rx,
        ));
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
            // Grants and revocations apply from the next packet, not the next login.
            if let Some(d) = self.shared.ingest.registry().get(&self.device.id) {
                self.device = d;
            }
            let mut batch: Vec<Job> = Vec::new();
            loop {
                let pkt = match self.version.read(&mut buf, max) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        count("malformed");
                        tracing::debug!(target: "adapter::mqtt", device = %self.device.id, error = %e, "Malformed packet; closing.");
                        let _ = jobs.send(std::mem::take(&mut batch)).await;
                        break 'conn;
                    }
                };
                match pkt {
                    Incoming::Publish { qos, dup: _, retain: _, topic, pkid, payload, user_properties } => {
                        if qos == 2 && self.qos2.lock().contains(&pkid) {
                            // A resend before PUBREL: already committed once.
                            if tx.send(Pending::Now(Outgoing::PubRec(pkid, None))).await.is_err() {
                                break 'conn;
                            }
                            continue;
                        }
                        // The acknowledgement's place in the queue is taken now, in arrival order.
                        let ack = if qos > 0 {
                            let (s, r) = oneshot::channel();
                            if tx.send(Pending::Later(r)).await.is_err() {
                                break 'conn;
                            }
                            Some(s)
                        } else {
                            None
                        };
                        match self.check(&topic, &payload, user_properties.clone(), &batch) {
                            Ok(content) => batch.push(Job { content, payload, user_properties, qos, pkid, topic, ack }),
                            Err(r) => {
                                kalima_core::ingest::count_rejection(INTERFACE, &r);
                                report(&self.shared, &self.device.id, &[topic.as_str()], &r);
                                if let Some(s) = ack {
                                    let _ = s.send(Some(ack_for(qos, pkid, Some(refusal_of(&r)))));
                                }
                            }
                        }
                    }
                    Incoming::PubRel(pkid) => {
                        self.qos2.lock().remove(&pkid);
                        let _ = tx.send(Pending::Now(Outgoing::PubComp(pkid))).await;
                    }
                    Incoming::Subscribe { pkid, filters } => {
                        let codes = self.subscribe(&filters, &tx, &closer);
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
                        let _ = jobs.send(std::mem::take(&mut batch)).await;
                        break 'conn;
                    }
                    Incoming::Connect { .. } | Incoming::ServerOnly(_) => {
                        count("protocol_error");
                        let _ = jobs.send(std::mem::take(&mut batch)).await;
                        break 'conn;
                    }
                }
            }
            if !batch.is_empty() && jobs.send(batch).await.is_err() {
                break;
            }
        }
        // Let the committer finish what was sent and every acknowledgement go out, then close.
        drop(jobs);
        let _ = committer.await;
        drop(tx);
        let _ = writer.await;
        if let Some(d) = &self.delivery {
            d.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
        tracing::debug!(target: "adapter::mqtt", device = %self.device.id, client = %self.client_id, "Client disconnected.");
    }

    /// Turns a put into a transaction and runs the per-transaction checks (including
    /// idempotency keys repeated within the same burst).
    fn check(
        &self,
        topic: &str,
        payload: &[u8],
        user_properties: Vec<(String, String)>,
        batch: &[Job],
    ) -> Result<TxContent, Rejection> {
        let content = content_of(&self.device.id, topic, payload, user_properties)?;
        self.shared.ingest.check(&self.device, &content)?;
        if !content.idempotency_key.is_empty()
            && batch.iter().any(|j| j.content.idempotency_key == content.idempotency_key)
        {
            return Err(Rejection::DuplicateIdempotencyKey {
                key: content.idempotency_key.clone(),
                existing: "earlier in the same burst".into(),
            });
        }
        Ok(content)
    }

    /// Grants what the device may follow; deliveries start with the first grant.
    fn subscribe(&mut self, filters: &[(String, u8)], tx: &mpsc::Sender<Pending>, closer: &Closer) -> Vec<Option<u8>> {
        let mut codes = Vec::new();
        for (f, qos) in filters {
            match topic::classify(f, &self.device.id) {
                Some(FilterKind::Out) => {
                    let granted = (*qos).min(1);
                    self.subs.lock().push((f.clone(), granted));
                    if self.delivery.is_none() {
                        // Subscribed to the bus before SUBACK goes out, so no commit after it is missed.
                        let sub = self.shared.ingest.bus().subscribe();
                        self.delivery = Some(tokio::spawn(deliver(
                            self.shared.clone(),
                            self.device.id.clone(),
                            self.subs.clone(),
                            sub,
                            tx.clone(),
                            closer.clone(),
                        )));
                    }
                    codes.push(Some(granted));
                }
                Some(FilterKind::Errors) => {
                    let mut rx = self.shared.errors.subscribe();
                    let (me, tx, t, closer) = (self.device.id.clone(), tx.clone(), f.clone(), closer.clone());
                    self.tasks.push(tokio::spawn(async move {
                        loop {
                            match rx.recv().await {
                                Ok((dev, payload)) if dev == me => {
                                    let p = Outgoing::Publish { topic: t.clone(), payload, qos: 0, pkid: 0 };
                                    if tx.try_send(Pending::Now(p)).is_err() {
                                        slow(&closer);
                                        return;
                                    }
                                }
                                Ok(_) => {}
                                // Reports of other devices flooding the channel must not end ours.
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => count("errors_lagged"),
                                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
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

fn ack_for(qos: u8, pkid: u16, why: Option<Refusal>) -> Outgoing {
    if qos == 2 { Outgoing::PubRec(pkid, why) } else { Outgoing::PubAck(pkid, why) }
}

/// Publishes a refusal on `kalima/errors/<device>`.
fn report(shared: &Shared, device: &str, topics: &[&str], r: &Rejection) {
    let msg = serde_json::json!({
        "topic": topics.first().copied().unwrap_or_default(),
        "topics": topics,
        "code": r.code(),
        "message": r.to_string(),
    });
    let _ = shared.errors.send((device.to_string(), Bytes::from(msg.to_string())));
}

/// A subscriber that cannot keep up is disconnected (so it can reconnect) and counted.
fn slow(closer: &Closer) {
    metrics::counter!("kalima_bus_subscribers_dropped_total", "reason" => "slow_client").increment(1);
    let _ = closer.send(true);
}

/// Commits the connection's puts in order, merging bursts that queued meanwhile. Bursts are
/// enqueued on the chain one after another without waiting for each commit (order is kept
/// by the sequencer's queue); a separate task awaits the commits in the same order and fills
/// the acknowledgements. A burst the chain refuses as a whole is retried put by put, so one
/// bad put does not sink the others.
async fn commit_loop(
    shared: Arc<Shared>,
    device_id: String,
    version: Version,
    qos2: Arc<Mutex<HashSet<u16>>>,
    mut rx: mpsc::Receiver<Vec<Job>>,
) {
    type Receipts =
        std::pin::Pin<Box<dyn std::future::Future<Output = kalima_core::Result<kalima_core::ingest::Written>> + Send>>;
    let (inflight, mut done) = mpsc::channel::<(Vec<Job>, Result<Receipts, CoreError>)>(256);
    let acker = {
        let (shared, device_id, qos2) = (shared.clone(), device_id.clone(), qos2.clone());
        tokio::spawn(async move {
            while let Some((jobs, pending)) = done.recv().await {
                let res = match pending {
                    Ok(fut) => fut.await.map(|_| ()),
                    Err(e) => Err(e),
                };
                settle(&shared, &device_id, version, &qos2, jobs, res).await;
            }
        })
    };
    while let Some(mut jobs) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            jobs.extend(more);
        }
        if jobs.is_empty() {
            continue;
        }
        let Some(device) = shared.ingest.registry().get(&device_id) else { continue };
        let items: Vec<TxContent> = jobs.iter_mut().map(|j| std::mem::take(&mut j.content)).collect();
        let pending = shared.ingest.write_pipelined(INTERFACE, &device, items).await.map(|f| Box::pin(f) as Receipts);
        if inflight.send((jobs, pending)).await.is_err() {
            break;
        }
    }
    drop(inflight);
    let _ = acker.await;
}

/// Acknowledges a burst after its commit; a burst refused as a whole is retried put by put.
async fn settle(
    shared: &Shared,
    device_id: &str,
    version: Version,
    qos2: &Mutex<HashSet<u16>>,
    jobs: Vec<Job>,
    res: Result<(), CoreError>,
) {
    match res {
        Ok(()) => finish(jobs, None, version, qos2),
        Err(CoreError::Rejected(_)) if jobs.len() > 1 => {
            let Some(device) = shared.ingest.registry().get(device_id) else { return };
            for job in jobs {
                let res = match content_of(device_id, &job.topic, &job.payload, job.user_properties.clone()) {
                    Ok(content) => shared.ingest.write(INTERFACE, &device, vec![content]).await,
                    Err(r) => Err(CoreError::Rejected(r)),
                };
                let why = failure(shared, device_id, &[job.topic.as_str()], res.err());
                finish(vec![job], why, version, qos2);
            }
        }
        Err(e) => {
            let topics: Vec<&str> = jobs.iter().map(|j| j.topic.as_str()).collect();
            let why = failure(shared, device_id, &topics, Some(e));
            finish(jobs, why, version, qos2);
        }
    }
}

/// Reports a failed commit; the MQTT 5 reason code to answer with.
fn failure(shared: &Shared, device: &str, topics: &[&str], e: Option<CoreError>) -> Option<Refusal> {
    let e = e?;
    let (why, r) = match e {
        CoreError::Rejected(r) => (refusal_of(&r), r),
        other => (Refusal::Unspecified, Rejection::Malformed(format!("not committed: {other}"))),
    };
    tracing::debug!(target: "adapter::mqtt", device = %device, messages = topics.len(), error = %r, "Puts not committed.");
    report(shared, device, topics, &r);
    Some(why)
}

/// Fills the acknowledgement slots of `jobs`.
fn finish(jobs: Vec<Job>, why: Option<Refusal>, version: Version, qos2: &Mutex<HashSet<u16>>) {
    for j in jobs {
        if why.is_none() && j.qos == 2 {
            qos2.lock().insert(j.pkid);
        }
        let out = match (why, version) {
            (None, _) => Some(ack_for(j.qos, j.pkid, None)),
            (Some(w), Version::V5) => Some(ack_for(j.qos, j.pkid, Some(w))),
            // MQTT 3.1.1 cannot refuse a publish: close, so the client resends later.
            (Some(_), Version::V4) => None,
        };
        if let Some(s) = j.ack {
            let _ = s.send(out);
        }
    }
}

/// Sends committed data matching the connection's filters, as far as its read grants allow.
async fn deliver(
    shared: Arc<Shared>,
    device_id: String,
    subs: Arc<Mutex<Vec<(String, u8)>>>,
    mut sub: kalima_core::bus::Subscription,
    tx: mpsc::Sender<Pending>,
    closer: Closer,
) {
    let mut pkid: u16 = 0;
    loop {
        let Ok(batch) = sub.next().await else {
            slow(&closer);
            return;
        };
        // Grants are read per batch, so a revoked grant stops deliveries at once.
        let Some(device) = shared.ingest.registry().get(&device_id).filter(|d| !d.record.revoked) else {
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
                slow(&closer);
                return;
            }
        }
    }
}

/// Bytes the writer gathers before writing them even while more packets are ready.
const FLUSH_BYTES: usize = 64 * 1024;

/// Writes packets in queue order; a pending acknowledgement holds back what follows it.
async fn writer(version: Version, mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Pending>, closed: Closer) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(p) = next.take() {
            let pkt = match p {
                Pending::Now(p) => Some(p),
                Pending::Later(mut r) => {
                    // Acknowledgements of one commit are ready together: they leave in one
                    // segment, and the socket is written only before waiting for the next commit.
                    let ready = match r.try_recv() {
                        Err(oneshot::error::TryRecvError::Empty) => {
                            if !out.is_empty() && wr.write_all(&out).await.is_err() {
                                break 'outer;
                            }
                            out.clear();
                            r.await.ok()
                        }
                        other => other.ok(),
                    };
                    match ready {
                        Some(Some(p)) => Some(p),
                        // The commit failed and MQTT 3.1.1 cannot say so: close the connection.
                        Some(None) => break 'outer,
                        None => None,
                    }
                }
            };
            if let Some(p) = pkt
                && version.write(&p, &mut out).is_err()
            {
                break 'outer;
            }
            if out.len() >= FLUSH_BYTES {
                if wr.write_all(&out).await.is_err() {
                    break 'outer;
                }
                out.clear();
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
