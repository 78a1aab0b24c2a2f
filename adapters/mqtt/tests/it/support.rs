//! Shared harness: a chain on a fresh SQLite file with devices and grants, the MQTT server in
//! front of its ingest, an independent MQTT client (paho-mqtt, `tests/peers/client.py` and
//! `publish.py`) driven over JSON lines, a raw TCP client that writes hand-encoded MQTT bytes
//! (for what no well-behaved client sends), and polling helpers that wait for behaviour
//! rather than for fixed times.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kalima_adapter_mqtt::{MqttSection, MqttServer};
use kalima_core::CommittedTx;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, Command};

/// How long any awaited behaviour may take before the test fails; generous, since the machine
/// may be busy building other crates. Tests never assert that something is fast.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`; panics after [`PATIENCE`] with `what` and `describe`.
pub(crate) async fn wait_for<T>(what: &str, check: impl FnMut() -> Option<T>, describe: impl Fn() -> String) -> T {
    kalima_core::testing::wait_for(PATIENCE, what, check, describe).await
}

/// How long a test watches for something that must NOT happen, when no later event can
/// mark the end of the window.
pub(crate) const QUIET: Duration = Duration::from_millis(700);

const INSTALL_HINT: &str = "run scripts/peers/install from the workspace root";

/// MQTT 5 reason codes the tests look for (paho reports MQTT 3.1.1 CONNACK codes mapped to these).
pub(crate) mod rc {
    pub(crate) const SUCCESS: i64 = 0x00;
    pub(crate) const BAD_USER_NAME_OR_PASSWORD: i64 = 0x86;
    pub(crate) const NOT_AUTHORIZED: i64 = 0x87;
    pub(crate) const TOPIC_NAME_INVALID: i64 = 0x90;
    pub(crate) const QUOTA_EXCEEDED: i64 = 0x97;
}

// ----------------------------------------------------------------------------------------
// Waiting.

// ----------------------------------------------------------------------------------------
// Protocol versions.

/// The MQTT version a test case speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum V {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

/// Both versions, for table-driven tests.
pub(crate) const VERSIONS: [V; 2] = [V::V311, V::V5];

impl V {
    fn peer_arg(self) -> &'static str {
        match self {
            V::V311 => "3.1.1",
            V::V5 => "5",
        }
    }

    fn level(self) -> u8 {
        match self {
            V::V311 => 4,
            V::V5 => 5,
        }
    }

    /// SUBACK code of a refused filter, as paho reports it.
    pub(crate) fn suback_refused(self) -> i64 {
        match self {
            V::V311 => 0x80,
            V::V5 => rc::NOT_AUTHORIZED,
        }
    }
}

// ----------------------------------------------------------------------------------------
// The chain.

/// Chain name used by every test.
pub(crate) const CHAIN: &str = "kalima-mqtt-it";

/// A chain on a fresh SQLite file, with its ingest (shared harness plus this crate's helpers).
pub(crate) struct Node(kalima_core::testing::TestChain);

impl std::ops::Deref for Node {
    type Target = kalima_core::testing::TestChain;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Node {
    /// Genesis registers the admin device, as `kalima init` does.
    pub(crate) async fn start() -> Node {
        Node(kalima_core::testing::TestChain::start(CHAIN).await)
    }

    /// The bodies of every stored transaction of `address`/`key`, oldest first.
    pub(crate) async fn bodies(&self, address: &str, key: &str) -> Vec<Vec<u8>> {
        self.history(address, key).await.into_iter().map(|c| c.tx.content.body).collect()
    }

    /// Every stored transaction under `address` (any key), as `key=body` lines, for messages.
    pub(crate) fn describe_address(&self, address: &str) -> String {
        let mut s = String::new();
        for c in self.chain.memcache().values(address) {
            let _ = writeln!(s, "{}={}", c.tx.content.key, String::from_utf8_lossy(&c.tx.content.body));
        }
        if s.is_empty() { format!("(nothing at {address})") } else { s }
    }

    /// Asserts the whole stored chain verifies (hashes, links, Merkle roots).
    pub(crate) async fn assert_verifies(&self) {
        let report = kalima_core::verify::verify_chain(self.chain.store(), CHAIN, |_| {})
            .await
            .unwrap_or_else(|e| panic!("the stored chain does not verify: {e:#}"));
        assert!(report.transactions > 0, "verification checked no transaction: {report:?}");
    }

    /// Every stored transaction of `address`/`key`, oldest first.
    pub(crate) async fn history(&self, address: &str, key: &str) -> Vec<CommittedTx> {
        let mut all = Vec::new();
        let mut before = i64::MAX as u64;
        loop {
            let page = self.chain.store().history(address, key, before, 1000).await.expect("history");
            let Some(last) = page.last() else { break };
            before = last.tx.global_sequence;
            all.extend(page);
        }
        all.reverse();
        all
    }
}

pub(crate) use kalima_core::testing::token;

// ----------------------------------------------------------------------------------------
// The server under test.

/// A chain with the MQTT server in front of it.
pub(crate) struct Setup {
    pub(crate) node: Node,
    pub(crate) server: MqttServer,
}

impl Setup {
    /// The default `[mqtt]` section on a free loopback port.
    pub(crate) async fn start() -> Setup {
        Self::start_with(MqttSection { listen: "127.0.0.1:0".into(), ..Default::default() }).await
    }

