//! The MQTT front door of a real `kalima up`, driven by an independent MQTT client (paho-mqtt,
//! `adapters/mqtt/tests/peers/`):
//! - DESIGN.md invariant 1 for MQTT: pipelining QoS 1 publishers (MQTT 5 and 3.1.1) send a
//!   sustained stream of numbered messages, the node is killed with SIGKILL mid-stream several
//!   times and restarted on the same directory and port, and every message that got a
//!   successful PUBACK is on the chain afterwards (and `kalima verify` passes after each kill);
//! - the configuration: `[mqtt] listen` in use is a one-line error naming the key to change,
//!   an empty listen disables MQTT;
//! - MQTT and REST see the same data: a put over MQTT shows in REST, a REST put reaches an
//!   MQTT subscriber.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kalima_e2e::{Node, assert_verifies, describe, free_port, kalima_command, peers_python, stderr, workspace_root};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Kill/restart cycles of the durability test.
const ROUNDS: u64 = 3;
/// Load before each SIGKILL.
const LOAD: Duration = Duration::from_millis(2500);
/// Unacknowledged messages each publisher keeps in flight.
const WINDOW: u64 = 64;
/// How long anything may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

fn peer(name: &str) -> PathBuf {
    workspace_root().join("adapters/mqtt/tests/peers").join(name)
}

/// `POST /api/v1/devices` and a grant: returns the device's token.
async fn register(node: &Node, id: &str, prefix: &str) -> String {
    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": id })).await;
    assert_eq!(s, StatusCode::CREATED, "register {id}: {v}");
    let token = v["token"].as_str().expect("token").to_string();
    let (s, v) = node
        .post_json(&format!("/api/v1/devices/{id}/grants"), &json!({ "prefix": prefix, "read": true, "write": true }))
        .await;
    assert_eq!(s, StatusCode::OK, "grant {id} {prefix}: {v}");
    token
}

/// Every body of `address`/`key`, as message numbers, through `GET /api/v1/history` pages.
async fn history_numbers(node: &Node, address: &str, key: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut path = format!("/api/v1/history?address={address}&key={key}&limit=1000");
        if let Some(b) = before {
            path.push_str(&format!("&before={b}"));
        }
        let (s, v) = node.get_json(&path).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        for item in v["items"].as_array().expect("items") {
            let n = item["body"].as_u64().unwrap_or_else(|| panic!("body of {address} {key} is not a number: {item}"));
            out.push(n);
        }
        match v["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => break,
        }
    }
    out
}

/// One run of `publish.py` against the node's MQTT port, until the node dies.
struct Stream {
    version: &'static str,
    round: u64,
    child: tokio::process::Child,
}

impl Stream {
    fn topic_key(version: &str, round: u64) -> (String, String) {
        let v = if version == "5" { "v5" } else { "v311" };
        (format!("/e2e/mqtt/{v}"), format!("r{round}"))
    }

    fn start(port: u16, version: &'static str, round: u64, token: &str) -> Stream {
        let (address, key) = Self::topic_key(version, round);
        let args = json!({
            "host": "127.0.0.1",
            "port": port,
            "version": version,
            "username": "meter-1",
            "password": token,
            "client_id": format!("durability-{version}-{round}"),
            "topic": format!("kalima{address}/{key}"),
            "qos": 1,
            "payload": "{n}",
            "start": round * 1_000_000,
            "window": WINDOW,
            "timeout_s": 120,
        });
        let child = tokio::process::Command::new(peers_python())
            .arg(peer("publish.py"))
            .arg(args.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting publish.py: {e}; run scripts/peers/install"));
        Stream { version, round, child }
    }

    /// The publisher's result once the connection is gone.
    async fn result(self) -> Value {
        let out = tokio::time::timeout(PATIENCE, self.child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!("publish.py ({}, round {}) did not end after the kill", self.version, self.round)
            })
            .expect("publish.py output");
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("No module named"), "the peers' venv lacks paho-mqtt: run scripts/peers/install\n{err}");
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("publish.py printed no result ({e}):\n{text}\n{err}"))
    }
}

