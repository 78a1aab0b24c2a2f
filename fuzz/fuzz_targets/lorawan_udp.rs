//! LoRaWAN: any datagram a gateway (or anyone) sends to the Semtech UDP port is parsed without
//! panicking, and every PHYPayload it carries goes through the whole network path (parse, MIC,
//! counters, decryption, joins, codecs) without panicking either.
#![no_main]

use std::sync::OnceLock;

use kalima_adapter_lorawan::codec::{self, Codec, FieldConfig, FieldType};
use kalima_adapter_lorawan::network::{Accepted, Network};
use kalima_adapter_lorawan::semtech::{self, FromGateway};
use kalima_adapter_lorawan::LorawanSection;
use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;

const CONFIG: &str = r#"
[lorawan]
listen = "127.0.0.1:0"
gateways = ["0102030405060708"]
[[lorawan.devices]]
name = "abp"
dev_eui = "0004A30B001C0530"
dev_addr = "26011BDA"
nwk_skey = "2B7E151628AED2A6ABF7158809CF4F3C"
app_skey = "000102030405060708090A0B0C0D0E0F"
address = "/f/abp"
codec = "cayenne_lpp"
[[lorawan.devices]]
name = "otaa"
dev_eui = "00AFEE7CF5ED6F1E"
activation = "otaa"
app_eui = "70B3D57ED00000DC"
app_key = "B6B53F4A168A7A88BDF7EA135CE9CFCA"
address = "/f/otaa"
"#;

fn network() -> &'static Mutex<Network> {
    static NET: OnceLock<Mutex<Network>> = OnceLock::new();
    NET.get_or_init(|| {
        #[derive(serde::Deserialize)]
        struct Root {
            lorawan: LorawanSection,
        }
        let root: Root = toml::from_str(CONFIG).expect("fuzz config");
        Mutex::new(Network::new(&root.lorawan, None))
    })
}

fuzz_target!(|data: &[u8]| {
    let fields = [FieldConfig { name: "v".into(), offset: 1, field_type: FieldType::I24, ..FieldConfig::default() }];
    let mut phys = vec![data.to_vec()];
    if let Ok(FromGateway::PushData { uplinks, .. }) = semtech::parse(data) {
        phys.extend(uplinks.into_iter().flatten().map(|u| u.phy));
    }
    for phy in phys {
        if let Ok(Accepted::Data { fport: Some(p), payload, .. }) = network().lock().handle(&phy) {
            for c in [Codec::Raw, Codec::CayenneLpp, Codec::Fields] {
                let _ = codec::decode(&c, &fields, p, &payload);
            }
        }
        for c in [Codec::CayenneLpp, Codec::Fields] {
            let _ = codec::decode(&c, &fields, 1, &phy);
        }
    }
});