    /// `section` (its listen address should be `127.0.0.1:0`).
    pub(crate) async fn start_with(section: MqttSection) -> Setup {
        assert!(section.validate().is_empty(), "test section does not validate: {:?}", section.validate());
        let node = Node::start().await;
        let server = MqttServer::start(&section, node.ingest.clone()).await.expect("start the MQTT server");
        Setup { node, server }
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// A paho client logged in as `device` with its token; panics unless CONNACK is a success.
    pub(crate) async fn client(&self, v: V, device: &str) -> PyClient {
        let c = PyClient::start(self.addr(), v, Some((device, &token(device))), device).await;
        let code = c.connack();
        assert_eq!(code, Some(rc::SUCCESS), "{device} ({v:?}) could not log in:\n{}", c.describe());
        c
    }
}

// ----------------------------------------------------------------------------------------
// Peers.

/// The Python of the peers' virtualenv; fails (never skips) when it is not installed.
pub(crate) fn peers_python() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(v) = std::env::var_os("KALIMA_PEERS_VENV").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(v));
    } else {
        if let Some(d) = std::env::var_os("KALIMA_PEERS_DIR").filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(d).join("venv"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(h).join(".cache/kalima-peers/venv"));
        }
    }
    let tried: Vec<PathBuf> = candidates.iter().map(|v| v.join("bin/python")).collect();
    tried.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "the MQTT client peer needs the peers' Python virtualenv with paho-mqtt, not found at {tried:?}: \
             {INSTALL_HINT} (or point KALIMA_PEERS_VENV at the venv)"
        )
    })
}

fn peer_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers").join(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex from the peer")).collect()
}

/// A message a subscriber received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) qos: i64,
}

/// A running `client.py` (paho); killed on drop. Everything it reports is kept as events.
pub(crate) struct PyClient {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    name: String,
    next_tag: u64,
}

