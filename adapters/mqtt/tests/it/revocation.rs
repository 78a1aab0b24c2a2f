//! Registry changes on open connections (DESIGN.md invariant 4, "revoked devices are refused
//! everywhere"): a device revoked through the chain (as `DELETE /api/v1/devices/{id}` does)
//! cannot put any more on the connection it already has, nor log in again, and its
//! subscriptions stop; a write grant removed or given takes effect on open connections.

use std::time::Duration;

use crate::support::{PyClient, Setup, V, VERSIONS, rc, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off() {
    for v in VERSIONS {
        let s = Setup::start().await;
        s.node.register("sensor-1", &[("/plant-1", true, true)]).await;
        s.node.register("writer", &[("/plant-1", false, true)]).await;
        let mut watcher = s.client(v, "sensor-1").await;
        assert_eq!(watcher.subscribe(&[("kalima/errors/sensor-1", 0), ("kalima/out/plant-1/#", 1)]).await, vec![0, 1]);
        let mut client = s.client(v, "sensor-1").await;
        assert_eq!(client.put("kalima/plant-1/line-2/temp", b"before", 1, &[]).await, rc::SUCCESS, "{v:?}");
        watcher.wait_message("kalima/out/plant-1/line-2/temp").await;

        s.node.revoke("sensor-1").await;

        // The open connection's next put is refused and not stored.
        let mid = client.publish("kalima/plant-1/line-2/temp", b"after", 1, &[]).await;
        match v {
            V::V5 => {
                let code = client.ack(mid).await;
                assert_eq!(code, rc::NOT_AUTHORIZED, "{v:?}: put of a revoked device:\n{}", client.describe());
            }
            V::V311 => {
                // No negative PUBACK in 3.1.1: either the connection is closed without an
                // acknowledgement, or the refusal is reported on the errors topic.
                crate::support::wait_for(
                    "the put of the revoked device to be refused",
                    || {
                        let closed_unacked = client.disconnected() && client.ack_now(mid).is_none();
                        let reported = watcher.messages().iter().any(|m| m.topic == "kalima/errors/sensor-1");
                        (closed_unacked || reported).then_some(())
                    },
                    || format!("{}\n{}", client.describe(), watcher.describe()),
                )
                .await;
            }
        }
        let bodies = s.node.bodies("/plant-1/line-2", "temp").await;
        assert_eq!(bodies, vec![b"before".to_vec()], "{v:?}: a revoked device's put was stored");

        // New logins fail.
        let again = PyClient::start(s.addr(), v, Some(("sensor-1", &token("sensor-1"))), "revoked").await;
        assert_eq!(again.connack(), Some(rc::BAD_USER_NAME_OR_PASSWORD), "{v:?}: {}", again.describe());

        // Its subscription receives nothing any more: a put by another device is not delivered.
        let mut w = s.client(v, "writer").await;
        w.put("kalima/plant-1/line-2/temp", b"for others", 1, &[]).await;
        tokio::time::sleep(crate::support::QUIET).await;
        let leaked: Vec<_> = watcher.messages().into_iter().filter(|m| m.payload == b"for others").collect();
        assert!(leaked.is_empty(), "{v:?}: a revoked device still receives deliveries: {leaked:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_write_grant_refuses_the_next_put_of_an_open_connection() {
    for v in VERSIONS {
        let s = Setup::start().await;
        s.node.register("sensor-1", &[("/plant-1", false, true), ("/plant-2", false, true)]).await;
        let mut client = s.client(v, "sensor-1").await;
        assert_eq!(client.put("kalima/plant-1/a/temp", b"1", 1, &[]).await, rc::SUCCESS);
        s.node.grant("sensor-1", "/plant-1", false, false).await;
        let mid = client.publish("kalima/plant-1/a/temp", b"2", 1, &[]).await;
        if v == V::V5 {
            assert_eq!(client.ack(mid).await, rc::NOT_AUTHORIZED, "{v:?}: {}", client.describe());
        } else {
            // Give the refusal (a close, or an acknowledgement plus an error report) time to happen.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(s.node.bodies("/plant-1/a", "temp").await, vec![b"1".to_vec()], "{v:?}: stored without a grant");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_grant_given_while_connected_applies_without_reconnecting() {
    let mut problems = Vec::new();
    for v in VERSIONS {
        let s = Setup::start().await;
        s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
        let mut client = s.client(v, "sensor-1").await;
        let first = client.put("kalima/plant-2/a/temp", b"early", 1, &[]).await;
        if v == V::V5 {
            assert_eq!(first, rc::NOT_AUTHORIZED, "{v:?}: no grant on /plant-2 yet");
        }
        s.node.grant("sensor-1", "/plant-2", false, true).await;
        let mid = client.publish("kalima/plant-2/a/temp", b"granted", 1, &[]).await;
        // A 3.1.1 connection that is closed instead of acknowledged shows the refusal too.
        let acked = crate::support::wait_for(
            "an acknowledgement or the close",
            || client.ack_now(mid).map(Some).or(client.disconnected().then_some(None)),
            || client.describe(),
        )
        .await;
        let stored = s.node.bodies("/plant-2/a", "temp").await;
        if acked != Some(rc::SUCCESS) || stored != vec![b"granted".to_vec()] {
            problems.push(format!(
                "{v:?}: after the grant on /plant-2 the open connection's put got {acked:?} and stored {stored:?}"
            ));
        }
        // A new connection sees the grant, whatever the open one does.
        let mut fresh = s.client(v, "sensor-1").await;
        assert_eq!(fresh.put("kalima/plant-2/a/temp", b"fresh", 1, &[]).await, rc::SUCCESS, "{v:?}");
    }
    assert!(problems.is_empty(), "grants given while connected are not applied:\n  {}", problems.join("\n  "));
}
