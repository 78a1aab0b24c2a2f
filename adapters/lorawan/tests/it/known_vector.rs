//! A real-world join request (The Things Network's published example, the one lora-packet
//! documents), checked first against lora-packet and then against our network: proves the
//! join-request MIC check and the byte order of EUIs and DevNonce on a frame we did not build.

use serde_json::json;

use kalima_adapter_lorawan::network::{Accepted, Network};

use crate::otaa::open_accept;
use crate::support::{GW1, Harness, TTN, config, join_accept_decode, join_request, lora, rxpk, settle};

/// MHDR | AppEUI | DevEUI | DevNonce (each little-endian on air) | MIC.
const JOIN_REQUEST: &str = "00dc0000d07ed5b3701e6fedf57ceeaf0085cc587fe913";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttn_join_request_vector_is_accepted() {
    let vector = hex::decode(JOIN_REQUEST).unwrap();

    // The helper agrees with the published bytes, so the peer and the vector vouch for each other.
    assert_eq!(join_request(TTN, "CC85").await, vector, "lora-packet rebuilds the published join request");
    let parsed = lora(json!({
        "cmd": "parse",
        "phy": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &vector),
        "app_key": TTN.app_key,
    }))
    .await;
    assert_eq!(parsed["mic_ok"], true, "{parsed}");
    assert_eq!(parsed["dev_eui"], TTN.dev_eui.to_ascii_lowercase(), "{parsed}");
    assert_eq!(parsed["app_eui"], TTN.app_eui.to_ascii_lowercase(), "{parsed}");
    assert_eq!(parsed["dev_nonce"], "cc85", "{parsed}");

    let h = Harness::start(config(100)).await;
    let gw = h.gateway(GW1).await;
    gw.pull().await;

    // The same request with one MIC bit flipped comes first: refused, and it must not use up
    // DevNonce CC85, or the genuine request after it would go unanswered.
    let mut forged = vector.clone();
    *forged.last_mut().unwrap() ^= 0x01;
    gw.uplink(&forged, -60).await;
    settle().await;

    // Near the end of the concentrator's 32-bit microsecond counter: RX1 wraps around.
    let mut rx = rxpk(&vector, -60);
    rx["tmst"] = json!(4_293_000_000u32);
    gw.push_acked(vec![rx]).await;
    let txpk = gw.expect_pull_resp().await;
    assert_eq!(txpk["tmst"], 4_293_000_000u32.wrapping_add(5_000_000), "RX1 tmst wraps modulo 2^32: {txpk}");
    open_accept(&txpk, TTN, "CC85").await;

    settle().await;
    assert!(gw.pull_resps().is_empty(), "one join accept, for the genuine request only: {:02x?}", gw.pull_resps());
}

/// The same vector straight into the network layer, without sockets: pins a join failure to
/// the frame handling rather than to the packet forwarder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_answers_the_ttn_vector_with_a_join_accept_the_device_opens() {
    let section = config(100);
    let device = section.devices.iter().position(|d| d.name == "ttn-node").unwrap();
    let mut network = Network::new(&section, None);
    let answer = network.handle(&hex::decode(JOIN_REQUEST).unwrap());
    let Ok(Accepted::Join { device: joined, accept }) = answer else {
        panic!("the TTN join request must be accepted, got {answer:?}")
    };
    assert_eq!(joined, device);
    assert_eq!(accept.len(), 17, "a join accept without CFList is 17 bytes: {}", hex::encode(&accept));
    let decoded = join_accept_decode(&accept, TTN.app_key, "CC85").await;
    assert_eq!(decoded["mic_ok"], true, "{decoded}");
    let session = network.session(device).expect("a session after the join");
    assert_eq!(hex::encode(session.dev_addr), decoded["dev_addr"], "{decoded}");
    assert_eq!(hex::encode(session.nwk_skey), decoded["nwk_skey"], "the device derives our NwkSKey: {decoded}");
    assert_eq!(hex::encode(session.app_skey), decoded["app_skey"], "the device derives our AppSKey: {decoded}");
}