impl PyClient {
    /// Starts a client that connects at once with `login`, and waits for the outcome
    /// (CONNACK, or the connection ending).
    pub(crate) async fn start(addr: SocketAddr, v: V, login: Option<(&str, &str)>, name: &str) -> PyClient {
        let mut args = json!({
            "host": addr.ip().to_string(),
            "port": addr.port(),
            "version": v.peer_arg(),
            "client_id": format!("{name}-{}", std::process::id()),
        });
        if let Some((u, p)) = login {
            args["username"] = u.into();
            args["password"] = p.into();
        }
        let python = peers_python();
        let mut child = Command::new(&python)
            .arg(peer_script("client.py"))
            .arg(args.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ev, out) = (events.clone(), child.stdout.take().expect("piped stdout"));
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => ev.lock().push(v),
                    Err(_) => ev.lock().push(json!({ "event": "noise", "line": line })),
                }
            }
            ev.lock().push(json!({ "event": "exited" }));
        });
        let (err, pipe) = (stderr.clone(), child.stderr.take().expect("piped stderr"));
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = err.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        let c = PyClient { child, stdin, events, stderr, name: name.to_string(), next_tag: 0 };
        c.wait_event("the outcome of CONNECT", |e| {
            matches!(e["event"].as_str(), Some("connack" | "disconnect" | "connect_error" | "exited"))
        })
        .await;
        if c.stderr.lock().contains("No module named") {
            panic!("the peers' venv lacks paho-mqtt ({}): {INSTALL_HINT}", c.stderr.lock().trim());
        }
        c
    }

    /// The CONNACK reason code, if one arrived.
    pub(crate) fn connack(&self) -> Option<i64> {
        self.find(|e| e["event"] == "connack").and_then(|e| e["reason_code"].as_i64())
    }

    /// Every event so far and the peer's stderr, for failure messages.
    pub(crate) fn describe(&self) -> String {
        let events: Vec<String> = self.events.lock().iter().map(Value::to_string).collect();
        let tail = events.len().saturating_sub(60);
        format!(
            "[{}] events ({} in all, last 60):\n  {}\n[{}] stderr:\n{}",
            self.name,
            events.len(),
            events[tail..].join("\n  "),
            self.name,
            self.stderr.lock()
        )
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.events.lock().iter().find(|e| pred(e)).cloned()
    }

    /// Waits for the first event matching `pred`.
    pub(crate) async fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("[{}] {what}", self.name), || self.find(&pred), || self.describe()).await
    }

    async fn command(&mut self, mut cmd: Value) -> u64 {
        self.next_tag += 1;
        cmd["tag"] = self.next_tag.into();
        let line = format!("{cmd}\n");
        let stdin = self.stdin.as_mut().expect("the client's stdin is open");
        if let Err(e) = stdin.write_all(line.as_bytes()).await {
            panic!("[{}] cannot send {cmd}: {e}\n{}", self.name, self.describe());
        }
        let _ = stdin.flush().await;
        self.next_tag
    }

    /// Publishes and returns paho's message id (without waiting for any acknowledgement).
    pub(crate) async fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, props: &[(&str, &str)]) -> i64 {
        let props: Vec<[&str; 2]> = props.iter().map(|(k, v)| [*k, *v]).collect();
        let tag = self
            .command(
                json!({ "cmd": "publish", "topic": topic, "payload_hex": hex(payload), "qos": qos, "props": props }),
            )
            .await;
        let e = self.wait_event("the publish to be queued", |e| e["event"] == "published" && e["tag"] == tag).await;
        assert_eq!(e["rc"], 0, "[{}] paho could not queue the publish to {topic}:\n{}", self.name, self.describe());
        e["mid"].as_i64().expect("mid")
    }

    /// The reason code of the PUBACK (PUBCOMP for QoS 2) of `mid`, once it arrives.
    pub(crate) async fn ack(&self, mid: i64) -> i64 {
        let e = self
            .wait_event(&format!("the acknowledgement of message {mid}"), |e| e["event"] == "ack" && e["mid"] == mid)
            .await;
        e["reason_code"].as_i64().expect("reason code")
    }

    /// The acknowledgement of `mid` if it arrived, without waiting.
    pub(crate) fn ack_now(&self, mid: i64) -> Option<i64> {
        self.find(|e| e["event"] == "ack" && e["mid"] == mid).and_then(|e| e["reason_code"].as_i64())
    }

    /// Publishes with QoS 1 or 2 and returns the acknowledgement's reason code.
    pub(crate) async fn put(&mut self, topic: &str, payload: &[u8], qos: u8, props: &[(&str, &str)]) -> i64 {
        assert!(qos > 0, "put() waits for an acknowledgement: use publish() for QoS 0");
        let mid = self.publish(topic, payload, qos, props).await;
        self.ack(mid).await
    }

    /// Subscribes and returns the SUBACK codes.
    pub(crate) async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Vec<i64> {
        let filters: Vec<Value> = filters.iter().map(|(f, q)| json!([f, q])).collect();
        let tag = self.command(json!({ "cmd": "subscribe", "filters": filters })).await;
        let sent =
            self.wait_event("the subscribe to be sent", |e| e["event"] == "subscribe_sent" && e["tag"] == tag).await;
        let mid = sent["mid"].clone();
        let e = self.wait_event("SUBACK", |e| e["event"] == "suback" && e["mid"] == mid).await;
        e["codes"].as_array().expect("codes").iter().map(|c| c.as_i64().expect("code")).collect()
    }

    /// Unsubscribes and waits for UNSUBACK.
    pub(crate) async fn unsubscribe(&mut self, filters: &[&str]) {
        let tag = self.command(json!({ "cmd": "unsubscribe", "filters": filters })).await;
        let sent = self
            .wait_event("the unsubscribe to be sent", |e| e["event"] == "unsubscribe_sent" && e["tag"] == tag)
            .await;
        let mid = sent["mid"].clone();
        self.wait_event("UNSUBACK", |e| e["event"] == "unsuback" && e["mid"] == mid).await;
    }

    /// Every message received so far, in arrival order.
    pub(crate) fn messages(&self) -> Vec<Received> {
        self.events
            .lock()
            .iter()
            .filter(|e| e["event"] == "message")
            .map(|e| Received {
                topic: e["topic"].as_str().unwrap_or_default().to_string(),
                payload: unhex(e["payload_hex"].as_str().unwrap_or_default()),
                qos: e["qos"].as_i64().unwrap_or(-1),
            })
            .collect()
    }

    /// Waits until a message on `topic` arrived and returns it (the first one).
    pub(crate) async fn wait_message(&self, topic: &str) -> Received {
        wait_for(
            &format!("[{}] a message on {topic}", self.name),
            || self.messages().into_iter().find(|m| m.topic == topic),
            || self.describe(),
        )
        .await
    }

    /// Whether the server closed the connection (or the peer exited).
    pub(crate) fn disconnected(&self) -> bool {
        self.find(|e| matches!(e["event"].as_str(), Some("disconnect" | "exited"))).is_some()
    }

    /// Waits until the server closes the connection.
    pub(crate) async fn wait_disconnect(&self) {
        self.wait_event("the connection to close", |e| matches!(e["event"].as_str(), Some("disconnect" | "exited")))
            .await;
    }

    /// Disconnects cleanly and waits for the peer to exit.
    pub(crate) async fn close(mut self) {
        self.stdin.take();
        let _ = tokio::time::timeout(PATIENCE, self.child.wait()).await;
    }
}

