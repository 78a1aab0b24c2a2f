//! Over-the-air activation: a join request answered in the RX1 window through the gateway that
//! opened a downlink path, a join accept the device (lora-packet) can open, a session that
//! works, replays answered with silence, and the session persisted.

use serde_json::{Value, json};

use crate::support::{
    GW1, GW2, Harness, METER, NET_ID, Otaa, body_json, config, join_accept_decode, join_request, json_close, keys_of,
    prop, rxpk, settle, txpk_phy, uplink, wait_for,
};

/// What the device makes of the join accept in `txpk`, checked as a device would.
pub(crate) async fn open_accept(txpk: &Value, device: Otaa, dev_nonce: &str) -> Value {
    let phy = txpk_phy(txpk);
    let decoded = join_accept_decode(&phy, device.app_key, dev_nonce).await;
    assert_eq!(decoded["mic_ok"], true, "the join accept's MIC must check with the AppKey: {decoded}");
    assert_eq!(decoded["net_id"], NET_ID, "the configured NetID: {decoded}");
    let dev_addr = u32::from_str_radix(decoded["dev_addr"].as_str().unwrap_or_default(), 16)
        .unwrap_or_else(|e| panic!("dev_addr of {decoded}: {e}"));
    let net_id = u32::from_str_radix(NET_ID, 16).expect("NET_ID is hex");
    assert_eq!(dev_addr >> 25, net_id & 0x7f, "the DevAddr starts with the NwkID of the NetID: {decoded}");
    decoded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otaa_join_gives_a_working_session_and_replays_get_no_answer() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    // A second gateway hears the join weaker and has no downlink path: the answer goes via GW1.
    let deaf = h.gateway(GW2).await;
    gw.pull().await;

    let request = join_request(METER, "A1B2").await;
    let mut rx = rxpk(&request, -75);
    rx["tmst"] = json!(1_234_567u32);
    rx["freq"] = json!(868.3);
    rx["datr"] = json!("SF9BW125");
    gw.push_acked(vec![rx]).await;
    deaf.uplink(&request, -110).await;

    let txpk = gw.expect_pull_resp().await;
    assert_eq!(txpk["tmst"], 1_234_567 + 5_000_000, "RX1 opens 5 s after the join request: {txpk}");
    assert_eq!(txpk["freq"], 868.3, "RX1 on the uplink's frequency: {txpk}");
    assert_eq!(txpk["datr"], "SF9BW125", "RX1 at the uplink's data rate: {txpk}");
    assert_eq!(txpk["ipol"], true, "downlinks use inverted polarity: {txpk}");
    assert_eq!(txpk["modu"], "LORA", "{txpk}");
    assert_eq!(txpk["imme"], false, "sent at tmst, not immediately: {txpk}");
    assert_eq!(txpk["powe"], 14, "downlink_power_dbm: {txpk}");
    let decoded = open_accept(&txpk, METER, "A1B2").await;
    let keys = keys_of(&decoded);

    // The first uplink of the new session, built with the keys lora-packet derived.
    gw.uplink(&uplink(keys.clone(), 0, 2, "000003e8a003").await, -75).await;
    let tx = h.node.wait_fcnt(METER.address, "volume", 0).await;
    assert!(json_close(&body_json(&tx), &json!({ "value": 1.0, "unit": "m3" })), "{}", body_json(&tx));
    assert_eq!(prop(&tx, "lorawan_dev_eui"), METER.dev_eui.to_ascii_lowercase());
    assert_eq!(prop(&tx, "lorawan_dev_addr"), keys.dev_addr.to_ascii_lowercase());
    for flag in ["leak", "tamper"] {
        let tx = h.node.wait_fcnt(METER.address, flag, 0).await;
        assert_eq!(body_json(&tx), json!({ "value": true }), "{flag}");
    }

    // The same join request again (same DevNonce): no join accept. The next uplink is the barrier.
    gw.uplink(&request, -75).await;
    gw.uplink(&uplink(keys.clone(), 1, 2, "000007d0a000").await, -75).await;
    h.node.wait_fcnt(METER.address, "volume", 1).await;
    settle().await;
    assert!(gw.pull_resps().is_empty(), "a replayed join request must not be answered: {:02x?}", gw.pull_resps());
    assert!(deaf.pull_resps().is_empty(), "only the gateway with a downlink path answers");

    let sessions = h.sessions_path();
    let saved = std::fs::read_to_string(&sessions).unwrap_or_else(|e| panic!("{}: {e}", sessions.display()));
    assert!(saved.contains(&METER.dev_eui.to_ascii_lowercase()), "the session is saved: {saved}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sessions).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "session keys are readable by the node only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_replaces_the_session() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    gw.pull().await;

    gw.uplink(&join_request(METER, "0001").await, -80).await;
    let old = keys_of(&open_accept(&gw.expect_pull_resp().await, METER, "0001").await);
    gw.uplink(&uplink(old.clone(), 0, 2, "000000010000").await, -80).await;
    h.node.wait_fcnt(METER.address, "volume", 0).await;

    gw.uplink(&join_request(METER, "0002").await, -80).await;
    let new = keys_of(&open_accept(&gw.expect_pull_resp().await, METER, "0002").await);
    assert_ne!(old, new, "a new join gives a new session");

    // The old session is gone; the new one works from counter 0.
    gw.uplink(&uplink(old.clone(), 1, 2, "000000020000").await, -80).await;
    gw.uplink(&uplink(new.clone(), 0, 2, "000000030000").await, -80).await;
    let dev_addr_of = |c: &kalima_core::CommittedTx| prop(c, "lorawan_dev_addr").to_string();
    let new_addr = new.dev_addr.to_ascii_lowercase();
    wait_for(
        "the new session's first uplink",
        || h.node.latest(METER.address, "volume").filter(|c| dev_addr_of(c) == new_addr),
        || format!("{:#?}", h.node.latest(METER.address, "volume").map(|c| c.tx.content.props.clone())),
    )
    .await;
    settle().await;
    let history: Vec<(String, Value)> = h
        .node
        .history(METER.address, "volume")
        .await
        .iter()
        .rev()
        .map(|c| (dev_addr_of(c), body_json(c)["value"].clone()))
        .collect();
    assert_eq!(
        history,
        [(old.dev_addr.to_ascii_lowercase(), json!(0.001)), (new_addr, json!(0.003))],
        "nothing from the old session's keys after the rejoin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_requests_that_do_not_match_the_config_are_not_answered() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    gw.pull().await;

    let wrong_key = Otaa { app_key: "00112233445566778899AABBCCDDEEFF", ..METER };
    let wrong_app_eui = Otaa { app_eui: "70B3D57ED0000001", ..METER };
    let unknown = Otaa { dev_eui: "0011223344556677", ..METER };
    // An ABP device's DevEUI: it has no AppKey to join with.
    let abp = Otaa { dev_eui: crate::support::TRACKER.dev_eui, ..METER };
    for (i, d) in [wrong_key, wrong_app_eui, unknown, abp].into_iter().enumerate() {
        gw.uplink(&join_request(d, &format!("00{i:02X}")).await, -70).await;
    }

    // The genuine device is answered, once, with an accept its own AppKey opens.
    gw.uplink(&join_request(METER, "0F0F").await, -70).await;
    let txpk = gw.expect_pull_resp().await;
    open_accept(&txpk, METER, "0F0F").await;
    settle().await;
    assert!(gw.pull_resps().is_empty(), "only the genuine join request is answered: {:02x?}", gw.pull_resps());
}
