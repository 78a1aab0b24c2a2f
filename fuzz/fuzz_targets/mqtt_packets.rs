//! MQTT: any bytes on a client connection (3.1.1 and 5 codecs, the CONNECT level probe, the
//! topic-to-address mapping) and any Sparkplug B payload on any Sparkplug topic are handled
//! without panicking.
#![no_main]

use bytes::BytesMut;
use kalima_adapter_mqtt::codec::{Incoming, Version, connect_level};
use kalima_adapter_mqtt::sparkplug::Host;
use kalima_adapter_mqtt::topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = connect_level(data);
    for v in [Version::V4, Version::V5] {
        let mut buf = BytesMut::from(data);
        // Read packets until the codec needs more bytes or refuses, as a connection would.
        for _ in 0..64 {
            match v.read(&mut buf, 64 * 1024) {
                Ok(Some(Incoming::Publish { topic: t, .. })) => {
                    let _ = topic::parse_put(&t);
                }
                Ok(Some(Incoming::Subscribe { filters, .. })) => {
                    for (f, _) in filters {
                        let _ = topic::classify(&f, "device");
                        let _ = topic::matches(&f, "kalima/out/a/b");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    let kinds = ["NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH"];
    let mut host = Host::new("/sparkplug");
    let kind = kinds[usize::from(data.first().copied().unwrap_or(0)) % kinds.len()];
    let topic = if kind.starts_with('D') { format!("spBv1.0/g/{kind}/e/d") } else { format!("spBv1.0/g/{kind}/e") };
    let _ = host.handle("spBv1.0/g/NBIRTH/e", data, 1);
    let _ = host.handle(&topic, data, 2);
});
