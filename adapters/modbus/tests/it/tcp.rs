//! Modbus TCP polling: every data type, byte and word order, scale and offset, the four tables,
//! request joining across gaps, and when readings are written (deadband, refresh).

use kalima_adapter_modbus::{DeviceState, ModbusAdapter};
use serde_json::{Value, json};

use crate::support::{
    ModbusSim, Node, body_json, json_close, reading, section, status, wait_for, wait_status, write_holding,
};

/// One point of the register map and what a plant engineer expects to see on the chain.
struct Expect {
    key: &'static str,
    /// Address relative to the device's address ("" for the device's own).
    sub_address: &'static str,
    register: &'static str,
    value: Value,
    unit: Option<&'static str>,
}

/// The same register map, one device per `max_gap`; the `[[points]]` are the plant's.
fn device_toml(name: &str, host: &str, address: &str, max_gap: u16) -> String {
    format!(
        r#"
        [[modbus.devices]]
        name = "{name}"
        host = "{host}"
        address = "{address}"
        poll_interval_ms = 200
        max_gap = {max_gap}

        [[modbus.devices.points]]
        key = "flow"
        register = 0
        type = "f32"
        unit = "m3/h"

        [[modbus.devices.points]]
        key = "level"
        register = 2
        type = "f32"
        word_order = "little"

        [[modbus.devices.points]]
        key = "oil-temp"
        register = 4
        type = "i16"
        scale = 0.1
        offset = -40.0
        unit = "C"

        [[modbus.devices.points]]
        key = "cycles"
        register = 5
        type = "u32"

        [[modbus.devices.points]]
        key = "energy"
        register = 8
        type = "u64"
        unit = "Wh"

        [[modbus.devices.points]]
        key = "batch"
        register = 20
        type = "string"
        count = 5

        [[modbus.devices.points]]
        key = "running"
        function = "coil"
        register = 2
        type = "bool"

        [[modbus.devices.points]]
        key = "door-open"
        function = "discrete_input"
        register = 5
        type = "bool"

        [[modbus.devices.points]]
        key = "speed"
        address = "{address}/motor"
        function = "input_register"
        register = 3
        type = "u16"
        unit = "rpm"
        "#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_order_reads_as_the_plant_expects() {
    // 123.5f32 = 0x42F7_0000 (ABCD); -2.25f32 = 0xC010_0000 stored CDAB; -123 = 0xFF85;
    // 3e9 = 0xB2D0_5E00; 0x0123_4567_89AB_CDEF is above 2^53, so it must stay an exact integer.
    let sim = ModbusSim::tcp(json!({
        "holding": {
            "0": 0x42F7, "1": 0x0000,
            "2": 0x0000, "3": 0xC010,
            "4": 0xFF85,
            "5": 0xB2D0, "6": 0x5E00,
            // Unused register between points: must never leak into a value.
            "7": 0xFFFF,
            "8": 0x0123, "9": 0x4567, "10": 0x89AB, "11": 0xCDEF,
            "20": 0x5052, "21": 0x4553, "22": 0x532D, "23": 0x3031, "24": 0x0000
        },
        "input": { "3": 1450 },
        "coils": { "2": true },
        "discrete": { "5": true }
    }))
    .await;
    let node = Node::start().await;
    node.register("modbus", &[("/plant", true, true)]).await;
    let host = sim.host();
    let cfg = section(&format!(
        "[modbus]\nkalima_device = \"modbus\"\n{}\n{}",
        device_toml("plc-split", &host, "/plant/press-1", 0),
        device_toml("plc-joined", &host, "/plant/press-2", 1),
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());

    let expected = [
        Expect {
            key: "flow",
            sub_address: "",
            register: "holding_register:0",
            value: json!(123.5),
            unit: Some("m3/h"),
        },
        Expect { key: "level", sub_address: "", register: "holding_register:2", value: json!(-2.25), unit: None },
        Expect {
            key: "oil-temp",
            sub_address: "",
            register: "holding_register:4",
            value: json!(-52.3),
            unit: Some("C"),
        },
        Expect {
            key: "cycles",
            sub_address: "",
            register: "holding_register:5",
            value: json!(3_000_000_000u64),
            unit: None,
        },
        Expect {
            key: "energy",
            sub_address: "",
            register: "holding_register:8",
            value: json!(0x0123_4567_89AB_CDEFu64),
            unit: Some("Wh"),
        },
        Expect { key: "batch", sub_address: "", register: "holding_register:20", value: json!("PRESS-01"), unit: None },
        Expect { key: "running", sub_address: "", register: "coil:2", value: json!(true), unit: None },
        Expect { key: "door-open", sub_address: "", register: "discrete_input:5", value: json!(true), unit: None },
        Expect {
            key: "speed",
            sub_address: "/motor",
            register: "input_register:3",
            value: json!(1450),
            unit: Some("rpm"),
        },
    ];

    // Holding registers 0..7 | gap 7 | 8..12 | gap 12..20 | 20..25, plus one coil, one discrete
    // input and one input register: 6 reads with no gap allowed, 5 when one unused register
    // may be read across (the 8-register gap still splits).
    for (device, address, requests) in [("plc-split", "/plant/press-1", 6), ("plc-joined", "/plant/press-2", 5)] {
        let st = wait_status(&adapter, device, "polled successfully", |s| s.state == DeviceState::Ok).await;
        assert_eq!(st.requests_per_poll, requests, "{device}: fewest reads for the map");
        assert_eq!(st.points, expected.len(), "{device}");
        assert_eq!(st.transport, "tcp");
        assert_eq!(st.endpoint, host);
        assert_eq!(st.kalima_device, "modbus");
        for e in &expected {
            let at = format!("{address}{}", e.sub_address);
            let want = reading(e.value.clone(), e.unit);
            let c = wait_for(
                &format!("{device}: {at}/{} on the chain", e.key),
                || node.latest(&at, e.key),
                || format!("{:#?}", adapter.status()),
            )
            .await;
            let got = body_json(&c);
            assert!(json_close(&got, &want), "{device} {at}/{}: got {got}, want {want}", e.key);
            let props = &c.tx.content.props;
            assert_eq!(props.get("source").map(String::as_str), Some("modbus"), "{device} {}", e.key);
            assert_eq!(props.get("modbus_device").map(String::as_str), Some(device), "{}", e.key);
            assert_eq!(props.get("modbus_register").map(String::as_str), Some(e.register), "{device} {}", e.key);
            assert_eq!(c.tx.content.device_id, "modbus", "written as the configured Kalima device");
            assert!(c.tx.content.client_time_ms.is_some(), "reading carries the poll time");
        }
        let st = status(&adapter, device);
        assert_eq!(st.state, DeviceState::Ok, "{st:#?}");
        assert_eq!(st.readings_invalid, 0, "{st:#?}");
        assert_eq!(st.polls_failed, 0, "{st:#?}");
        assert!(st.last_success_ms.is_some() && st.last_error.is_none(), "{st:#?}");
    }
    assert_eq!(adapter.addresses("plc-split").len(), expected.len());
    assert!(adapter.addresses("plc-split").contains(&"/plant/press-1/motor".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadband_holds_back_small_moves_and_refresh_rewrites_stable_values() {
    let sim = ModbusSim::tcp(json!({ "holding": { "0": 100, "1": 7, "2": 50 } })).await;
    let addr = sim.addr.expect("tcp");
    let node = Node::start().await;
    node.register("modbus", &[("/plant", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "tank"
        host = "{addr}"
        address = "/plant/tank-1"
        poll_interval_ms = 100

        [[modbus.devices.points]]
        key = "level"
        register = 0
        unit = "cm"
        deadband = 5

        [[modbus.devices.points]]
        key = "pulses"
        register = 1

        [[modbus.devices.points]]
        key = "temp"
        register = 2
        deadband = 5
        refresh_secs = 1
        "#
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let a = "/plant/tank-1";
    let describe = || format!("{:#?}", adapter.status());

    // The first reading is always written, once.
    let first = wait_for("the first level reading", || node.latest(a, "level"), describe).await;
    assert!(json_close(&body_json(&first), &reading(json!(100), Some("cm"))));

    // A move of 3 is within the deadband of 5: several polls pass and nothing is written.
    write_holding(addr, 0, 103).await;
    let p0 = status(&adapter, "tank").polls_ok;
    wait_status(&adapter, "tank", "3 more polls", |s| s.polls_ok >= p0 + 3).await;
    let now = node.latest(a, "level").expect("level");
    assert_eq!(now.id, first.id, "level must not be rewritten for a move within the deadband");
    assert_eq!(now.tx.sequence, first.tx.sequence);
    assert_eq!(node.history(a, "level").await.len(), 1);
    assert!(status(&adapter, "tank").readings_unchanged > 0);

    // A point without a deadband gets a transaction every poll: between two status samples
    // its history grows exactly with the successful polls.
    let before = status(&adapter, "tank").polls_ok;
    let pulses = node.history(a, "pulses").await.len() as u64;
    let after = status(&adapter, "tank").polls_ok;
    // (At most one poll is between its commit and its count when the samples are taken.)
    assert!(before <= pulses && pulses <= after + 1, "pulses written {pulses} times in {before}..={after} polls");
    assert!(pulses >= 4, "pulses written on every poll, got {pulses}");

    // An unchanged value is rewritten once refresh_secs has passed, yet not on every poll.
    let t0 = wait_for("the first temp reading", || node.latest(a, "temp"), describe).await;
    let refreshed =
        wait_for("temp rewritten after refresh_secs", || node.latest(a, "temp").filter(|c| c.id != t0.id), describe)
            .await;
    assert!(json_close(&body_json(&refreshed), &reading(json!(50), None)));
    let temp_writes = node.history(a, "temp").await.len();
    let pulse_writes = node.history(a, "pulses").await.len();
    assert!(temp_writes >= 2, "refresh rewrote temp");
    assert!(
        temp_writes < pulse_writes,
        "temp ({temp_writes}) is not rewritten every poll like pulses ({pulse_writes})"
    );

    // A move of 10 leaves the deadband: the new value is written.
    write_holding(addr, 0, 110).await;
    let moved = wait_for(
        "level 110 on the chain",
        || node.latest(a, "level").filter(|c| body_json(c)["value"] == json!(110)),
        describe,
    )
    .await;
    assert!(moved.tx.sequence > first.tx.sequence);
    assert_eq!(node.history(a, "level").await.len(), 2, "exactly one new level transaction");
}
