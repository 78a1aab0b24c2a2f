//! `kalima up --demo`: simulated plant sensors that write through the real ingest path every
//! interval, so the API, the streams and the metrics show live data at once.

use std::time::Duration;

use kalima_core::chain::Guard;
use kalima_core::registry::{DEVICES_ADDRESS, DeviceRecord, GrantRecord, grants_address, new_token, token_digest};
use kalima_core::tx::TxContent;
use kalima_core::{Chain, Ingest};
use rand::Rng;

/// Id of the demo device.
pub const DEMO_DEVICE: &str = "demo-sensors";
/// Where the demo writes.
pub const DEMO_PREFIX: &str = "/demo";

/// Registers the demo device (once) and runs the sensors until aborted.
pub async fn run(chain: Chain, ingest: Ingest, sensors: usize, interval: Duration) -> kalima_core::Result<()> {
    if chain.registry().get(DEMO_DEVICE).is_none() {
        let record = DeviceRecord {
            token_sha256: token_digest(&new_token()),
            public_key: None,
            require_signature: false,
            admin: false,
            revoked: false,
        };
        let reg = TxContent {
            device_id: "admin".into(),
            address: DEVICES_ADDRESS.into(),
            key: DEMO_DEVICE.into(),
            body: serde_json::to_vec(&record).unwrap_or_default(),
            ..TxContent::default()
        };
        chain.submit(vec![reg], Some(Guard::DeviceAbsent(DEMO_DEVICE.into()))).await?;
        let grant = GrantRecord { read: true, write: true };
        let g = TxContent {
            device_id: "admin".into(),
            address: grants_address(DEMO_DEVICE),
            key: DEMO_PREFIX.into(),
            body: serde_json::to_vec(&grant).unwrap_or_default(),
            ..TxContent::default()
        };
        chain.submit(vec![g], Some(Guard::DevicePresent(DEMO_DEVICE.into()))).await?;
    }
    let device =
        chain.registry().get(DEMO_DEVICE).ok_or_else(|| kalima_core::Error::Config("demo device missing".into()))?;
    let mut state: Vec<(f64, f64, f64)> = (0..sensors).map(|i| (20.0 + i as f64, 3.0, 0.5)).collect();
    let mut tick = tokio::time::interval(interval);
    tracing::info!(target: "demo", sensors, prefix = DEMO_PREFIX, "Demo sensors writing.");
    loop {
        tick.tick().await;
        let mut items = Vec::with_capacity(sensors * 3);
        {
            let mut rng = rand::thread_rng();
            for (i, (t, p, v)) in state.iter_mut().enumerate() {
                *t += rng.gen_range(-0.2..0.2);
                *p = (*p + rng.gen_range(-0.05..0.05)).clamp(1.0, 6.0);
                *v = (*v + rng.gen_range(-0.05..0.05)).clamp(0.0, 5.0);
                let address = format!("{DEMO_PREFIX}/plant-1/line-{}", i + 1);
                for (key, value, unit) in [("temp", *t, "C"), ("pressure", *p, "bar"), ("vibration", *v, "mm/s")] {
                    items.push(TxContent {
                        address: address.clone(),
                        key: key.into(),
                        body: serde_json::to_vec(
                            &serde_json::json!({ "value": (value * 100.0).round() / 100.0, "unit": unit }),
                        )
                        .unwrap_or_default(),
                        props: [("source".to_string(), "demo".to_string())].into(),
                        ..TxContent::default()
                    });
                }
            }
        }
        if let Err(e) = ingest.write("demo", &device, items).await {
            tracing::warn!(target: "demo", error = %e, "Demo write failed.");
        }
    }
}
