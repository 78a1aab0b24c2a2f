//! Failure isolation: one adapter with a good PLC, a hung one, an unreachable one and a wrong
//! register map; each failing device shows why and backs off, and the good one keeps its pace.

use std::collections::BTreeMap;

use kalima_adapter_modbus::{DeviceState, ModbusAdapter};
use serde_json::json;

use crate::support::{ModbusSim, Node, SilentDevice, free_port, section, status, wait_for, wait_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_device_never_holds_back_the_others() {
    let sim = ModbusSim::tcp(json!({ "holding": { "0": 1 } })).await;
    let silent = SilentDevice::start().await;
    let refused = free_port();
    let node = Node::start().await;
    node.register("modbus", &[("/plant", true, true)]).await;
    let cfg = section(&format!(
        r#"
        [modbus]
        [[modbus.devices]]
        name = "good"
        host = "{good}"
        address = "/plant/good"
        poll_interval_ms = 100
        [[modbus.devices.points]]
        key = "v"
        register = 0

        [[modbus.devices]]
        name = "silent"
        host = "{silent}"
        address = "/plant/silent"
        poll_interval_ms = 100
        timeout_ms = 1500
        backoff_max_ms = 2000
        [[modbus.devices.points]]
        key = "v"
        register = 0

        [[modbus.devices]]
        name = "refused"
        host = "{refused}"
        address = "/plant/refused"
        poll_interval_ms = 100
        timeout_ms = 1000
        backoff_max_ms = 10000
        [[modbus.devices.points]]
        key = "v"
        register = 0

        # The good PLC, with a map pointing past its last register.
        [[modbus.devices]]
        name = "bad-map"
        host = "{good}"
        address = "/plant/bad-map"
        poll_interval_ms = 100
        [[modbus.devices.points]]
        key = "v"
        register = 1000
        "#,
        good = sim.host(),
        silent = silent.addr,
    ));
    let adapter = ModbusAdapter::start(&cfg, node.ingest.clone());
    let describe = || format!("{:#?}", adapter.status());

    // The refused device fails fast and often: follow its planned waits while the others run.
    // The wait planned after a failure is next_attempt_ms - last_error_ms (both set together).
    let mut waits: BTreeMap<u32, i64> = BTreeMap::new();
    let first_silent_failure = wait_for(
        "the refused device to fail 4 times and the silent one once",
        || {
            let r = status(&adapter, "refused");
            if let (Some(next), Some(at)) = (r.next_attempt_ms, r.last_error_ms) {
                waits.entry(r.consecutive_failures).or_insert(next - at);
            }
            let s = status(&adapter, "silent");
            (r.consecutive_failures >= 4 && s.polls_failed >= 1).then_some(s)
        },
        describe,
    )
    .await;

    // The good device keeps polling while the silent one keeps timing out.
    let g0 = status(&adapter, "good").polls_ok;
    let s0 = first_silent_failure.polls_failed;
    wait_for(
        "10 good polls and another silent failure",
        || {
            let g = status(&adapter, "good");
            assert_eq!(g.state, DeviceState::Ok, "the good device never fails: {g:#?}");
            assert_eq!(g.consecutive_failures, 0, "{g:#?}");
            let r = status(&adapter, "refused");
            if let (Some(next), Some(at)) = (r.next_attempt_ms, r.last_error_ms) {
                waits.entry(r.consecutive_failures).or_insert(next - at);
            }
            (g.polls_ok >= g0 + 10 && status(&adapter, "silent").polls_failed > s0).then_some(())
        },
        describe,
    )
    .await;
    let g = status(&adapter, "good");
    assert_eq!(g.polls_failed, 0, "{g:#?}");
    assert!(g.last_error.is_none(), "{g:#?}");
    assert!(node.latest("/plant/good", "v").is_some());

    // Hung device: failing on the timeout, with the next attempt announced.
    let s = status(&adapter, "silent");
    assert_eq!(s.state, DeviceState::Failing, "{s:#?}");
    let err = s.last_error.clone().expect("silent: a reason");
    assert!(err.contains("no answer within 1500 ms"), "silent: {err}");
    let (next, at) = (s.next_attempt_ms.expect("silent: next attempt"), s.last_error_ms.expect("silent: error time"));
    assert!(next > at, "{s:#?}");
    assert_eq!(s.polls_ok, 0);
    assert!(node.latest("/plant/silent", "v").is_none());

    // Unreachable device: a connect error, more and more failures, longer and longer waits.
    let r = status(&adapter, "refused");
    assert_eq!(r.state, DeviceState::Failing, "{r:#?}");
    let err = r.last_error.clone().expect("refused: a reason");
    assert!(err.contains(&format!("cannot connect to {refused}")), "refused: {err}");
    assert!(r.consecutive_failures >= 4 && r.polls_failed >= u64::from(r.consecutive_failures), "{r:#?}");
    assert!(r.next_attempt_ms.is_some(), "{r:#?}");
    let seen: Vec<(u32, i64)> = waits.into_iter().collect();
    assert!(seen.len() >= 3, "observed too few failures to see the backoff: {seen:?}");
    for pair in seen.windows(2) {
        let ((f1, w1), (f2, w2)) = (pair[0], pair[1]);
        let capped = w2 >= 10_000;
        assert!(w2 > w1 || capped, "the wait grows with each failure (up to backoff_max_ms): {seen:?} ({f1}->{f2})");
    }
    let ((_, w_first), (_, w_last)) = (seen[0], seen[seen.len() - 1]);
    assert!(w_last <= 10_000 + 50, "waits stay within backoff_max_ms: {seen:?}");
    assert!(w_last >= 2 * w_first, "{seen:?}");

    // Wrong map on a healthy PLC: failing with the device's exception, on its own entry.
    let b = wait_status(&adapter, "bad-map", "failing", |s| s.state == DeviceState::Failing).await;
    let err = b.last_error.clone().expect("bad-map: a reason");
    assert!(err.contains("exception") && err.contains("IllegalDataAddress"), "bad-map: {err}");
    assert_eq!(b.polls_ok, 0);
    assert_eq!(status(&adapter, "good").state, DeviceState::Ok);
}
