//! LoRaWAN from the config file alone: `kalima up` with `[lorawan]` listening, a gateway (this
//! test, speaking Semtech UDP) forwards an uplink built by an independent implementation (npm
//! lora-packet), and the decoded Cayenne LPP readings appear in the REST API with their radio
//! provenance; a gateway not on the allow-list is ignored.

use std::time::{Duration, Instant};

use base64::Engine;
use kalima_e2e::{Node, free_port, workspace_root};
use reqwest::StatusCode;
use serde_json::{Value, json};

const GATEWAY: [u8; 8] = [0xaa, 0x55, 0x5a, 0, 0, 0, 1, 1];

fn lora_frames(req: &Value) -> Value {
    use std::io::Write;
    let script = workspace_root().join("adapters/lorawan/tests/peers/lora_frames.js");
    let mut child = std::process::Command::new("node")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run node (Node.js is needed for the LoRaWAN peer)");
    child.stdin.take().expect("stdin").write_all(req.to_string().as_bytes()).expect("write request");
    let out = child.wait_with_output().expect("lora_frames.js");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && v["phy"].is_string(),
        "lora_frames.js failed (run scripts/peers/install for npm lora-packet): {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    v
}

fn push_data(token: u16, gateway: [u8; 8], phy_b64: &str, size: usize, rssi: i32) -> Vec<u8> {
    let mut d = vec![2, (token >> 8) as u8, token as u8, 0];
    d.extend_from_slice(&gateway);
    let rxpk = json!({ "rxpk": [{ "tmst": 123456, "freq": 868.3, "chan": 1, "rfch": 0, "stat": 1, "modu": "LORA",
        "datr": "SF9BW125", "codr": "4/5", "rssi": rssi, "lsnr": 7.25, "size": size, "data": phy_b64 }] });
    d.extend_from_slice(rxpk.to_string().as_bytes());
    d
}

#[tokio::test]
async fn lorawan_from_config_to_chain() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("node");
    Node::init(&dir).await;
    let port = free_port();
    let config = format!(
        r#"
[lorawan]
listen = "127.0.0.1:{port}"
gateways = ["{gw}"]

[[lorawan.devices]]
name = "soil-1"
dev_eui = "0004A30B001C0530"
dev_addr = "26011BDA"
nwk_skey = "2B7E151628AED2A6ABF7158809CF4F3C"
app_skey = "000102030405060708090A0B0C0D0E0F"
address = "/farm/soil-1"
codec = "cayenne_lpp"
"#,
        gw = hex::encode(GATEWAY)
    );
    let path = dir.join("kalima.toml");
    let text = std::fs::read_to_string(&path).expect("read kalima.toml");
    // `kalima init` writes a [lorawan] table with listen off; replace it with this one.
    let head = text.split("[lorawan]").next().unwrap_or_default().to_string();
    std::fs::write(&path, head + &config).expect("write kalima.toml");
    let node = Node::start(&dir, &[]).await;
    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": "lorawan" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = node
        .post_json("/api/v1/devices/lorawan/grants", &json!({ "prefix": "/farm", "read": true, "write": true }))
        .await;
    assert!(s.is_success(), "{s} {v}");

    // 27.2 C on channel 3, 55 % humidity on channel 4, FCnt above 16 bits.
    let frame =
        lora_frames(&json!({ "cmd": "uplink", "dev_addr": "26011BDA", "nwk_skey": "2B7E151628AED2A6ABF7158809CF4F3C",
        "app_skey": "000102030405060708090A0B0C0D0E0F", "fcnt": 70000, "fport": 2, "payload": "0367011004686e" }));
    let phy = frame["phy"].as_str().unwrap_or_default().to_string();
    let size = base64::engine::general_purpose::STANDARD.decode(&phy).map(|b| b.len()).unwrap_or(0);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    sock.connect(("127.0.0.1", port)).await.expect("connect");

    // An unknown gateway is not acknowledged and its uplink is not committed.
    let stranger = [9u8; 8];
    sock.send(&push_data(7, stranger, &phy, size, -40)).await.expect("send");
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_millis(700), sock.recv(&mut buf)).await;
    assert!(r.is_err(), "an unknown gateway got an answer: {r:?}");

    sock.send(&push_data(0x4242, GATEWAY, &phy, size, -71)).await.expect("send");
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.expect("PUSH_ACK").expect("recv");
    assert_eq!(&buf[..n], &[2, 0x42, 0x42, 1], "PUSH_ACK echoes the token");

    let started = Instant::now();
    let temp = loop {
        let (s, v) = node.get_json("/api/v1/values?address=/farm/soil-1&key=temperature-3").await;
        if s == StatusCode::OK {
            break v["values"][0].clone();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no temperature-3 on the chain: {s} {v}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(temp["body"], json!({ "value": 27.2, "unit": "C" }), "{temp}");
    assert_eq!(temp["device_id"], "lorawan");
    let p = &temp["props"];
    assert_eq!(p["source"], "lorawan");
    assert_eq!(p["lorawan_fcnt"], "70000");
    assert_eq!(p["lorawan_gateway"], hex::encode(GATEWAY));
    assert_eq!(p["lorawan_rssi"], "-71");
    assert_eq!(p["lorawan_dev_eui"], "0004a30b001c0530");
    let (s, hum) = node.get_json("/api/v1/values?address=/farm/soil-1&key=humidity-4").await;
    assert_eq!(s, StatusCode::OK, "{hum}");
    assert_eq!(hum["values"][0]["body"], json!({ "value": 55.0, "unit": "%" }));

    // The status route shows what the adapter has seen of the device and the gateway.
    let (s, st) = node.get_json("/api/v1/adapters/lorawan").await;
    assert_eq!(s, StatusCode::OK, "{st}");
    let dev = &st["devices"][0];
    assert_eq!((dev["name"].as_str(), dev["joined"].as_bool()), (Some("soil-1"), Some(true)), "{st}");
    assert_eq!(dev["uplinks"], 1, "{st}");
    assert_eq!(dev["last_fcnt"], 70000, "{st}");
    assert_eq!(dev["last_gateway"], hex::encode(GATEWAY), "{st}");
    assert_eq!(dev["last_rssi"], -71, "{st}");
    let gw = &st["gateways"][0];
    assert_eq!(gw["eui"], hex::encode(GATEWAY), "{st}");
    assert_eq!(gw["push_data"], 1, "only the allow-listed gateway's datagram counts: {st}");
    assert_eq!(gw["downlink_path"], false, "no PULL_DATA was sent: {st}");
    let metrics =
        node.http().get(node.url("/metrics")).send().await.expect("GET /metrics").text().await.unwrap_or_default();
    for series in [
        r#"kalima_adapter_frames_total{adapter="lorawan",outcome="accepted"}"#,
        r#"kalima_adapter_frames_total{adapter="lorawan",outcome="unknown_gateway"}"#,
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}");
    }
    node.stop().await;
    kalima_e2e::assert_verifies(&dir, &[]).await;
}