/// What one publisher of one round sent, got acknowledged, and what the chain holds.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    acked: Vec<u64>,
    refused: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_puback_means_durable_through_kill9() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let mqtt_port = free_port();
    let listen = format!("127.0.0.1:{mqtt_port}");
    let env = [("KALIMA_MQTT__LISTEN", listen.as_str())];
    let node = Node::start(&dir, &env).await;
    let token = register(&node, "meter-1", "/e2e").await;

    let mut tallies: BTreeMap<(&'static str, u64), Tally> = BTreeMap::new();
    let mut node = Some(node);
    for round in 0..ROUNDS {
        let n = match node.take() {
            Some(n) => n,
            None => Node::start(&dir, &env).await,
        };
        let streams: Vec<Stream> = ["5", "3.1.1"].iter().map(|v| Stream::start(mqtt_port, v, round, &token)).collect();
        tokio::time::sleep(LOAD).await;
        // Killed while both publishers have messages in flight.
        n.kill9();
        for s in streams {
            let (version, r) = (s.version, s.round);
            let res = s.result().await;
            assert_eq!(res["connack"], 0, "{version} round {r}: {res}");
            assert_eq!(res["end"], "disconnected", "{version} round {r}: the publisher should end with the node");
            let t = tallies.entry((version, r)).or_default();
            t.sent = res["sent"].as_u64().unwrap_or(0);
            for a in res["acks"].as_array().expect("acks") {
                let num = a[0].as_u64().expect("message number");
                if a[2].as_i64() == Some(0) {
                    t.acked.push(num);
                } else {
                    t.refused += 1;
                }
            }
            assert!(!t.acked.is_empty(), "{version} round {r}: no PUBACK within {LOAD:?}: {}", res["end"]);
        }
        assert_verifies(&dir, &env).await;
    }

    let node = Node::start(&dir, &env).await;
    let mut problems = Vec::new();
    let mut totals = (0u64, 0u64, 0u64);
    for ((version, round), t) in &tallies {
        let (address, key) = Stream::topic_key(version, *round);
        let stored = history_numbers(&node, &address, &key).await;
        let on_chain: HashSet<u64> = stored.iter().copied().collect();
        if on_chain.len() != stored.len() {
            problems.push(format!("{version} round {round}: a message is stored twice"));
        }
        let lost: Vec<u64> = t.acked.iter().copied().filter(|n| !on_chain.contains(n)).collect();
        if !lost.is_empty() {
            problems.push(format!(
                "{version} round {round}: {} acknowledged messages are not on the chain, e.g. {:?}",
                lost.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        let first = round * 1_000_000;
        let phantom: Vec<u64> = stored.iter().copied().filter(|n| *n < first || *n >= first + t.sent).collect();
        if !phantom.is_empty() {
            problems.push(format!("{version} round {round}: stored numbers never sent: {phantom:?}"));
        }
        eprintln!(
            "MQTT {version:>5} round {round}: sent {:>6}, PUBACKed {:>6}, refused {}, on chain {:>6} \
             (committed but unacknowledged when killed: {})",
            t.sent,
            t.acked.len(),
            t.refused,
            stored.len(),
            stored.len().saturating_sub(t.acked.len())
        );
        totals.0 += t.sent;
        totals.1 += t.acked.len() as u64;
        totals.2 += stored.len() as u64;
    }
    node.stop().await;
    assert_verifies(&dir, &env).await;
    eprintln!(
        "MQTT durability: {} sent, {} PUBACKed, {} on chain after {ROUNDS} SIGKILLs, in {:?}",
        totals.0,
        totals.1,
        totals.2,
        started.elapsed()
    );
    assert!(problems.is_empty(), "PUBACK is not durable:\n  {}", problems.join("\n  "));
}

/// `kalima up --dir DIR` with `env`, expected to exit on its own.
async fn up_expecting_exit(dir: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = kalima_command(env);
    c.arg("up").arg("--dir").arg(dir);
    let mut c = tokio::process::Command::from(c);
    c.kill_on_drop(true);
    tokio::time::timeout(PATIENCE, c.output())
        .await
        .unwrap_or_else(|_| panic!("kalima up --dir {} did not exit within {PATIENCE:?}", dir.display()))
        .expect("running kalima up")
}

#[tokio::test]
async fn mqtt_listen_in_use_is_a_one_line_error() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let mqtt = taken.local_addr().expect("local addr").to_string();
    let api = format!("127.0.0.1:{}", free_port());
    let out = up_expecting_exit(&dir, &[("KALIMA_MQTT__LISTEN", &mqtt), ("KALIMA_API__LISTEN", &api)]).await;
    assert!(!out.status.success(), "kalima up succeeded on a taken MQTT port:\n{}", describe(&out));
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "kalima up panicked:\n{}", describe(&out));
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{}", describe(&out));
    for want in [mqtt.as_str(), "[mqtt] listen", "KALIMA_MQTT__LISTEN"] {
        assert!(errors[0].contains(want), "the error line does not name {want:?}: {}", errors[0]);
    }
    drop(taken);
}

#[tokio::test]
async fn mqtt_listen_in_use_is_reported_before_storage_is_touched() {
    // As for `[api] listen` (startup.rs): a port conflict must not leave a half-created chain.
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let mqtt = taken.local_addr().expect("local addr").to_string();
    let api = format!("127.0.0.1:{}", free_port());
    let out = up_expecting_exit(&dir, &[("KALIMA_MQTT__LISTEN", &mqtt), ("KALIMA_API__LISTEN", &api)]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        !dir.join("kalima.db").exists(),
        "storage (with genesis) was created before the MQTT port conflict was reported:\n{}",
        describe(&out)
    );
    drop(taken);
}

/// An MQTT 3.1.1 CONNECT by hand: the CONNACK return code, or `None` when the TCP connection
/// is refused or closed without one.
async fn mqtt_login(port: u16, user: &str, password: &str) -> Option<u8> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut body = vec![0x00, 0x04];
    body.extend(b"MQTT");
    body.extend([4, 0xc2, 0, 60]);
    for field in ["e2e-login", user, password] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        packet.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    packet.extend(body);
    s.write_all(&packet).await.ok()?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut ack)).await.ok()?.ok()?;
    (ack[0] == 0x20).then_some(ack[3])
}

