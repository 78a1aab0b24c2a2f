//! Who the readings are written as: a device can name its own Kalima device, and a write the
//! chain refuses (no grant) loses that uplink only, not the adapter.

use crate::support::{Abp, GW1, Harness, TRACKER, section, uplink};

const GATE: Abp = Abp {
    dev_eui: "0004A30B001C0A01",
    dev_addr: "26011D01",
    nwk_skey: "44444444444444444444444444444444",
    app_skey: "55555555555555555555555555555555",
    address: "/site/gate-9",
};

const STRAY: Abp = Abp {
    dev_eui: "0004A30B001C0A02",
    dev_addr: "26011D02",
    nwk_skey: "66666666666666666666666666666666",
    app_skey: "77777777777777777777777777777777",
    address: "/nowhere/stray-1",
};

fn device(name: &str, d: Abp, kalima_device: Option<&str>) -> String {
    let who = kalima_device.map(|k| format!("kalima_device = \"{k}\"")).unwrap_or_default();
    format!(
        r#"
        [[lorawan.devices]]
        name = "{name}"
        dev_eui = "{}"
        dev_addr = "{}"
        nwk_skey = "{}"
        app_skey = "{}"
        address = "{}"
        {who}
        "#,
        d.dev_eui, d.dev_addr, d.nwk_skey, d.app_skey, d.address
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_are_written_as_the_configured_kalima_device() {
    let text = [
        format!("[lorawan]\nlisten = \"127.0.0.1:0\"\ngateways = [\"{GW1}\"]\ndedup_window_ms = 100\n"),
        device("gate-9", GATE, Some("gatekeeper")),
        device("stray-1", STRAY, None),
        device("tracker-3", TRACKER, None),
    ]
    .concat();
    // Defaults: kalima_device "lorawan", activation "abp", codec "raw".
    let h = Harness::start(section(&text)).await;
    h.node.register("gatekeeper", &[("/site", true, true)]).await;
    let gw = h.gateway(GW1).await;

    gw.uplink(&uplink(GATE, 1, 1, "01").await, -70).await;
    let tx = h.node.wait_fcnt(GATE.address, "payload", 1).await;
    assert_eq!(tx.tx.content.device_id, "gatekeeper", "the device's own kalima_device");

    // Nobody granted "lorawan" /nowhere: the chain refuses; the next uplink still commits.
    gw.uplink(&uplink(STRAY, 1, 1, "02").await, -70).await;
    gw.uplink(&uplink(TRACKER, 1, 1, "03").await, -70).await;
    let tx = h.node.wait_fcnt(TRACKER.address, "payload", 1).await;
    assert_eq!(tx.tx.content.device_id, "lorawan", "the section's kalima_device");
    crate::support::settle().await;
    assert!(h.node.latest(STRAY.address, "payload").is_none(), "a refused write commits nothing");
}
