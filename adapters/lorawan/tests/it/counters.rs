//! Frame counters and MICs: replays and lower counters are refused, the 16-bit counter on air
//! rolls over into a 32-bit one, frames with a wrong key or an unknown DevAddr commit nothing,
//! and none of it stops the adapter.

use crate::support::{GW1, Harness, Keys, TRACKER, config, prop, settle, uplink};

const KEY: &str = "payload";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_roll_over_to_32_bits_and_replays_are_refused() {
    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    let addr = TRACKER.address;

    let first = uplink(TRACKER, 1, 5, "01").await;
    gw.uplink(&first, -70).await;
    h.node.wait_fcnt(addr, KEY, 1).await;

    // The same frame again (a gateway resending, or someone replaying it): not a new reading.
    gw.uplink(&first, -70).await;

    // 65535, then 65536 whose frame carries 0, then 70000 which carries 4464.
    for (fcnt, payload) in [(65_535u32, "02"), (65_536, "03"), (70_000, "04")] {
        gw.uplink(&uplink(TRACKER, fcnt, 5, payload).await, -70).await;
        let tx = h.node.wait_fcnt(addr, KEY, fcnt).await;
        assert_eq!(prop(&tx, "lorawan_fcnt"), fcnt.to_string(), "the full 32-bit counter");
        let body = crate::support::body_json(&tx);
        assert_eq!(body["payload"], payload, "FCnt {fcnt}: decrypted with the full counter");
    }

    // A lower counter of the current era (a recorded frame) and one of the first era.
    gw.uplink(&uplink(TRACKER, 69_999, 5, "05").await, -70).await;
    gw.uplink(&uplink(TRACKER, 2, 5, "06").await, -70).await;
    // The next counter signed with a wrong NwkSKey (and AppSKey): the MIC fails.
    let forged = Keys {
        dev_addr: TRACKER.dev_addr.into(),
        nwk_skey: "33333333333333333333333333333333".into(),
        app_skey: TRACKER.app_skey.into(),
    };
    gw.uplink(&uplink(forged, 70_001, 5, "07").await, -70).await;
    // A DevAddr no device has.
    let stranger =
        Keys { dev_addr: "26FFFFFF".into(), nwk_skey: TRACKER.nwk_skey.into(), app_skey: TRACKER.app_skey.into() };
    gw.uplink(&uplink(stranger, 70_001, 5, "08").await, -70).await;

    // The adapter survived, and the forged frame did not use up counter 70001.
    gw.uplink(&uplink(TRACKER, 70_001, 5, "09").await, -70).await;
    let tx = h.node.wait_fcnt(addr, KEY, 70_001).await;
    assert_eq!(crate::support::body_json(&tx)["payload"], "09");
    settle().await;

    assert_eq!(h.node.fcnts(addr, KEY).await, [1, 65_535, 65_536, 70_000, 70_001]);
    assert_eq!(h.node.chain.memcache().keys(addr), [KEY], "the raw codec writes one key");
}