#[tokio::test]
async fn an_empty_mqtt_listen_disables_mqtt() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let port = free_port();
    // The file asks for MQTT on `port`; the environment overrides it with "" (disabled).
    let file = dir.join("kalima.toml");
    let toml = std::fs::read_to_string(&file).expect("reading kalima.toml");
    let default = "listen = \"0.0.0.0:1883\"";
    assert!(toml.contains(default), "the default kalima.toml has no `{default}` under [mqtt]");
    std::fs::write(&file, toml.replacen(default, &format!("listen = \"127.0.0.1:{port}\""), 1))
        .expect("writing kalima.toml");

    let node = Node::start(&dir, &[("KALIMA_MQTT__LISTEN", "")]).await;
    assert_eq!(mqtt_login(port, "admin", node.token()).await, None, "MQTT still served on {port} with listen = \"\"");
    assert!(!node.log().contains("MQTT server listening"), "the log says MQTT listens:\n{}", node.log());
    // The node itself works.
    node.put("/e2e/no-mqtt", "k", json!(1)).await;
    node.stop().await;

    // The same node with listen set serves MQTT there: user name admin, password the admin token.
    let listen = format!("127.0.0.1:{port}");
    let node = Node::start(&dir, &[("KALIMA_MQTT__LISTEN", &listen)]).await;
    assert_eq!(mqtt_login(port, "admin", node.token()).await, Some(0), "no MQTT login on {listen}\n{}", node.log());
    assert_eq!(mqtt_login(port, "admin", "kal_wrong").await, Some(4), "a wrong token must be refused (4)");
    node.stop().await;
}

