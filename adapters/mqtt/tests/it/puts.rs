//! Puts: a device logged in with its id and token publishes to `kalima/<address>/<key>` with
//! MQTT 3.1.1 or 5 at QoS 0, 1 and 2, and the payload bytes land on the chain under the
//! address and key of DESIGN.md; QoS 1 and 2 are acknowledged only once the put is stored.
//! MQTT 5 user properties become props, `idempotency_key` makes a resend a refused duplicate,
//! and a QoS 2 resend before PUBREL is stored once.

use std::collections::BTreeMap;

use crate::support::{self, Raw, Setup, V, VERSIONS, kind, rc};

/// One put of the table.
struct Case {
    v: V,
    qos: u8,
}

/// The payload of a case: not UTF-8, so the body must be the bytes exactly.
fn payload(c: &Case) -> Vec<u8> {
    let mut p = format!("21.5 C v{:?} qos{} ", c.v, c.qos).into_bytes();
    p.extend([0x00, 0xff, 0xfe, 0x80, b'\n']);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_of_every_qos_land_on_the_chain_in_both_versions() {
    let cases: Vec<Case> = VERSIONS.iter().flat_map(|&v| (0..=2).map(move |qos| Case { v, qos })).collect();
    for c in &cases {
        let name = format!("{:?} QoS {}", c.v, c.qos);
        let s = Setup::start().await;
        s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
        let mut client = s.client(c.v, "sensor-1").await;
        let body = payload(c);
        // DESIGN.md: kalima/plant-1/line-2/temp -> address /plant-1/line-2, key temp.
        let mid = client.publish("kalima/plant-1/line-2/temp", &body, c.qos, &[]).await;
        if c.qos > 0 {
            let code = client.ack(mid).await;
            assert_eq!(code, rc::SUCCESS, "{name}: acknowledgement refused:\n{}", client.describe());
            // Acknowledged means stored: no waiting allowed here.
            let stored = s.node.history("/plant-1/line-2", "temp").await;
            assert_eq!(stored.len(), 1, "{name}: acknowledged but {} transactions stored", stored.len());
        } else {
            support::wait_for(
                &format!("{name}: the put to reach the chain"),
                || s.node.latest("/plant-1/line-2", "temp"),
                || s.node.describe_address("/plant-1/line-2"),
            )
            .await;
        }
        let stored = s.node.history("/plant-1/line-2", "temp").await;
        assert_eq!(stored.len(), 1, "{name}: one put, {} transactions", stored.len());
        let t = &stored[0].tx.content;
        assert_eq!(
            (t.device_id.as_str(), t.address.as_str(), t.key.as_str(), &t.body),
            ("sensor-1", "/plant-1/line-2", "temp", &body),
            "{name}: stored transaction"
        );
        assert!(t.props.is_empty() && t.idempotency_key.is_empty(), "{name}: unexpected props {:?}", t.props);
        client.close().await;
        s.node.assert_verifies().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_level_and_deep_addresses_map_like_the_design() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/", false, true)]).await;
    for v in VERSIONS {
        let mut client = s.client(v, "sensor-1").await;
        for (topic, address, key) in [
            ("kalima/a/k", "/a", "k"),
            ("kalima/site:7/hall 2/line.3/motor@4/rpm", "/site:7/hall 2/line.3/motor@4", "rpm"),
        ] {
            let body = format!("{v:?} {topic}");
            assert_eq!(client.put(topic, body.as_bytes(), 1, &[]).await, rc::SUCCESS, "{v:?} {topic}");
            let latest = s.node.latest(address, key).unwrap_or_else(|| panic!("{v:?}: nothing at {address} {key}"));
            assert_eq!(latest.tx.content.body, body.as_bytes(), "{v:?} {topic}");
        }
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_user_properties_become_props() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    let mut client = s.client(V::V5, "sensor-1").await;
    let props = [("unit", "C"), ("source", "plc-7"), ("idempotency_key", "reading-0001")];
    assert_eq!(client.put("kalima/plant-1/line-2/temp", b"21.5", 1, &props).await, rc::SUCCESS);
    let t = s.node.latest("/plant-1/line-2", "temp").expect("stored").tx.content.clone();
    let expected: BTreeMap<String, String> =
        [("unit", "C"), ("source", "plc-7")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(t.props, expected, "user properties other than idempotency_key become props");
    assert_eq!(t.idempotency_key, "reading-0001", "the idempotency_key property is the transaction's key");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_with_the_same_idempotency_key_is_refused_as_a_duplicate() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    let mut watcher = s.client(V::V5, "sensor-1").await;
    assert_eq!(watcher.subscribe(&[("kalima/errors/sensor-1", 0)]).await, vec![0]);
    let mut client = s.client(V::V5, "sensor-1").await;
    let key = [("idempotency_key", "reading-42")];
    assert_eq!(client.put("kalima/plant-1/line-2/temp", b"21.5", 1, &key).await, rc::SUCCESS);
    for qos in [1, 2] {
        // The resend may be at another QoS or with another body: the key alone decides.
        let mid = client.publish("kalima/plant-1/line-2/temp", b"21.6", qos, &key).await;
        let code = client.ack(mid).await;
        // paho hides the reason code of a PUBREC (it completes the flow with PUBREL and
        // reports the PUBCOMP), so only QoS 1 shows the refusal to the client itself.
        if qos == 1 {
            assert!(code >= 0x80, "a duplicate must be refused, got reason {code:#x}:\n{}", client.describe());
        }
    }
    let reports = support::wait_for(
        "two error reports",
        || Some(watcher.messages()).filter(|m| m.len() >= 2),
        || watcher.describe(),
    )
    .await;
    for r in &reports {
        assert_eq!(r.topic, "kalima/errors/sensor-1");
        let report: serde_json::Value = serde_json::from_slice(&r.payload).expect("the error report is JSON");
        assert_eq!(report["code"], "duplicate_idempotency_key", "error report: {report}");
        assert_eq!(report["topic"], "kalima/plant-1/line-2/temp", "error report: {report}");
    }
    let stored = s.node.bodies("/plant-1/line-2", "temp").await;
    assert_eq!(stored, vec![b"21.5".to_vec()], "the duplicate must not be stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_resend_before_pubrel_is_stored_once() {
    let s = Setup::start().await;
    s.node.register("sensor-1", &[("/plant-1", false, true)]).await;
    for v in VERSIONS {
        let key = format!("qos2-{v:?}");
        let topic = format!("kalima/plant-1/{key}");
        let mut raw = Raw::login(s.addr(), v, "sensor-1").await;
        raw.send(&support::publish(v, &topic, b"once", 2, 7, false, &[])).await;
        let rec = raw.next().await.expect("PUBREC");
        assert_eq!((rec.kind, rec.pkid(), rec.reason()), (kind::PUBREC, 7, 0), "{v:?}");
        // The PUBREC was lost, says the client: it sends the PUBLISH again with DUP set.
        raw.send(&support::publish(v, &topic, b"once", 2, 7, true, &[])).await;
        let rec = raw.next().await.expect("second PUBREC");
        assert_eq!((rec.kind, rec.pkid(), rec.reason()), (kind::PUBREC, 7, 0), "{v:?}");
        raw.send(&support::pubrel(7)).await;
        let comp = raw.next().await.expect("PUBCOMP");
        assert_eq!((comp.kind, comp.pkid()), (kind::PUBCOMP, 7), "{v:?}");
        assert_eq!(s.node.bodies("/plant-1", &key).await, vec![b"once".to_vec()], "{v:?}: stored exactly once");
        // After PUBREL the id is free again: a new message with it is a new put.
        raw.send(&support::publish(v, &topic, b"twice", 2, 7, false, &[])).await;
        let rec = raw.next().await.expect("PUBREC of the new message");
        assert_eq!((rec.kind, rec.pkid(), rec.reason()), (kind::PUBREC, 7, 0), "{v:?}");
        assert_eq!(
            s.node.bodies("/plant-1", &key).await,
            vec![b"once".to_vec(), b"twice".to_vec()],
            "{v:?}: a new message with a released packet id is stored"
        );
    }
}
