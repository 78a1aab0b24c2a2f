//! External broker mode against a real Mosquitto: messages published while the node is down
//! (or not yet committed when it was killed) are redelivered through the persistent session
//! and committed; and the node as a Sparkplug B host with Eclipse Tahu's npm client as the
//! edge node: a rebirth request for a node it has no birth for, then births and data on the
//! chain, and the host's STATE on the broker.

use std::time::{Duration, Instant};

use kalima_e2e::{Mosquitto, Node, peers_python_run, workspace_root};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PUBLISH: &str = r#"
import sys, paho.mqtt.client as mqtt
port, first, last = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plant-publisher")
c.connect("127.0.0.1", port); c.loop_start()
for i in range(first, last + 1):
    c.publish("kalima/ext/line-1/count", str(i), qos=1).wait_for_publish(10)
c.loop_stop(); c.disconnect()
"#;

async fn register_bridge(node: &Node, prefix: &str) {
    let (s, v) = node.post_json("/api/v1/devices", &json!({ "id": "mqtt-bridge" })).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = node
        .post_json("/api/v1/devices/mqtt-bridge/grants", &json!({ "prefix": prefix, "read": true, "write": true }))
        .await;
    assert!(s.is_success(), "{s} {v}");
}

async fn history(node: &Node, address: &str, key: &str) -> Vec<Value> {
    let (s, v) = node.get_json(&format!("/api/v1/history?address={address}&key={key}&limit=1000")).await;
    if s != StatusCode::OK {
        return Vec::new();
    }
    let mut items: Vec<Value> =
        v["items"].as_array().cloned().unwrap_or_default().into_iter().map(|t| t["body"].clone()).collect();
    items.reverse();
    items
}

async fn wait_for<F, Fut>(what: &str, node: &Node, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(20), "{what} not seen within 20 s\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn external_broker_redelivers_what_the_node_had_not_committed() {
    let broker = Mosquitto::start().await;
    let port = broker.port.to_string();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("node");
    Node::init(&dir).await;
    let broker_addr = format!("127.0.0.1:{port}");
    let env = [("KALIMA_MQTT__LISTEN", ""), ("KALIMA_MQTT__EXTERNAL__BROKER", broker_addr.as_str())];
    let node = Node::start(&dir, &env).await;
    register_bridge(&node, "/ext").await;
    peers_python_run(PUBLISH, &[&port, "1", "5"]).await;
    wait_for("counts 1..5", &node, || async { history(&node, "/ext/line-1", "count").await.len() == 5 }).await;

    node.kill9();
    // The node is down: the broker keeps these for its persistent session.
    peers_python_run(PUBLISH, &[&port, "6", "10"]).await;
    let node = Node::start(&dir, &env).await;
    wait_for("counts 6..10 after the restart", &node, || async {
        history(&node, "/ext/line-1", "count").await.len() >= 10
    })
    .await;
    let got = history(&node, "/ext/line-1", "count").await;
    let want: Vec<Value> = (1..=10).map(|i| json!(i)).collect();
    assert_eq!(got, want, "every message once, in order");
    node.stop().await;
    kalima_e2e::assert_verifies(&dir, &[]).await;
}

#[tokio::test]
async fn sparkplug_edge_node_from_eclipse_tahu() {
    let broker = Mosquitto::start().await;
    let port = broker.port.to_string();
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("node");
    Node::init(&dir).await;
    let env = [
        ("KALIMA_MQTT__LISTEN", String::new()),
        ("KALIMA_MQTT__EXTERNAL__BROKER", format!("127.0.0.1:{port}")),
        ("KALIMA_MQTT__SPARKPLUG__ENABLED", "true".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(&dir, &env).await;
    register_bridge(&node, "/sparkplug").await;

    // The edge node starts without announcing itself: the host must ask it for a rebirth.
    let script = workspace_root().join("adapters/mqtt/tests/peers/sparkplug_edge.js");
    let arg = json!({ "broker": format!("tcp://127.0.0.1:{port}"), "group": "plant", "edge": "edge-1", "device": "dev-1",
        "data": 4, "interval_ms": 300, "births": false, "linger_ms": 1500 });
    let out = tokio::process::Command::new("node").arg(&script).arg(arg.to_string()).output().await.expect("run node");
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "edge node failed: {lines}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        lines.contains(r#""name":"Node Control/Rebirth","value":true"#),
        "no rebirth request reached the edge node:\n{lines}"
    );

    wait_for("Sparkplug metrics", &node, || async {
        history(&node, "/sparkplug/plant/edge-1", "Temperature").await.last()
            == Some(&json!({ "value": 22.0, "datatype": "Float" }))
    })
    .await;
    assert_eq!(
        history(&node, "/sparkplug/plant/edge-1", "Count").await.last(),
        Some(&json!({ "value": -5, "datatype": "Int32" }))
    );
    assert_eq!(
        history(&node, "/sparkplug/plant/edge-1/dev-1", "Pressure").await.last(),
        Some(&json!({ "value": 4.25, "datatype": "Double" }))
    );
    let state = peers_python_run(
        r#"
import sys, paho.mqtt.client as mqtt, time
got = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.on_message = lambda cl, ud, m: got.append(m.payload.decode())
c.connect("127.0.0.1", int(sys.argv[1])); c.subscribe("spBv1.0/STATE/kalima", 1); c.loop_start(); time.sleep(1.5); c.loop_stop()
print(got[0] if got else "")
"#,
        &[&port],
    )
    .await;
    let state: Value = serde_json::from_str(state.trim()).unwrap_or(Value::Null);
    assert_eq!(state["online"], true, "retained STATE of the host: {state}");
    node.stop().await;
}
