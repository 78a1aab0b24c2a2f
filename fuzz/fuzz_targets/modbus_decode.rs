//! Modbus: register contents from a device, decoded under any register-map settings, and
//! set-points encoded back, never panic; a config text that validates always plans.
#![no_main]

use kalima_adapter_modbus::config::{DataType, Order, PointConfig};
use kalima_adapter_modbus::{ModbusSection, decode, plan};
use libfuzzer_sys::fuzz_target;

const TYPES: [DataType; 10] = [
    DataType::Bool,
    DataType::U16,
    DataType::I16,
    DataType::U32,
    DataType::I32,
    DataType::U64,
    DataType::I64,
    DataType::F32,
    DataType::F64,
    DataType::String,
];

fuzz_target!(|data: &[u8]| {
    if data.len() >= 12 {
        let (head, rest) = data.split_at(12);
        let order = |b: u8| if b & 1 == 0 { Order::Big } else { Order::Little };
        let scale = f64::from(i16::from_le_bytes([head[3], head[4]])) / 16.0;
        let point = PointConfig {
            data_type: TYPES[usize::from(head[0]) % TYPES.len()],
            byte_order: order(head[1]),
            word_order: order(head[1] >> 1),
            count: Some(u16::from(head[2] % 130)),
            scale: if scale == 0.0 { 1.0 } else { scale },
            offset: f64::from(i16::from_le_bytes([head[5], head[6]])),
            ..PointConfig::default()
        };
        let words: Vec<u16> = rest.chunks(2).map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
        if let Ok(v) = decode::decode(&point, &words) {
            let _ = v.to_json();
        }
        let n = f64::from_le_bytes([head[7], head[8], head[9], head[10], head[11], head[0], head[1], head[2]]);
        let _ = decode::encode(&point, &serde_json::json!(n));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        #[derive(serde::Deserialize)]
        struct Root {
            modbus: ModbusSection,
        }
        if let Ok(root) = toml::from_str::<Root>(text) {
            if root.modbus.validate().is_empty() {
                for d in &root.modbus.devices {
                    let _ = plan::plan(d);
                }
            }
        }
    }
});
