//! The oracle marketplace through a real `kalima` process, as a buyer and a provider use it:
//! the buyer's KLX comes over the bridge from a real anvil; the provider lists a feed; the
//! buyer buys it with `kalima market buy` (signed locally, token kept locally), streams it
//! over SSE and checks every reading's proof, then gets a receipt of one reading and checks
//! it with `kalima verify-receipt`; the provider's statement and payout account show the
//! revenue minus the gas split; delisting ends the stream; the chain verifies.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use futures::StreamExt;
use kalima_bridge_ethereum::anvil::TestChain as Anvil;
use kalima_core::ledger::{AccountKey, KLX};
use kalima_core::merkle::{InclusionProof, leaf_hash};
use kalima_e2e::{Node, assert_verifies, describe, kalima, stdout};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::bridge::{add_relayer, deploy, deposit, wait_json};

/// A buyer's webhook receiver: answers 500 to the first `fail_first` calls, then 200; keeps
/// what it received (delivery id, timestamp, signature, body).
/// (delivery id, timestamp, signature, body)
type Received = (String, String, String, Vec<u8>);

#[derive(Clone, Default)]
struct Receiver {
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    fail_first: usize,
}

impl Receiver {
    async fn start(fail_first: usize) -> (Receiver, String) {
        let r = Receiver { fail_first, ..Receiver::default() };
        let app = axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(
                    |axum::extract::State(r): axum::extract::State<Receiver>,
                     headers: axum::http::HeaderMap,
                     body: axum::body::Bytes| async move {
                        let n = r.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n < r.fail_first {
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        let h = |name: &str| {
                            headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                        };
                        r.got.lock().expect("lock").push((
                            h("kalima-delivery-id"),
                            h("kalima-timestamp"),
                            h("kalima-signature"),
                            body.to_vec(),
                        ));
                        StatusCode::OK
                    },
                ),
            )
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, url)
    }
}

/// One server-sent event.
#[derive(Debug)]
struct Sse {
    event: String,
    data: Value,
}

/// Reads server-sent events from a streaming response.
struct SseReader {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    fn new(r: reqwest::Response) -> Self {
        Self { body: r.bytes_stream().boxed(), buf: String::new() }
    }

    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut event, mut data) = (String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Sse { event, data: serde_json::from_str(&data).expect("event data is JSON") };
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("an event within 30 s")
                .expect("the stream is open")
                .expect("a chunk");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn device(node: &Node, id: &str, grants: &[(&str, bool, bool)]) -> String {
    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": id })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (prefix, read, write) in grants {
        let (s, g) = node
            .post_json(
                &format!("/api/v1/devices/{id}/grants"),
                &json!({"prefix": prefix, "read": read, "write": write}),
            )
            .await;
        assert!(s.is_success(), "{g}");
    }
    v["token"].as_str().expect("token").to_string()
}