/// Runs `publish.py` with `args` (see the script) and returns its JSON result.
pub(crate) async fn run_publisher(args: Value) -> Value {
    let python = peers_python();
    let out = tokio::time::timeout(
        PATIENCE * 4,
        Command::new(&python)
            .arg(peer_script("publish.py"))
            .arg(args.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("publish.py {args} did not finish within {:?}", PATIENCE * 4))
    .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named") {
        panic!("the peers' venv lacks paho-mqtt ({}): {INSTALL_HINT}", stderr.trim());
    }
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("publish.py {args} printed no JSON result ({e}); status {}:\n{stdout}\n{stderr}", out.status)
    })
}

// ----------------------------------------------------------------------------------------
// Hand-encoded MQTT, for what no well-behaved client sends.

/// MQTT packet types (upper nibble of the first byte).
pub(crate) mod kind {
    pub(crate) const CONNACK: u8 = 2;
    pub(crate) const PUBACK: u8 = 4;
    pub(crate) const PUBREC: u8 = 5;
    pub(crate) const PUBCOMP: u8 = 7;
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn str16(s: &[u8], out: &mut Vec<u8>) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend(s);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend(body);
    out
}

/// CONNECT with a clean session, 60 s keep-alive and an optional login.
pub(crate) fn connect(v: V, client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    str16(b"MQTT", &mut b);
    b.push(v.level());
    let mut flags = 0x02;
    if login.is_some() {
        flags |= 0x80 | 0x40;
    }
    b.push(flags);
    b.extend(60u16.to_be_bytes());
    if v == V::V5 {
        b.push(0); // no properties
    }
    str16(client_id.as_bytes(), &mut b);
    if let Some((u, p)) = login {
        str16(u.as_bytes(), &mut b);
        str16(p.as_bytes(), &mut b);
    }
    packet(0x10, &b)
}

