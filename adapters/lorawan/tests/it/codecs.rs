//! ABP uplinks through each payload codec: what lands on the chain (keys, bodies) and the radio
//! provenance an integrator finds in the props; undecodable payloads are kept raw.

use serde_json::{Value, json};

use crate::support::{Abp, GW1, Harness, SOIL, TRACKER, VALVE, body_json, config, json_close, prop, uplink};

/// One uplink and what an integrator expects to find for it.
struct Case {
    name: &'static str,
    device: Abp,
    /// Kalima device name and DevEUI as the props must show them.
    device_name: &'static str,
    fcnt: u32,
    fport: u8,
    payload: &'static str,
    rssi: i32,
    /// `(key, body)` of every transaction the uplink gives.
    expect: Vec<(&'static str, Value)>,
    /// A `lorawan_codec_error` prop that must contain this text.
    codec_error: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "Cayenne LPP: two temperature channels",
            device: SOIL,
            device_name: "soil-1",
            fcnt: 1,
            fport: 1,
            payload: "03670110056700ff",
            rssi: -57,
            expect: vec![
                ("temperature-3", json!({ "value": 27.2, "unit": "C" })),
                ("temperature-5", json!({ "value": 25.5, "unit": "C" })),
            ],
            codec_error: None,
        },
        Case {
            name: "Cayenne LPP: negative temperature and humidity",
            device: SOIL,
            device_name: "soil-1",
            fcnt: 2,
            fport: 1,
            payload: "0367ffd7066861",
            rssi: -90,
            expect: vec![
                ("temperature-3", json!({ "value": -4.1, "unit": "C" })),
                ("humidity-6", json!({ "value": 48.5, "unit": "%" })),
            ],
            codec_error: None,
        },
        Case {
            name: "fields: u32 with scale, u8 with scale, two bool bits",
            device: VALVE,
            device_name: "valve-2",
            fcnt: 7,
            fport: 2,
            // volume 123456 * 0.001, battery 175 * 0.02, flags 0b0000_0101.
            payload: "0001e240af05",
            rssi: -101,
            expect: vec![
                ("volume", json!({ "value": 123.456, "unit": "m3" })),
                ("battery", json!({ "value": 3.5, "unit": "V" })),
                ("leak", json!({ "value": true })),
                ("tamper", json!({ "value": false })),
            ],
            codec_error: None,
        },
        Case {
            name: "raw: the payload as hex with its FPort",
            device: TRACKER,
            device_name: "tracker-3",
            fcnt: 3,
            fport: 9,
            payload: "deadbeef01",
            rssi: -120,
            expect: vec![("payload", json!({ "fport": 9, "payload": "deadbeef01" }))],
            codec_error: None,
        },
        Case {
            name: "truncated Cayenne LPP is kept raw with the reason",
            device: SOIL,
            device_name: "soil-1",
            fcnt: 3,
            fport: 1,
            payload: "036701",
            rssi: -60,
            expect: vec![("payload", json!({ "fport": 1, "payload": "036701" }))],
            codec_error: Some("channel 3"),
        },
        Case {
            name: "fields payload too short is kept raw with the reason",
            device: VALVE,
            device_name: "valve-2",
            fcnt: 8,
            fport: 2,
            payload: "0001e2",
            rssi: -70,
            expect: vec![("payload", json!({ "fport": 2, "payload": "0001e2" }))],
            codec_error: Some("volume"),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abp_uplinks_are_decoded_by_each_codec_with_radio_provenance() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    for c in cases() {
        let phy = uplink(c.device, c.fcnt, c.fport, c.payload).await;
        let mut rx = crate::support::rxpk(&phy, c.rssi);
        rx["freq"] = json!(867.5);
        rx["datr"] = json!("SF10BW125");
        rx["lsnr"] = json!(-3.25);
        // The ACK must echo this datagram's token (push_acked waits for exactly that).
        gw.push_acked(vec![rx]).await;
        for (key, want) in &c.expect {
            let tx = h.node.wait_fcnt(c.device.address, key, c.fcnt).await;
            let body = body_json(&tx);
            assert!(json_close(&body, want), "{}: {key} = {body}, want {want}", c.name);
            let content = &tx.tx.content;
            assert_eq!(content.device_id, "lorawan", "{}: written as the configured Kalima device", c.name);
            let props = [
                ("source", "lorawan".to_string()),
                ("lorawan_device", c.device_name.to_string()),
                ("lorawan_dev_eui", c.device.dev_eui.to_ascii_lowercase()),
                ("lorawan_dev_addr", c.device.dev_addr.to_ascii_lowercase()),
                ("lorawan_fcnt", c.fcnt.to_string()),
                ("lorawan_fport", c.fport.to_string()),
                ("lorawan_gateway", GW1.to_ascii_lowercase()),
                ("lorawan_gateways", "1".to_string()),
                ("lorawan_rssi", c.rssi.to_string()),
                ("lorawan_snr", "-3.25".to_string()),
                ("lorawan_freq", "867.5".to_string()),
                ("lorawan_datr", "SF10BW125".to_string()),
            ];
            for (name, want) in props {
                assert_eq!(prop(&tx, name), want, "{}: {key} prop {name}", c.name);
            }
            match c.codec_error {
                None => assert!(
                    !content.props.contains_key("lorawan_codec_error"),
                    "{}: unexpected codec error {:?}",
                    c.name,
                    content.props.get("lorawan_codec_error")
                ),
                Some(want) => {
                    let got = prop(&tx, "lorawan_codec_error");
                    assert!(got.contains(want), "{}: codec error {got:?} should name {want:?}", c.name);
                }
            }
        }
    }
}
