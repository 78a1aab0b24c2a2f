//! One uplink heard by several gateways: committed once, credited to the strongest reception,
//! with the number of gateways that heard it; a late copy is not committed again.

use crate::support::{GW1, GW2, GW3, Harness, SOIL, config, prop, rxpk, settle, uplink};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_from_three_gateways_commit_once_from_the_strongest() {
    // A wide window: the three copies must land inside it even on a busy machine.
    let h = Harness::start(config(1500)).await;
    let (g1, g2, g3) = (h.gateway(GW1).await, h.gateway(GW2).await, h.gateway(GW3).await);

    let phy = uplink(SOIL, 10, 1, "03670110056700ff").await;
    let mut strong = rxpk(&phy, -48);
    strong["lsnr"] = serde_json::json!(9.0);
    strong["tmst"] = serde_json::json!(2_000_123u32);
    g1.uplink(&phy, -112).await;
    g2.push_acked(vec![strong]).await;
    g3.uplink(&phy, -87).await;

    let tx = h.node.wait_fcnt(SOIL.address, "temperature-3", 10).await;
    h.node.wait_fcnt(SOIL.address, "temperature-5", 10).await;
    assert_eq!(prop(&tx, "lorawan_gateways"), "3");
    assert_eq!(prop(&tx, "lorawan_gateway"), GW2.to_ascii_lowercase(), "credited to the strongest reception");
    assert_eq!(prop(&tx, "lorawan_rssi"), "-48");
    assert_eq!(prop(&tx, "lorawan_snr"), "9");

    // A copy arriving after the window (a slow backhaul) is a duplicate, not a new reading;
    // the next uplink is the barrier that shows the copy was handled.
    g1.uplink(&phy, -112).await;
    let next = uplink(SOIL, 11, 1, "03670111056700fe").await;
    g3.uplink(&next, -80).await;
    let tx = h.node.wait_fcnt(SOIL.address, "temperature-3", 11).await;
    h.node.wait_fcnt(SOIL.address, "temperature-5", 11).await;
    assert_eq!(prop(&tx, "lorawan_gateways"), "1");
    assert_eq!(prop(&tx, "lorawan_gateway"), GW3.to_ascii_lowercase());
    settle().await;

    for key in ["temperature-3", "temperature-5"] {
        assert_eq!(h.node.fcnts(SOIL.address, key).await, [10, 11], "{key}: one transaction per uplink");
    }
}
