//! The packet-forwarder endpoint: only allow-listed gateways are answered and heard, and no
//! datagram, however broken, stops the adapter.

use serde_json::json;

use crate::support::{GW1, GW2, Harness, PULL_ACK, PUSH_ACK, TRACKER, config, rxpk, settle, uplink};

const KEY: &str = "payload";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_outside_the_allow_list_are_ignored() {
    let h = Harness::start(config(100)).await;
    let stranger = h.gateway("0102030405060708").await;
    let gw = h.gateway(GW2).await;

    // A perfectly good uplink, but through a gateway nobody listed.
    let unheard = stranger.push(vec![rxpk(&uplink(TRACKER, 1, 3, "aa").await, -40)]).await;
    stranger.send_raw(&[2, 0x77, 0x01, 2, 1, 2, 3, 4, 5, 6, 7, 8]).await;

    // The same device's next uplink through a listed gateway is the barrier.
    gw.uplink(&uplink(TRACKER, 2, 3, "bb").await, -90).await;
    h.node.wait_fcnt(TRACKER.address, KEY, 2).await;
    settle().await;

    assert!(!stranger.has_ack(unheard, PUSH_ACK), "an unknown gateway must not get a PUSH_ACK");
    assert!(!stranger.has_ack(0x7701, PULL_ACK), "an unknown gateway must not get a PULL_ACK");
    assert_eq!(h.node.fcnts(TRACKER.address, KEY).await, [2], "nothing heard through an unknown gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_never_stop_the_adapter() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;

    // Garbage, headers cut short, an unknown version and identifier, a server-only datagram,
    // PUSH_DATA bodies that are not the protocol's JSON, an oversized datagram.
    for d in [
        b"\xde\xad\xbe\xef garbage".to_vec(),
        vec![],
        vec![2],
        vec![2, 0x12],
        vec![2, 0x12, 0x34],
        vec![2, 0x12, 0x34, 0, 0xAA, 0x55],
        vec![3, 0x12, 0x34, 0, 0xAA, 0x55, 0x5A, 0, 0, 0, 1, 1],
        vec![2, 0x12, 0x34, 0x09],
        vec![2, 0x12, 0x34, 3, b'{', b'}'],
        vec![0xFF; 9000],
    ] {
        gw.send_raw(&d).await;
    }
    for body in [&b"{not json"[..], b"", b"[]", br#"{"rxpk":"no"}"#, br#"{"rxpk":[{"tmst":"x"}]}"#] {
        gw.push_body(body).await;
    }

    // The gateway's periodic status report carries no rxpk and is acknowledged like any PUSH_DATA,
    // or the gateway would believe the server gone.
    let stat = json!({ "stat": { "time": "2026-11-21 10:00:00 UTC", "rxnb": 2, "rxok": 2, "rxfw": 2, "ackr": 100.0, "dwnb": 0, "txnb": 0 } });
    let token = gw.push_body(stat.to_string().as_bytes()).await;
    gw.expect_ack(token, PUSH_ACK).await;

    // Entries with a good frame but bad metadata: the datagram is answered, the frame unheard.
    let second = uplink(TRACKER, 2, 3, "02").await;
    let mut size_mismatch = rxpk(&second, -80);
    size_mismatch["size"] = json!(second.len() + 1);
    gw.push_acked(vec![size_mismatch]).await;
    let mut not_base64 = rxpk(&second, -80);
    not_base64["data"] = json!("!!!");
    gw.push_acked(vec![not_base64]).await;

    let third = uplink(TRACKER, 3, 3, "03").await;
    let mut crc_failed = rxpk(&third, -80);
    crc_failed["stat"] = json!(-1);
    gw.push_acked(vec![crc_failed]).await;

    // The same frame received with a good CRC is heard: the bad copy did not poison it.
    gw.uplink(&third, -80).await;
    let tx = h.node.wait_fcnt(TRACKER.address, KEY, 3).await;
    assert_eq!(crate::support::prop(&tx, "lorawan_gateways"), "1", "the CRC-failed copy is not counted");

    // A bad entry does not hide a good one in the same datagram.
    let fourth = uplink(TRACKER, 4, 3, "04").await;
    let mut bad_modu = rxpk(&fourth, -80);
    bad_modu["modu"] = json!("GFSK");
    gw.push_acked(vec![bad_modu, rxpk(&fourth, -81)]).await;
    h.node.wait_fcnt(TRACKER.address, KEY, 4).await;

    // A LoRaWAN frame that is not one (too short, a downlink, a join accept sent up).
    for phy in [vec![0x40, 1, 2], vec![0x60, 0, 0x1C, 1, 0x26, 0, 5, 0, 1, 1, 2, 3, 4], vec![0x20; 17]] {
        gw.uplink(&phy, -80).await;
    }

    let fifth = uplink(TRACKER, 5, 3, "05").await;
    gw.uplink(&fifth, -80).await;
    h.node.wait_fcnt(TRACKER.address, KEY, 5).await;
    settle().await;
    assert_eq!(h.node.fcnts(TRACKER.address, KEY).await, [3, 4, 5]);
}