async fn call(
    node: &Node,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = node.http().request(method, node.url(path)).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("request");
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn check_reading(reading: &Value) -> (String, u64) {
    let bytes = B64.decode(reading["tx_bytes"].as_str().expect("tx_bytes")).expect("base64");
    let id = hex::encode(leaf_hash(&bytes));
    assert_eq!(reading["id"].as_str(), Some(id.as_str()), "the bytes hash to the id");
    let proof: InclusionProof = serde_json::from_value(reading["proof"].clone()).expect("proof");
    assert_eq!(proof.leaf_hash, id);
    assert!(proof.verify(), "the inclusion proof verifies: {reading}");
    let tx = kalima_core::tx::Transaction::decode(&bytes).expect("canonical bytes");
    assert_eq!(serde_json::from_slice::<Value>(&tx.content.body).ok().as_ref(), Some(&reading["value"]));
    (id, proof.tree_size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_pays_in_klx_streams_a_feed_with_proofs_and_the_provider_is_paid_minus_the_gas_split() {
    // KLX for the buyer, over the bridge from anvil.
    let anvil = Anvil::spawn(31337);
    let relayer_eth = anvil.signer(1);
    let (token, bridge, _) = deploy(&anvil, vec![relayer_eth.address()], 1).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let relayer_key = add_relayer(&dir, "relayer-1", &relayer_eth, &anvil, *token.address(), *bridge.address());
    let node = Node::start(&dir, &[]).await;
    let (s, v) =
        node.post_json("/api/v1/devices", &json!({ "id": "relayer-1", "public_key": relayer_key.public_hex() })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let bridge_config = json!({
        "chain_id": 31337, "bridge": format!("{:#x}", bridge.address()), "token": format!("{:#x}", token.address()),
        "relayers": [{ "device": "relayer-1", "eth_address": format!("{:#x}", relayer_eth.address()) }],
        "threshold": 1, "release_ttl_secs": 3600, "max_withdrawal": (1_000 * KLX).to_string(),
    });
    let (s, v) =
        call(&node, reqwest::Method::PUT, "/api/v1/bridge/chains/ethereum", node.token(), Some(bridge_config)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let key_file = tmp.path().join("buyer.key");
    let o = kalima(&["klx", "keygen", "--out", key_file.to_str().expect("path")], &[]).await;
    assert!(o.status.success(), "{}", describe(&o));
    let seed = std::fs::read_to_string(&key_file).expect("key file");
    let mut b = [0u8; 32];
    hex::decode_to_slice(seed.trim(), &mut b).expect("hex seed");
    let buyer = SigningKey::from_bytes(&b);
    let buyer_hex = AccountKey::of(&buyer).to_hex();
    deposit(&anvil, *token.address(), *bridge.address(), 50 * KLX, &buyer).await;
    wait_json(&node, &anvil, &format!("/api/v1/klx/accounts/{buyer_hex}"), "the buyer's mint", |v| {
        v["balance"] == (50 * KLX).to_string()
    })
    .await;

    // The admin sets the economics; a provider lists the feed it writes.
    let accounts: Vec<String> =
        (0..4).map(|_| AccountKey::of(&SigningKey::generate(&mut rand::rngs::OsRng)).to_hex()).collect();
    let (payout, foundation, masters, dapp) = (&accounts[0], &accounts[1], &accounts[2], &accounts[3]);
    let economics = json!({
        "klx_per_eur": (1000 * KLX).to_string(), "sats_per_eur": 1000, "burn_bps": 100,
        "foundation": foundation, "masters": masters, "dapp_fund": dapp,
    });
    let (s, v) = call(&node, reqwest::Method::PUT, "/api/v1/market/config", node.token(), Some(economics)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let provider = device(&node, "acme-provider", &[("/plant-1", true, true)]).await;
    let sensor = device(&node, "sensor-1", &[("/plant-1/line-1", false, true)]).await;
    let buyer_device = device(&node, "buyer-1", &[]).await;
    let feed = json!({
        "id": "line-1-temp", "title": "Line 1 temperature", "description": "Measured every second",
        "prefix": "/plant-1/line-1", "keys": ["temp"],
        "prices": [{"period": "day", "currency": "klx", "amount": (5 * KLX).to_string()}],
        "licence": "Research use", "sample": {"temp": 21.5}, "payout": payout,
    });
    let (s, v) = call(&node, reqwest::Method::POST, "/api/v1/feeds", &provider, Some(feed.clone())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The sensor may write there but not sell it.
    let (s, v) = call(&node, reqwest::Method::POST, "/api/v1/feeds", &sensor, Some(feed)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) =
        call(&node, reqwest::Method::GET, "/api/v1/feeds?currency=klx&q=temperature", &buyer_device, None).await;
    assert_eq!((s, v["feeds"][0]["id"].as_str()), (StatusCode::OK, Some("line-1-temp")), "{v}");

    // The buyer buys a day with the CLI; the token stays on the buyer's side.
    let token_file = tmp.path().join("line-1-temp.token");
    let o = kalima(
        &[
            "market",
            "buy",
            "--key",
            key_file.to_str().expect("path"),
            "--feed",
            "line-1-temp",
            "--period",
            "day",
            "--token-out",
            token_file.to_str().expect("path"),
            "--node",
            &node.url(""),
            "--token",
            &buyer_device,
        ],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", describe(&o));
    let bought: Value = serde_json::from_str(&stdout(&o)).expect("JSON answer");
    let access = std::fs::read_to_string(&token_file).expect("token file").trim().to_string();
    assert!(access.starts_with(bought["subscription"]["id"].as_str().expect("subscription id")), "{bought}");
    assert!(!stdout(&o).contains(&access), "the token itself never went to the node");

    // A wrong token is refused, and counted.
    let r = node.http().get(node.url("/api/v1/feeds/line-1-temp/stream")).bearer_auth("nope").send().await;
    assert_eq!(r.expect("stream").status(), StatusCode::UNAUTHORIZED);

    // Streaming: every reading of the feed, with a proof that checks out; other keys are not sent.
    let r = node.http().get(node.url("/api/v1/feeds/line-1-temp/stream")).bearer_auth(&access).send().await;
    let r = r.expect("stream");
    assert_eq!(r.status(), StatusCode::OK);
    let mut events = SseReader::new(r);
    for (i, key) in ["temp", "humidity", "temp", "temp"].iter().enumerate() {
        let body = json!({"address": "/plant-1/line-1", "key": key, "body": 20.0 + i as f64});
        let (s, v) = call(&node, reqwest::Method::POST, "/api/v1/tx", &sensor, Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let mut held = Vec::new();
    for expected in [20.0, 22.0, 23.0] {
        let e = events.next().await;
        assert_eq!(e.event, "reading", "{e:?}");
        assert_eq!(e.data["reading"]["key"], "temp");
        assert_eq!(e.data["reading"]["value"], json!(expected));
        held.push(check_reading(&e.data["reading"]));
    }

    // A receipt of the first reading joins the buyer's proof to a signed checkpoint.
    let (s, cp) = call(&node, reqwest::Method::POST, "/api/v1/checkpoints", node.token(), None).await;
    assert_eq!(s, StatusCode::OK, "{cp}");
    let (id, size) = &held[0];
    let (s, receipt) =
        call(&node, reqwest::Method::GET, &format!("/api/v1/tx/{id}/receipt?tree_size={size}"), node.token(), None)
            .await;
    assert_eq!(s, StatusCode::OK, "{receipt}");
    let file = tmp.path().join("receipt.json");
    std::fs::write(&file, receipt.to_string()).expect("receipt file");
    let signer = cp["signatures"][0]["signer"].as_str().expect("signer").to_string();
    let o = kalima(&["verify-receipt", file.to_str().expect("path"), "--trust", &signer], &[]).await;
    assert!(o.status.success() && stdout(&o).contains("VERIFIED"), "{}", describe(&o));

    // The provider's statement: 5 KLX gross, 0.25 KLX of gas (1 kB), 1% of it burned.
    let (s, st) = call(&node, reqwest::Method::GET, "/api/v1/market/statements/acme-provider", &provider, None).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    let gas = KLX / 4;
    assert_eq!(st["totals"]["klx"]["gross"], (5 * KLX).to_string(), "{st}");
    assert_eq!(st["totals"]["klx"]["gas"], gas.to_string(), "{st}");
    assert_eq!(st["totals"]["klx"]["burned"], (gas / 100).to_string(), "{st}");
    assert_eq!(st["purchases"].as_array().map(Vec::len), Some(1), "{st}");
    let (s, _) =
        call(&node, reqwest::Method::GET, "/api/v1/market/statements/acme-provider", &buyer_device, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "only the provider reads its statement");
    let balance = |v: &Value| v["balance"].as_str().expect("balance").parse::<u128>().expect("number");
    let (_, a) = node.get_json(&format!("/api/v1/klx/accounts/{payout}")).await;
    assert_eq!(balance(&a), 5 * KLX - gas, "the payout account holds the net revenue");
    let (_, a) = node.get_json(&format!("/api/v1/klx/accounts/{buyer_hex}")).await;
    assert_eq!(balance(&a), 45 * KLX);

    // A webhook: deliveries POSTed in order, signed, retried through two failures.
    let (hook, url) = Receiver::start(2).await;
    let sub_id = bought["subscription"]["id"].as_str().expect("subscription id").to_string();
    let secret = "a-secret-of-32-bytes-for-hmacs!!";
    let path = format!("/api/v1/market/subscriptions/{sub_id}/webhook");
    let (s, v) = call(&node, reqwest::Method::PUT, &path, "wrong", Some(json!({"url": url, "secret": secret}))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = call(&node, reqwest::Method::PUT, &path, &access, Some(json!({"url": url, "secret": "short"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(&node, reqwest::Method::PUT, &path, &access, Some(json!({"url": url, "secret": secret}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for value in [30.0, 31.0] {
        let body = json!({"address": "/plant-1/line-1", "key": "temp", "body": value});
        let (s, v) = call(&node, reqwest::Method::POST, "/api/v1/tx", &sensor, Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(events.next().await.data["reading"]["value"], json!(value), "the SSE stream goes on too");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while hook.got.lock().expect("lock").len() < 2 {
        assert!(Instant::now() < deadline, "the webhook never got both readings");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = hook.got.lock().expect("lock").clone();
    assert!(hook.calls.load(std::sync::atomic::Ordering::SeqCst) >= 4, "two failures were retried");
    let mut values = Vec::new();
    for (id, ts, sig, body) in &got {
        let ts: i64 = ts.parse().expect("timestamp");
        assert_eq!(sig, &kalima_marketplace::webhook::signature(secret, ts, body), "signed with the secret");
        let d: Value = serde_json::from_slice(body).expect("JSON delivery");
        assert_eq!(id, &format!("{sub_id}:{}", d["reading"]["id"].as_str().expect("id")), "a stable delivery id");
        check_reading(&d["reading"]);
        values.push(d["reading"]["value"].clone());
    }
    values.dedup();
    assert_eq!(values, vec![json!(30.0), json!(31.0)], "in order");

    // Delisting ends the stream; the deliveries were recorded and count in the reputation.
    let (s, v) = call(&node, reqwest::Method::DELETE, "/api/v1/feeds/line-1-temp", &provider, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let e = events.next().await;
    assert_eq!((e.event.as_str(), e.data["reason"].as_str()), ("end", Some("delisted")), "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = call(&node, reqwest::Method::GET, "/api/v1/feeds/line-1-temp", &buyer_device, None).await;
        // 5 over SSE, 2 (or more, on a repeat) to the webhook.
        if v["reputation"]["readings_delivered"].as_u64().is_some_and(|n| n >= 7) {
            assert_eq!(v["reputation"]["purchases"], json!(1), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "deliveries never recorded: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = node.http().get(node.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(text.contains("kalima_market_access_refused_total"), "refusals are counted");
    node.stop().await;
    assert_verifies(&dir, &[]).await;
}

/// An MQTT 5 buyer (paho-mqtt, an independent client): logs in with the subscription id and
/// token, subscribes to its feed and to another, tries to publish, and prints every event as
/// one JSON line.
const MQTT_BUYER: &str = r#"
import json, sys, time
import paho.mqtt.client as mqtt
a = json.loads(sys.argv[1])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="buyer", protocol=mqtt.MQTTv5)
c.username_pw_set(a["user"], a["password"])
def out(d):
    print(json.dumps(d), flush=True)
def on_connect(c, u, f, rc, p):
    out({"connect": rc.value})
    if rc.value == 0:
        c.subscribe([(a["own"], 1), (a["other"], 1)])
def on_subscribe(c, u, mid, rcs, p):
    out({"suback": [r.value for r in rcs]})
    c.publish("kalima/plant-1/line-1/temp", "99", qos=1)
def on_publish(c, u, mid, rc, p):
    out({"puback": rc.value})
def on_message(c, u, m):
    out({"topic": m.topic, "payload": m.payload.decode()})
c.on_connect, c.on_subscribe, c.on_publish, c.on_message = on_connect, on_subscribe, on_publish, on_message
c.connect("127.0.0.1", a["port"])
c.loop_start()
time.sleep(a["seconds"])
"#;

/// Runs [`MQTT_BUYER`] and returns its stdout lines as they come.
fn mqtt_buyer(
    port: u16,
    user: &str,
    password: &str,
    feed: &str,
    seconds: u64,
) -> (tokio::process::Child, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>) {
    use tokio::io::AsyncBufReadExt;
    let args = json!({
        "port": port, "user": user, "password": password, "seconds": seconds,
        "own": format!("kalima/feeds/{feed}/#"), "other": "kalima/feeds/another/#",
    });
    let mut child = tokio::process::Command::new(kalima_e2e::peers_python())
        .arg("-c")
        .arg(MQTT_BUYER)
        .arg(args.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python with paho-mqtt (scripts/peers/install)");
    let out = child.stdout.take().expect("stdout");
    (child, tokio::io::BufReader::new(out).lines())
}

async fn next_line(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the MQTT buyer answers within 30 s")
        .expect("read")
        .expect("the MQTT buyer ended early (is paho-mqtt installed? scripts/peers/install)");
    serde_json::from_str(&line).expect("JSON line")
}

/// A subscription's record, read with its access token.
async fn subscription(node: &Node, id: &str, token: &str) -> (StatusCode, Value) {
    call(node, reqwest::Method::GET, &format!("/api/v1/market/subscriptions/{id}"), token, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_bought_over_lightning_is_granted_once_when_the_lnd_rest_standin_settles_it() {
    use kalima_bridge_lightning::lnd_standin::LndStandin;
    use kalima_bridge_lightning::{InvoiceBackend as _, PaymentHash};
    let lnd = LndStandin::start().await.expect("the LND REST stand-in starts");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("data");
    Node::init(&dir).await;
    let (cert, macaroon) = lnd.write_lnd_files(&dir).expect("LND files");
    let mut toml = std::fs::read_to_string(dir.join("kalima.toml")).expect("kalima.toml");
    toml.push_str(&format!(
        "\n[lightning]\nenabled = true\nlnd_url = \"{}\"\nmacaroon_file = \"{}\"\ntls_cert_file = \"{}\"\ninvoice_expiry_secs = 600\n",
        lnd.url(),
        macaroon.display(),
        cert.display()
    ));
    std::fs::write(dir.join("kalima.toml"), toml).expect("writing kalima.toml");
    let mqtt_port = kalima_e2e::free_port();
    let mqtt_listen = format!("127.0.0.1:{mqtt_port}");
    let mut node = Node::start(&dir, &[("KALIMA_MQTT__LISTEN", &mqtt_listen)]).await;

    let accounts: Vec<String> =
        (0..4).map(|_| AccountKey::of(&SigningKey::generate(&mut rand::rngs::OsRng)).to_hex()).collect();
    let economics = json!({
        "klx_per_eur": (1000 * KLX).to_string(), "sats_per_eur": 1000, "burn_bps": 100,
        "foundation": accounts[1], "masters": accounts[2], "dapp_fund": accounts[3],
    });
    let (s, v) = call(&node, reqwest::Method::PUT, "/api/v1/market/config", node.token(), Some(economics)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let provider = device(&node, "acme-provider", &[("/plant-1", true, true)]).await;
    let buyer_device = device(&node, "buyer-1", &[]).await;
    let feed = json!({
        "id": "line-1-temp", "title": "Line 1 temperature", "prefix": "/plant-1/line-1", "keys": ["temp"],
        "prices": [{"period": "hour", "currency": "sats", "amount": "500"}],
        "licence": "Research use", "payout": accounts[0],
    });
    let (s, v) = call(&node, reqwest::Method::POST, "/api/v1/feeds", &provider, Some(feed)).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Bob asks for an invoice for two hours; the token stays his, only its hash is sent.
    let sub_id = kalima_core::ledger::market::subscription_id("line-1-temp", "ln:bob");
    let token_file = tmp.path().join("bob.token");
    let o = kalima(
        &[
            "market",
            "invoice",
            "--feed",
            "line-1-temp",
            "--period",
            "hour",
            "--count",
            "2",
            "--buyer",
            "bob",
            "--token-out",
            token_file.to_str().expect("path"),
            "--node",
            &node.url(""),
            "--token",
            &buyer_device,
        ],
        &[],
    )
    .await;
    assert!(o.status.success(), "{}", describe(&o));
    let inv: Value = serde_json::from_str(&stdout(&o)).expect("JSON answer");
    let token = std::fs::read_to_string(&token_file).expect("token file").trim().to_string();
    assert!(token.starts_with(&sub_id), "the token names the subscription");
    let token_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
    let ask = json!({"period": "hour", "count": 2, "buyer": "bob", "token_hash": token_hash});
    assert_eq!((inv["amount_msat"].as_u64(), inv["subscription"].as_str()), (Some(1_000_000), Some(sub_id.as_str())));
    let request = inv["payment_request"].as_str().expect("BOLT11");
    assert!(request.starts_with("lnbcrt10u1"), "a regtest BOLT11 request for 1,000 sats: {request}");
    let hash: PaymentHash = inv["payment_hash"].as_str().expect("hash").parse().expect("hex hash");
    let status = format!("/api/v1/market/invoices/{}", inv["payment_hash"].as_str().expect("hash"));

    // Unpaid: nothing granted.
    let (s, v) = call(&node, reqwest::Method::GET, &status, &buyer_device, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("open")), "{v}");
    let r = node.http().get(node.url("/api/v1/feeds/line-1-temp/stream")).bearer_auth(&token).send().await;
    assert_eq!(r.expect("stream").status(), StatusCode::UNAUTHORIZED);

    // Paid: granted once, and the stream opens.
    lnd.settle(&hash).expect("settle");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = call(&node, reqwest::Method::GET, &status, &buyer_device, None).await;
        if v["status"] == "settled" {
            break;
        }
        assert!(Instant::now() < deadline, "the settlement was never recorded: {v}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, sub) = subscription(&node, &sub_id, &token).await;
    assert_eq!((s, sub["purchases"].as_u64()), (StatusCode::OK, Some(1)), "{sub}");
    let r = node.http().get(node.url("/api/v1/feeds/line-1-temp/stream")).bearer_auth(&token).send().await;
    let mut events = SseReader::new(r.expect("stream"));
    let (s, v) = call(
        &node,
        reqwest::Method::POST,
        "/api/v1/tx",
        &provider,
        Some(json!({"address": "/plant-1/line-1", "key": "temp", "body": 19.5})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let e = events.next().await;
    assert_eq!(e.data["reading"]["value"], json!(19.5), "{e:?}");
    check_reading(&e.data["reading"]);
    drop(events);

    // The same feed over MQTT to an independent client: its own feed only, read-only, with proofs.
    let (_wrong, mut lines) = mqtt_buyer(mqtt_port, &sub_id, "not-the-token", "line-1-temp", 3);
    let refused = next_line(&mut lines).await;
    assert_ne!(refused["connect"], json!(0), "a wrong token is refused at CONNECT: {refused}");
    let (_buyer, mut lines) = mqtt_buyer(mqtt_port, &sub_id, &token, "line-1-temp", 20);
    assert_eq!(next_line(&mut lines).await, json!({"connect": 0}));
    assert_eq!(next_line(&mut lines).await, json!({"suback": [1, 135]}), "its own feed only (0x87 for the other)");
    assert_eq!(next_line(&mut lines).await, json!({"puback": 135}), "a buyer may not publish (0x87)");
    let (s, v) = call(
        &node,
        reqwest::Method::POST,
        "/api/v1/tx",
        &provider,
        Some(json!({"address": "/plant-1/line-1", "key": "temp", "body": 18.25})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = next_line(&mut lines).await;
    assert_eq!(m["topic"], "kalima/feeds/line-1-temp/plant-1/line-1/temp", "{m}");
    let d: Value = serde_json::from_str(m["payload"].as_str().expect("payload")).expect("JSON delivery");
    assert_eq!(d["reading"]["value"], json!(18.25));
    check_reading(&d["reading"]);
    drop(lines);

    // A running subscription is renewed only with its current token.
    let (s, v) =
        call(&node, reqwest::Method::POST, "/api/v1/feeds/line-1-temp/invoices", &buyer_device, Some(ask.clone()))
            .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    // Restarted, the node resumes from its settle index: nothing is granted twice, and a
    // payment settled while it was down is granted after the restart.
    node.stop().await;
    let mut renew = ask.clone();
    renew["current_token"] = json!(token);
    renew["count"] = json!(1);
    node = Node::start(&dir, &[]).await;
    let (s, inv2) =
        call(&node, reqwest::Method::POST, "/api/v1/feeds/line-1-temp/invoices", &buyer_device, Some(renew)).await;
    assert_eq!(s, StatusCode::CREATED, "{inv2}");
    node.stop().await;
    let hash2: PaymentHash = inv2["payment_hash"].as_str().expect("hash").parse().expect("hex hash");
    lnd.settle(&hash2).expect("settle while the node is down");
    // A payment to the same wallet that is not a purchase is ignored.
    let foreign = lnd
        .client()
        .expect("client")
        .create_invoice(kalima_bridge_lightning::NewInvoice::new(5_000, "tip", 600))
        .await
        .expect("foreign invoice");
    lnd.settle(&foreign.payment_hash).expect("settle the foreign invoice");
    node = Node::start(&dir, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, sub) = subscription(&node, &sub_id, &token).await;
        if sub["purchases"].as_u64() == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the payment made while down was not granted: {sub}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, st) = call(&node, reqwest::Method::GET, "/api/v1/market/statements/acme-provider", &provider, None).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    assert_eq!(st["totals"]["purchases"].as_u64(), Some(2), "two purchases, no repeat: {st}");
    assert_eq!(st["totals"]["sats"]["gross"], "1500", "{st}");
    assert_eq!(st["totals"]["klx"]["gross"], "0", "{st}");

    // A cancelled invoice grants nothing.
    let mut third = ask.clone();
    third["buyer"] = json!("carol");
    let (s, inv3) =
        call(&node, reqwest::Method::POST, "/api/v1/feeds/line-1-temp/invoices", &buyer_device, Some(third)).await;
    assert_eq!(s, StatusCode::CREATED, "{inv3}");
    let hash3: PaymentHash = inv3["payment_hash"].as_str().expect("hash").parse().expect("hex hash");
    lnd.cancel(&hash3).expect("cancel");
    let path3 = format!("/api/v1/market/invoices/{}", inv3["payment_hash"].as_str().expect("hash"));
    let (s, v) = call(&node, reqwest::Method::GET, &path3, &buyer_device, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("canceled")), "{v}");
    let carol = kalima_core::ledger::market::subscription_id("line-1-temp", "ln:carol");
    let (s, _) = subscription(&node, &carol, &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "no subscription for a cancelled invoice");
    node.stop().await;
    assert_verifies(&dir, &[]).await;
}