/// PUBLISH; `props` are MQTT 5 user properties (ignored for 3.1.1).
pub(crate) fn publish(
    v: V,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    dup: bool,
    props: &[(&str, &str)],
) -> Vec<u8> {
    let mut b = Vec::new();
    str16(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend(pkid.to_be_bytes());
    }
    if v == V::V5 {
        let mut p = Vec::new();
        for (k, val) in props {
            p.push(0x26);
            str16(k.as_bytes(), &mut p);
            str16(val.as_bytes(), &mut p);
        }
        varint(p.len(), &mut b);
        b.extend(p);
    }
    b.extend(payload);
    packet(0x30 | (u8::from(dup) << 3) | (qos << 1), &b)
}

/// PUBREL.
pub(crate) fn pubrel(pkid: u16) -> Vec<u8> {
    packet(0x62, &pkid.to_be_bytes())
}

/// A packet the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packet {
    /// Packet type.
    pub(crate) kind: u8,
    /// Lower nibble of the first byte.
    pub(crate) flags: u8,
    /// Everything after the remaining length.
    pub(crate) body: Vec<u8>,
}

impl Packet {
    /// Packet id of PUBACK/PUBREC/PUBCOMP/SUBACK.
    pub(crate) fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// MQTT 5 reason code of PUBACK/PUBREC/PUBCOMP (absent means success); for CONNACK the
    /// return code of either version.
    pub(crate) fn reason(&self) -> u8 {
        match self.kind {
            kind::CONNACK => self.body.get(1).copied().unwrap_or(0xff),
            _ => self.body.get(2).copied().unwrap_or(0),
        }
    }
}

/// A raw TCP connection to the server.
pub(crate) struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Everything the server sent, decoded.
    pub(crate) seen: Vec<Packet>,
}

impl Raw {
    /// Connects (TCP only).
    pub(crate) async fn open(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        Raw { stream, buf: Vec::new(), seen: Vec::new() }
    }

    /// Connects and logs in as `device`; panics unless CONNACK accepts.
    pub(crate) async fn login(addr: SocketAddr, v: V, device: &str) -> Raw {
        let mut r = Raw::open(addr).await;
        r.send(&connect(v, &format!("raw-{device}"), Some((device, &token(device))))).await;
        let p = r.next().await.unwrap_or_else(|| panic!("no CONNACK for {device} ({v:?})"));
        assert_eq!((p.kind, p.reason()), (kind::CONNACK, 0), "login of {device} ({v:?}) refused: {p:?}");
        r
    }

    /// Writes bytes in one call; false when the server already closed the connection.
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Closes the writing half (the server reads end of file).
    pub(crate) async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// The next packet, or `None` when the connection ends; panics after [`PATIENCE`].
    pub(crate) async fn next(&mut self) -> Option<Packet> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(p) = self.parse() {
                self.seen.push(p.clone());
                return Some(p);
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend(&chunk[..n]),
                Err(_) => panic!("the server neither answered nor closed within {PATIENCE:?}; seen: {:?}", self.seen),
            }
        }
    }

    /// Reads until the server closes the connection; returns the packets that came before.
    pub(crate) async fn until_closed(&mut self) -> Vec<Packet> {
        let mut got = Vec::new();
        while let Some(p) = self.next().await {
            got.push(p);
        }
        got
    }

    /// Reads until the server closes the connection or `limit` passes: `Ok` with the packets
    /// that came before the close, `Err` with those seen while it stayed open.
    pub(crate) async fn until_closed_within(&mut self, limit: Duration) -> Result<Vec<Packet>, Vec<Packet>> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        loop {
            while let Some(p) = self.parse() {
                self.seen.push(p.clone());
                got.push(p);
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
                Ok(Ok(n)) => self.buf.extend(&chunk[..n]),
                Err(_) => return Err(got),
            }
        }
    }

    fn parse(&mut self) -> Option<Packet> {
        let first = *self.buf.first()?;
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
        loop {
            let b = *self.buf.get(i)?;
            len += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            assert!(i <= 4, "the server sent a remaining length over 4 bytes: {:?}", &self.buf[..i]);
        }
        if self.buf.len() < i + len {
            return None;
        }
        let body = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(Packet { kind: first >> 4, flags: first & 0x0f, body })
    }
}
