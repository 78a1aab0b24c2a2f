//! A plant engineer's Modbus setup, from the config file alone: `kalima up` with a
//! `[[modbus.devices]]` section polls a real Modbus TCP server (pymodbus), the readings show
//! up in the REST API once the adapter's Kalima device is registered, the status route and
//! the metrics report the device, and a set-point from REST reaches the device and the chain.

use std::time::{Duration, Instant};

use kalima_e2e::{ModbusSim, Node};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(20);

async fn wait_for<F, Fut>(what: &str, node: &Node, mut check: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < WITHIN, "{what} not seen within {WITHIN:?}\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn modbus_from_config_to_chain_and_back() {
    // holding 0: oil temperature in tenths of a degree; holding 1: pressure set-point in tenths of a bar.
    let sim = ModbusSim::start(&json!({ "holding": { "0": 215, "1": 80 } })).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("node");
    Node::init(&dir).await;
    let config = format!(
        r#"
[[modbus.devices]]
name = "press-plc"
host = "{addr}"
address = "/plant/press"
poll_interval_ms = 100

[[modbus.devices.points]]
key = "oil-temp"
function = "holding_register"
register = 0
type = "i16"
scale = 0.1
unit = "C"
deadband = 0

[[modbus.devices.points]]
key = "pressure-sp"
function = "holding_register"
register = 1
type = "u16"
scale = 0.1
unit = "bar"
writable = true
deadband = 0
"#,
        addr = sim.addr
    );
    let path = dir.join("kalima.toml");
    let mut text = std::fs::read_to_string(&path).expect("read kalima.toml");
    text.push_str(&config);
    std::fs::write(&path, text).expect("write kalima.toml");
    let node = Node::start(&dir, &[]).await;

    // Until the adapter's Kalima device exists, the status names the problem.
    let status = wait_for("state unauthorized", &node, || async {
        let (s, v) = node.get_json("/api/v1/adapters/modbus/devices").await;
        (s == StatusCode::OK && v["devices"][0]["state"] == "unauthorized").then_some(v)
    })
    .await;
    let err = status["devices"][0]["last_error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("\"modbus\""), "last_error should name the Kalima device: {status}");

    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": "modbus" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = node
        .post_json("/api/v1/devices/modbus/grants", &json!({ "prefix": "/plant", "read": true, "write": true }))
        .await;
    assert!(s.is_success(), "{s} {v}");

    let temp = wait_for("oil-temp on the chain", &node, || async {
        let (s, v) = node.get_json("/api/v1/values?address=/plant/press&key=oil-temp").await;
        (s == StatusCode::OK).then(|| v["values"][0].clone())
    })
    .await;
    assert_eq!(temp["body"], json!({ "value": 21.5, "unit": "C" }), "{temp}");
    assert_eq!(temp["props"]["source"], "modbus");
    assert_eq!(temp["props"]["modbus_device"], "press-plc");
    assert_eq!(temp["device_id"], "modbus");

    let (s, v) = node.get_json("/api/v1/adapters/modbus/devices").await;
    assert_eq!(s, StatusCode::OK);
    let dev = &v["devices"][0];
    assert_eq!(dev["name"], "press-plc");
    assert_eq!(dev["state"], "ok", "{v}");
    assert_eq!(dev["requests_per_poll"], 1, "two adjacent registers are one request: {v}");

    // A set-point in engineering units: 12.5 bar is raw 125 in the register.
    let (s, out) =
        node.post_json("/api/v1/adapters/modbus/devices/press-plc/points/pressure-sp", &json!({ "value": 12.5 })).await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["outcome"], "written");
    let sp = wait_for("pressure-sp read back as 12.5", &node, || async {
        let (s, v) = node.get_json("/api/v1/values?address=/plant/press&key=pressure-sp").await;
        (s == StatusCode::OK && v["values"][0]["body"]["value"] == json!(12.5)).then(|| v["values"][0].clone())
    })
    .await;
    assert_eq!(sp["body"]["unit"], "bar");
    let (s, rec) = node.get_json("/api/v1/values?address=/plant/press&key=pressure-sp.setpoint").await;
    assert_eq!(s, StatusCode::OK, "{rec}");
    assert_eq!(rec["values"][0]["body"]["outcome"], "written");
    assert_eq!(rec["values"][0]["device_id"], "admin", "the requester signs the record: {rec}");

    // Bad set-points are refused with a reason, and counted.
    for (path, body, want) in [
        (
            "/api/v1/adapters/modbus/devices/press-plc/points/pressure-sp",
            json!({ "value": 1.0e9 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/adapters/modbus/devices/press-plc/points/pressure-sp",
            json!({ "value": "high" }),
            StatusCode::BAD_REQUEST,
        ),
        ("/api/v1/adapters/modbus/devices/press-plc/points/oil-temp", json!({ "value": 1 }), StatusCode::CONFLICT),
        ("/api/v1/adapters/modbus/devices/nope/points/oil-temp", json!({ "value": 1 }), StatusCode::NOT_FOUND),
    ] {
        let (s, v) = node.post_json(path, &body).await;
        assert_eq!(s, want, "{path} {body}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {v}");
    }
    let metrics =
        node.http().get(node.url("/metrics")).send().await.expect("GET /metrics").text().await.unwrap_or_default();
    for series in [
        r#"kalima_adapter_polls_total{adapter="modbus",outcome="ok"}"#,
        r#"kalima_adapter_setpoints_total{adapter="modbus",outcome="written"}"#,
        r#"kalima_writes_rejected_total{reason="not_writable",interface="rest"}"#,
        r#"kalima_writes_accepted_total{interface="modbus"}"#,
    ] {
        assert!(metrics.contains(series), "/metrics lacks {series}");
    }

    node.stop().await;
    kalima_e2e::assert_verifies(&dir, &[]).await;
}