/// A running `client.py` subscriber: its JSON-line events.
struct Subscriber {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: Vec<Value>,
}

impl Subscriber {
    async fn start(port: u16, user: &str, token: &str, filter: &str) -> Subscriber {
        let args = json!({ "host": "127.0.0.1", "port": port, "version": "5", "username": user, "password": token, "client_id": "e2e-sub" });
        let mut child = tokio::process::Command::new(peers_python())
            .arg(peer("client.py"))
            .arg(args.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting client.py: {e}; run scripts/peers/install"));
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut s = Subscriber { child, lines, seen: Vec::new() };
        let c = s.next_event(|e| e["event"] == "connack").await;
        assert_eq!(c["reason_code"], 0, "subscriber login: {c}");
        let cmd = format!("{}\n", json!({ "cmd": "subscribe", "tag": 1, "filters": [[filter, 1]] }));
        let stdin = s.child.stdin.as_mut().expect("stdin");
        stdin.write_all(cmd.as_bytes()).await.expect("subscribe command");
        stdin.flush().await.expect("flush");
        let ack = s.next_event(|e| e["event"] == "suback").await;
        assert_eq!(ack["codes"], json!([1]), "SUBACK: {ack}");
        s
    }

    async fn next_event(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("client.py: nothing matching within {PATIENCE:?}; seen {:?}", self.seen))
                .expect("reading client.py")
                .unwrap_or_else(|| panic!("client.py ended; seen {:?}", self.seen));
            let v: Value = serde_json::from_str(&line).unwrap_or(json!({ "noise": line }));
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn mqtt_and_rest_see_the_same_data() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("KALIMA_MQTT__LISTEN", listen.as_str())];
    let node = Node::start(&dir, &env).await;
    let meter = register(&node, "meter-1", "/plant-1").await;
    let viewer = register(&node, "viewer", "/plant-1/line-2").await;

    let mut sub = Subscriber::start(port, "viewer", &viewer, "kalima/out/plant-1/#").await;
    // A REST put by the admin reaches the MQTT subscriber holding a read grant.
    node.put("/plant-1/line-2", "pressure", json!(3.25)).await;
    let m = sub.next_event(|e| e["event"] == "message").await;
    assert_eq!(m["topic"], "kalima/out/plant-1/line-2/pressure", "{m}");
    assert_eq!(m["payload"], "3.25", "{m}");

    // An MQTT put shows in REST with the device that wrote it.
    let res = tokio::process::Command::new(peers_python())
        .arg(peer("publish.py"))
        .arg(
            json!({
                "port": port, "version": "3.1.1", "username": "meter-1", "password": meter,
                "topic": "kalima/plant-1/line-2/temp", "qos": 1, "payload": "{\"celsius\": 21.5, \"n\": {n}}",
                "start": 7, "count": 1, "timeout_s": 30,
            })
            .to_string(),
        )
        .output()
        .await
        .expect("publish.py");
    let res: Value = serde_json::from_slice(&res.stdout).unwrap_or(Value::Null);
    assert_eq!(res["end"], "done", "publish.py: {res}");
    let (s, v) = node.get_json("/api/v1/values?address=/plant-1/line-2&key=temp").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let value = &v["values"][0];
    assert_eq!(value["body"], json!({ "celsius": 21.5, "n": 7 }), "{v}");
    assert_eq!(value["device_id"], "meter-1", "{v}");
    // ... and the subscriber got it too, after the REST put.
    let m = sub.next_event(|e| e["event"] == "message").await;
    assert_eq!(m["topic"], "kalima/out/plant-1/line-2/temp", "{m}");
    node.stop().await;
    assert_verifies(&dir, &env).await;
}
