//! Confirmed uplinks are acknowledged: once the readings are committed, the node sends an
//! unconfirmed downlink with the ACK bit in RX1 (1 s after the uplink, same frequency and
//! data rate) through the gateway that heard the device, with a downlink counter that
//! advances and survives a restart. lora-packet checks every downlink's MIC and flags.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{GW1, Harness, TRACKER, config, lora, phy_of, rxpk, txpk_phy};

async fn confirmed(fcnt: u32, payload: &str) -> Vec<u8> {
    phy_of(
        &lora(json!({ "cmd": "uplink", "dev_addr": TRACKER.dev_addr, "nwk_skey": TRACKER.nwk_skey,
            "app_skey": TRACKER.app_skey, "fcnt": fcnt, "fport": 3, "payload": payload, "confirmed": true }))
        .await,
    )
}

async fn parse_downlink(txpk: &Value) -> Value {
    let phy = txpk_phy(txpk);
    lora(json!({ "cmd": "parse", "phy": base64::engine::general_purpose::STANDARD.encode(&phy),
        "nwk_skey": TRACKER.nwk_skey, "app_skey": TRACKER.app_skey }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_uplinks_get_an_ack_after_the_commit() {
    let mut h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    gw.pull().await;
    let up = rxpk(&confirmed(10, "01").await, -60);
    let tmst = up["tmst"].as_u64().unwrap_or_default();
    gw.push_acked(vec![up]).await;
    let txpk = gw.expect_pull_resp().await;
    // The readings were durable before the ACK left.
    assert!(h.node.latest(TRACKER.address, "payload").is_some(), "ACK sent before the reading was committed");
    assert_eq!(txpk["tmst"].as_u64(), Some((tmst + 1_000_000) % (1 << 32)), "RX1 is 1 s after the uplink: {txpk}");
    assert_eq!(txpk["ipol"], true);
    let d = parse_downlink(&txpk).await;
    assert_eq!(d["mic_ok"], true, "{d}");
    assert_eq!(d["ack"], true, "{d}");
    assert_eq!(d["dev_addr"].as_str().map(str::to_ascii_uppercase), Some(TRACKER.dev_addr.to_string()), "{d}");
    assert_eq!(d["fcnt"], 0, "{d}");

    // The next one uses the next downlink counter.
    gw.uplink(&confirmed(11, "02").await, -60).await;
    let d = parse_downlink(&gw.expect_pull_resp().await).await;
    assert_eq!((d["fcnt"].as_u64(), d["ack"].as_bool()), (Some(1), Some(true)), "{d}");

    // An unconfirmed uplink gets no downlink; a replayed confirmed one gets no second ACK.
    gw.uplink(&crate::support::uplink(TRACKER, 12, 3, "03").await, -60).await;
    gw.uplink(&confirmed(11, "02").await, -60).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(gw.pull_resps().is_empty(), "unexpected downlinks: {:?}", gw.pull_resps());

    // The downlink counter never goes back across a restart (devices refuse that); counters
    // are reserved on disk in blocks, so it may jump ahead.
    h.restart().await;
    let gw = h.gateway(GW1).await;
    gw.pull().await;
    gw.uplink(&confirmed(13, "04").await, -60).await;
    let d = parse_downlink(&gw.expect_pull_resp().await).await;
    assert!(d["fcnt"].as_u64().is_some_and(|f| f >= 2), "the counter went back after the restart: {d}");
    assert_eq!(d["mic_ok"], true, "{d}");
}
