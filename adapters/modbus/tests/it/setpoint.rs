//! Set-points: a granted requester writes engineering values that reach the device's registers
//! encoded (scale, word order, coils), every attempt the device saw is recorded on the chain as
//! the requester, and refused requests touch neither the device nor the chain.

use kalima_adapter_modbus::decode::EncodeError;
use kalima_adapter_modbus::{DeviceState, ModbusAdapter, SetpointError};
use serde_json::{Value, json};

use crate::support::{
    ModbusSim, Node, SilentDevice, body_json, json_close, read_coil, read_holding, section, wait_for, wait_status,
};

const PRESS: &str = "/plant-1/press-1";
const DEAD: &str = "/plant-1/press-2";

/// What a refused set-point must come back as.
#[derive(Debug)]
enum Refusal {
    Forbidden,
    NotWritable,
    Invalid,
    NotFound,
}

fn refusal_of(e: &SetpointError) -> Refusal {
    match e {
        SetpointError::Forbidden { .. } => Refusal::Forbidden,
        SetpointError::NotWritable(_) => Refusal::NotWritable,
        SetpointError::Invalid(_) => Refusal::Invalid,
        SetpointError::NotFound(_) => Refusal::NotFound,
        SetpointError::Record(e) => panic!("unexpected chain error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setpoints_reach_the_device_and_are_recorded_as_the_requester() {
    let sim = ModbusSim::tcp(json!({ "holding": { "10": 0, "12": 0, "13": 500 }, "input": { "0": 250 } })).await;
    let addr = sim.addr.expect("tcp");
    let silent = SilentDevice::start().await;
    let node = Node::start().await;
    node.register("modbus", &[("/plant-1", true, true)]).await;
    let operator = node.register("operator", &[(PRESS, true, true), (DEAD, true, true)]).await;
    let viewer = node.register("viewer", &[("/plant-1", true, false)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "press-plc"
        host = "{addr}"
        address = "{PRESS}"
        poll_interval_ms = 200

        [[modbus.devices.points]]
        key = "pressure-setpoint"
        register = 10
        type = "u16"
        scale = 0.1
        unit = "bar"
        writable = true

        [[modbus.devices.points]]
        key = "cycles"
        register = 12
        type = "u32"

        [[modbus.devices.points]]
        key = "ratio"
        register = 14
        type = "f32"
        word_order = "little"
        writable = true

        [[modbus.devices.points]]
        key = "pump"
        function = "coil"
        register = 0
        type = "bool"
        writable = true

        [[modbus.devices.points]]
        key = "oil-temp"
        function = "input_register"
        register = 0
        type = "i16"
        scale = 0.1

        # A PLC that accepts the connection and never answers.
        [[modbus.devices]]
        name = "dead-plc"
        host = "{silent}"
        address = "{DEAD}"
        poll_interval_ms = 200
        timeout_ms = 500

        [[modbus.devices.points]]
        key = "pressure-setpoint"
        register = 10
        type = "u16"
        writable = true
        "#,
        silent = silent.addr,
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());
    wait_status(&adapter, "press-plc", "polled", |s| s.state == DeviceState::Ok).await;

    // Granted requester, writable point: written, scale applied on the wire, recorded as it.
    let out =
        adapter.write_setpoint(&operator, "press-plc", "pressure-setpoint", &json!(4.2)).await.expect("set-point");
    assert_eq!(out.outcome, "written", "{out:?}");
    assert!(out.error.is_none(), "{out:?}");
    assert_eq!(out.address, PRESS);
    assert_eq!(out.key, "pressure-setpoint.setpoint");
    assert_eq!(read_holding(addr, 10, 1).await, vec![42], "4.2 bar at scale 0.1 is raw 42");
    let rec = node.latest(PRESS, "pressure-setpoint.setpoint").expect("set-point recorded on the chain");
    assert_eq!(hex::encode(rec.id), out.tx_id);
    assert_eq!(rec.tx.content.device_id, "operator", "recorded as the requester, not the adapter");
    assert_eq!(body_json(&rec), json!({ "value": 4.2, "outcome": "written", "device": "press-plc" }));
    let props = &rec.tx.content.props;
    assert_eq!(props.get("source").map(String::as_str), Some("modbus"));
    assert_eq!(props.get("modbus_device").map(String::as_str), Some("press-plc"));
    assert_eq!(props.get("modbus_register").map(String::as_str), Some("holding_register:10"));
    // The polled point shows what the device now holds.
    wait_for(
        "the polled set-point to read 4.2 bar",
        || node.body(PRESS, "pressure-setpoint").filter(|b| json_close(b, &json!({ "value": 4.2, "unit": "bar" }))),
        describe,
    )
    .await;

    // Multi-register set-points honour the word order (1.5f32 = 0x3FC0_0000, stored CDAB).
    let out = adapter.write_setpoint(&operator, "press-plc", "ratio", &json!(1.5)).await.expect("set-point");
    assert_eq!(out.outcome, "written", "{out:?}");
    assert_eq!(read_holding(addr, 14, 2).await, vec![0x0000, 0x3FC0]);
    wait_for("ratio 1.5 polled", || node.body(PRESS, "ratio").filter(|b| b["value"] == json!(1.5)), describe).await;

    // Coils.
    let out = adapter.write_setpoint(&operator, "press-plc", "pump", &json!(true)).await.expect("set-point");
    assert_eq!(out.outcome, "written", "{out:?}");
    assert!(read_coil(addr, 0).await, "coil 0 switched on");
    wait_for("pump on polled", || node.body(PRESS, "pump").filter(|b| b["value"] == json!(true)), describe).await;

    // Refusals: nothing reaches the device and nothing is recorded.
    let records = node.history(PRESS, "pressure-setpoint.setpoint").await.len();
    let cases: [(&str, &kalima_core::registry::Device, &str, &str, Value, Refusal); 9] = [
        ("read-only requester", &viewer, "press-plc", "pressure-setpoint", json!(9.9), Refusal::Forbidden),
        ("input register", &operator, "press-plc", "oil-temp", json!(1), Refusal::NotWritable),
        ("holding register not marked writable", &operator, "press-plc", "cycles", json!(5), Refusal::NotWritable),
        ("above the u16 range after scale", &operator, "press-plc", "pressure-setpoint", json!(7000), Refusal::Invalid),
        ("below zero for u16", &operator, "press-plc", "pressure-setpoint", json!(-1), Refusal::Invalid),
        ("text for a number", &operator, "press-plc", "pressure-setpoint", json!("high"), Refusal::Invalid),
        ("2 for a coil", &operator, "press-plc", "pump", json!(2), Refusal::Invalid),
        ("unknown device", &operator, "nope", "pressure-setpoint", json!(1), Refusal::NotFound),
        ("unknown point", &operator, "press-plc", "nope", json!(1), Refusal::NotFound),
    ];
    for (name, who, device, key, value, want) in cases {
        let err = adapter.write_setpoint(who, device, key, &value).await.expect_err(name);
        let got = refusal_of(&err);
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{name}: {err}");
        assert_eq!(read_holding(addr, 10, 1).await, vec![42], "{name}: register unchanged");
        assert_eq!(node.history(PRESS, "pressure-setpoint.setpoint").await.len(), records, "{name}: no record");
        assert!(node.latest(PRESS, &format!("{key}.setpoint")).is_none_or(|c| c.tx.content.device_id == "operator"));
    }
    // The refusals say why, precisely enough to act on.
    match adapter.write_setpoint(&viewer, "press-plc", "pressure-setpoint", &json!(1)).await {
        Err(SetpointError::Forbidden { device, address }) => {
            assert_eq!(device, "viewer");
            assert_eq!(address, PRESS);
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
    match adapter.write_setpoint(&operator, "press-plc", "pressure-setpoint", &json!(7000)).await {
        Err(SetpointError::Invalid(EncodeError::OutOfRange { ty, .. })) => assert_eq!(ty, "u16"),
        other => panic!("expected OutOfRange, got {other:?}"),
    }

    // A device that does not answer: the set-point fails, and the attempt is still on the chain.
    let out = adapter.write_setpoint(&operator, "dead-plc", "pressure-setpoint", &json!(3)).await.expect("recorded");
    assert_eq!(out.outcome, "failed", "{out:?}");
    let error = out.error.clone().expect("a failed set-point says why");
    assert!(!error.is_empty());
    let rec = node.latest(DEAD, "pressure-setpoint.setpoint").expect("failed set-point recorded");
    assert_eq!(hex::encode(rec.id), out.tx_id);
    assert_eq!(rec.tx.content.device_id, "operator");
    assert_eq!(body_json(&rec), json!({ "value": 3, "outcome": "failed", "device": "dead-plc", "error": error }));
    // The hung PLC does not hold back the good one.
    let ok = crate::support::status(&adapter, "press-plc").polls_ok;
    wait_status(&adapter, "press-plc", "still polled", |s| s.polls_ok > ok && s.state == DeviceState::Ok).await;
}

/// The chain's record of a set-point must match what the device saw, even when the device is
/// too busy (a slow poll ahead of the write) for the write to start while the requester waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setpoint_recorded_as_failed_never_reaches_the_device() {
    use std::sync::atomic::Ordering;
    // Five reads of 900 ms each: one poll takes 4.5 s, longer than a write may wait to start (3 s).
    let plc = crate::support::SlowDevice::start(std::time::Duration::from_millis(900)).await;
    let node = Node::start().await;
    node.register("modbus", &[("/plant-3", true, true)]).await;
    let operator = node.register("operator", &[("/plant-3", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "slow-plc"
        host = "{addr}"
        address = "/plant-3"
        poll_interval_ms = 100
        timeout_ms = 1000
        [[modbus.devices.points]]
        key = "setpoint"
        register = 0
        writable = true
        [[modbus.devices.points]]
        key = "a"
        register = 10
        [[modbus.devices.points]]
        key = "b"
        register = 20
        [[modbus.devices.points]]
        key = "c"
        function = "input_register"
        register = 0
        [[modbus.devices.points]]
        key = "d"
        function = "input_register"
        register = 10
        "#,
        addr = plc.addr,
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());
    wait_for("the first poll to start", || (plc.reads.load(Ordering::SeqCst) >= 1).then_some(()), describe).await;
    let out = adapter.write_setpoint(&operator, "slow-plc", "setpoint", &json!(77)).await.expect("recorded");
    let rec = node.latest("/plant-3", "setpoint.setpoint").expect("recorded on the chain");
    assert_eq!(body_json(&rec)["outcome"], json!(out.outcome));
    // Let the device answer fast again and give the adapter many polls to act on anything queued.
    plc.read_delay_ms.store(0, Ordering::SeqCst);
    let ok = crate::support::status(&adapter, "slow-plc").polls_ok;
    wait_status(&adapter, "slow-plc", "10 more polls", |s| s.polls_ok >= ok + 10).await;
    let writes = plc.writes.lock().clone();
    assert_eq!(
        !writes.is_empty(),
        out.outcome == "written",
        "the chain says {:?} ({:?}) but the device received {writes:?}",
        out.outcome,
        out.error
    );
}
