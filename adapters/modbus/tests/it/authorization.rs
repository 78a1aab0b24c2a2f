//! The Kalima device the readings are written as: while it is missing or lacks a write grant
//! the field device shows `unauthorized` with a message naming what to fix, nothing reaches the
//! chain, and readings flow as soon as the admin registers and grants it.

use kalima_adapter_modbus::{DeviceState, ModbusAdapter};
use serde_json::json;

use crate::support::{ModbusSim, Node, json_close, reading, section, status, wait_for, wait_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_wait_for_their_kalima_device_and_its_grant() {
    let sim = ModbusSim::tcp(json!({ "holding": { "0": 815, "1": 42 } })).await;
    let node = Node::start().await;
    node.register("modbus", &[("/plant-2/meters", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        kalima_device = "modbus"

        [[modbus.devices]]
        name = "boiler"
        kalima_device = "ghost"
        host = "{host}"
        address = "/plant-2/boiler"
        poll_interval_ms = 100

        [[modbus.devices.points]]
        key = "flue-temp"
        register = 0
        unit = "C"

        # Same PLC, written as the adapter-wide device, which exists.
        [[modbus.devices]]
        name = "meter"
        host = "{host}"
        address = "/plant-2/meters"
        poll_interval_ms = 100

        [[modbus.devices.points]]
        key = "count"
        register = 1
        "#,
        host = sim.host(),
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());

    // Not registered: unauthorized, told which device to register, nothing written.
    let st = wait_status(&adapter, "boiler", "unauthorized", |s| s.state == DeviceState::Unauthorized).await;
    assert_eq!(st.kalima_device, "ghost");
    let err = st.last_error.clone().expect("a reason");
    assert!(err.contains("\"ghost\""), "the error names the missing device: {err}");
    assert!(st.polls_ok >= 1, "the PLC itself answers: {st:#?}");
    assert_eq!(st.readings_written, 0);
    assert!(node.latest("/plant-2/boiler", "flue-temp").is_none());
    assert!(node.history("/plant-2/boiler", "flue-temp").await.is_empty());
    // The other device on the same PLC is not affected.
    wait_status(&adapter, "meter", "ok", |s| s.state == DeviceState::Ok).await;
    wait_for("meter count", || node.latest("/plant-2/meters", "count"), describe).await;

    // Registered with a read grant only: still unauthorized, now told about the write grant.
    node.register("ghost", &[("/plant-2", true, false)]).await;
    let st = wait_status(&adapter, "boiler", "refused for lack of a write grant", |s| {
        s.state == DeviceState::Unauthorized && s.last_error.as_deref().is_some_and(|e| e.contains("write grant"))
    })
    .await;
    let err = st.last_error.expect("reason");
    assert!(err.contains("ghost") && err.contains("/plant-2/boiler"), "{err}");
    assert!(node.latest("/plant-2/boiler", "flue-temp").is_none());
    assert_eq!(status(&adapter, "boiler").readings_written, 0);

    // Granted: readings flow, written as ghost.
    node.grant("ghost", "/plant-2", true, true).await;
    let c = wait_for("boiler reading on the chain", || node.latest("/plant-2/boiler", "flue-temp"), describe).await;
    assert_eq!(c.tx.content.device_id, "ghost");
    assert!(json_close(&crate::support::body_json(&c), &reading(json!(815), Some("C"))));
    let st = wait_status(&adapter, "boiler", "ok", |s| s.state == DeviceState::Ok).await;
    assert!(st.readings_written >= 1, "{st:#?}");
}
