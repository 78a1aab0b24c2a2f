//! Modbus RTU over a serial line (a socat pseudo-terminal pair standing in for the RS-485
//! cable): readings, a set-point, and a second unit id on the same line failing on its own.

use kalima_adapter_modbus::{DeviceState, ModbusAdapter};
use serde_json::json;

use crate::support::{ModbusSim, Node, PtyPair, body_json, json_close, reading, section, wait_for, wait_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_readings_and_setpoints_over_a_serial_line() {
    let pty = PtyPair::start().await;
    // 0x0001_E240 = 123456 Wh; 0xFF38 = -200 -> -20.0 C at scale 0.1.
    let _sim = ModbusSim::rtu(
        &pty.a,
        7,
        json!({ "holding": { "0": 0x0001, "1": 0xE240, "10": 0 }, "input": { "5": 0xFF38 } }),
    )
    .await;
    let node = Node::start().await;
    node.register("modbus", &[("/plant-1/energy", true, true)]).await;
    let operator = node.register("operator", &[("/plant-1/energy", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "meter-7"
        transport = "rtu"
        serial_port = "{port}"
        baud_rate = 19200
        unit_id = 7
        address = "/plant-1/energy"
        poll_interval_ms = 200
        timeout_ms = 1000

        [[modbus.devices.points]]
        key = "energy"
        register = 0
        type = "u32"
        unit = "Wh"

        [[modbus.devices.points]]
        key = "temp"
        function = "input_register"
        register = 5
        type = "i16"
        scale = 0.1
        unit = "C"

        [[modbus.devices.points]]
        key = "limit"
        register = 10
        type = "u16"
        writable = true

        # A second unit on the same line that the bus does not have.
        [[modbus.devices]]
        name = "meter-8"
        transport = "rtu"
        serial_port = "{port}"
        baud_rate = 19200
        unit_id = 8
        address = "/plant-1/energy/meter-8"
        poll_interval_ms = 200
        timeout_ms = 1000

        [[modbus.devices.points]]
        key = "energy"
        register = 0
        type = "u32"
        "#,
        port = pty.b,
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());
    let a = "/plant-1/energy";

    for (key, want) in [("energy", reading(json!(123_456), Some("Wh"))), ("temp", reading(json!(-20.0), Some("C")))] {
        let c = wait_for(&format!("{key} over RTU"), || node.latest(a, key), describe).await;
        let got = body_json(&c);
        assert!(json_close(&got, &want), "{key}: got {got}, want {want}");
        assert_eq!(c.tx.content.props.get("modbus_device").map(String::as_str), Some("meter-7"));
    }
    let st = wait_status(&adapter, "meter-7", "ok", |s| s.state == DeviceState::Ok).await;
    assert_eq!(st.transport, "rtu");
    assert_eq!(st.endpoint, pty.b);
    assert_eq!(st.unit_id, 7);

    // A set-point over the serial line, read back by the next poll.
    let out = adapter.write_setpoint(&operator, "meter-7", "limit", &json!(1234)).await.expect("set-point");
    assert_eq!(out.outcome, "written", "{out:?}");
    wait_for("limit 1234 read back over RTU", || node.body(a, "limit").filter(|b| b["value"] == json!(1234)), describe)
        .await;
    let rec = node.latest(a, "limit.setpoint").expect("set-point recorded");
    assert_eq!(body_json(&rec)["outcome"], json!("written"));
    assert_eq!(rec.tx.content.device_id, "operator");

    // The missing unit fails on its own (the sim answers exception 04 for unknown units);
    // the meter sharing its line keeps being polled.
    let m8 = wait_status(&adapter, "meter-8", "failing", |s| s.state == DeviceState::Failing).await;
    assert!(m8.last_error.as_deref().is_some_and(|e| e.contains("exception")), "{m8:#?}");
    let ok = crate::support::status(&adapter, "meter-7").polls_ok;
    wait_status(&adapter, "meter-7", "still polled", |s| s.polls_ok > ok && s.state == DeviceState::Ok).await;
}

/// Several units on one serial line (an RS-485 bus) all answer: the adapter opens the port
/// once and the devices take turns on it, each polled on its own schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_share_one_serial_line() {
    let pty = PtyPair::start().await;
    // Unit 0 makes the simulator answer every unit id, standing in for two meters on one bus.
    let _sim = ModbusSim::rtu(&pty.a, 0, json!({ "holding": { "0": 111, "1": 222 } })).await;
    let node = Node::start().await;
    node.register("modbus", &[("/bus", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "unit-1"
        transport = "rtu"
        serial_port = "{port}"
        unit_id = 1
        address = "/bus/unit-1"
        poll_interval_ms = 150
        [[modbus.devices.points]]
        key = "v"
        register = 0

        [[modbus.devices]]
        name = "unit-2"
        transport = "rtu"
        serial_port = "{port}"
        unit_id = 2
        address = "/bus/unit-2"
        poll_interval_ms = 150
        [[modbus.devices.points]]
        key = "v"
        register = 1
        "#,
        port = pty.b,
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());
    for (address, want) in [("/bus/unit-1", 111), ("/bus/unit-2", 222)] {
        let c = wait_for(&format!("{address} over the shared line"), || node.latest(address, "v"), describe).await;
        assert_eq!(body_json(&c), json!({ "value": want }), "{address}");
    }
    // Both keep polling: neither starves the other on the shared port.
    let before: Vec<u64> = adapter.status().iter().map(|s| s.polls_ok).collect();
    wait_status(&adapter, "unit-2", "more polls", |s| s.polls_ok >= before[1] + 5).await;
    wait_status(&adapter, "unit-1", "more polls", |s| s.polls_ok >= before[0] + 5).await;
    assert!(adapter.status().iter().all(|s| s.state == DeviceState::Ok && s.polls_failed == 0), "{}", describe());
}
