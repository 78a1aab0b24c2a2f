//! `[lorawan]` configuration: where gateways send, which gateways are trusted, and the
//! devices with their keys and payload codecs.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::codec::{Codec, FieldConfig};

/// `[lorawan]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LorawanSection {
    /// UDP address of the Semtech packet-forwarder endpoint; empty disables the adapter.
    pub listen: String,
    /// Kalima device the uplinks are written as, unless a device names its own.
    pub kalima_device: String,
    /// EUIs (16 hex digits) of the gateways allowed to send; the protocol has no authentication.
    pub gateways: Vec<String>,
    /// Network id (6 hex digits) put in join accepts and in the high bits of DevAddrs.
    pub net_id: String,
    /// How long copies of one uplink from several gateways are gathered, ms.
    pub dedup_window_ms: u64,
    /// Transmit power of join accepts, dBm.
    pub downlink_power_dbm: u8,
    /// The devices.
    pub devices: Vec<DeviceConfig>,
}

impl Default for LorawanSection {
    fn default() -> Self {
        Self {
            listen: String::new(),
            kalima_device: "lorawan".into(),
            gateways: Vec::new(),
            net_id: "000000".into(),
            dedup_window_ms: 200,
            downlink_power_dbm: 14,
            devices: Vec::new(),
        }
    }
}

/// How a device joins.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Session keys and DevAddr given in the config.
    #[default]
    Abp,
    /// Over-the-air activation with the AppKey.
    Otaa,
}

/// `[[lorawan.devices]]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Name for logs and status.
    pub name: String,
    /// DevEUI, 16 hex digits as printed on the device (most significant first).
    pub dev_eui: String,
    /// `abp` or `otaa`.
    pub activation: Activation,
    /// ABP: DevAddr, 8 hex digits (most significant first).
    pub dev_addr: String,
    /// ABP: network session key, 32 hex digits.
    pub nwk_skey: String,
    /// ABP: application session key, 32 hex digits.
    pub app_skey: String,
    /// OTAA: AppEUI/JoinEUI, 16 hex digits.
    pub app_eui: String,
    /// OTAA: AppKey, 32 hex digits.
    pub app_key: String,
    /// Address the readings are written to.
    pub address: String,
    /// Kalima device the uplinks are written as (default: `[lorawan] kalima_device`).
    pub kalima_device: Option<String>,
    /// `raw`, `cayenne_lpp` or `fields`.
    pub codec: Codec,
    /// Fields of the `fields` codec.
    pub fields: Vec<FieldConfig>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            dev_eui: String::new(),
            activation: Activation::Abp,
            dev_addr: String::new(),
            nwk_skey: String::new(),
            app_skey: String::new(),
            app_eui: String::new(),
            app_key: String::new(),
            address: String::new(),
            kalima_device: None,
            codec: Codec::Raw,
            fields: Vec::new(),
        }
    }
}

/// Parses `n` bytes of hex as written (most significant first).
pub fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    let v = hex::decode(s.trim()).ok()?;
    <[u8; N]>::try_from(v).ok()
}

impl LorawanSection {
    /// Whether the adapter runs.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    /// Every problem in the section, each naming where it is.
    pub fn validate(&self) -> Vec<String> {
        let mut errs = Vec::new();
        if !self.enabled() {
            if !self.devices.is_empty() {
                errs.push(
                    "[lorawan] devices are configured but listen is empty (e.g. listen = \"0.0.0.0:1700\")".into(),
                );
            }
            return errs;
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(format!("[lorawan] listen = {:?} is not an IP:port address", self.listen));
        }
        if kalima_core::registry::validate_device_id(&self.kalima_device).is_err() {
            errs.push(format!("[lorawan] kalima_device = {:?} is not a valid device id", self.kalima_device));
        }
        if self.gateways.is_empty() {
            errs.push("[lorawan] gateways is empty: list the EUIs of the gateways allowed to send".into());
        }
        for g in &self.gateways {
            if hex_bytes::<8>(g).is_none() {
                errs.push(format!("[lorawan] gateways: {g:?} is not 16 hex digits"));
            }
        }
        if hex_bytes::<3>(&self.net_id).is_none() {
            errs.push(format!("[lorawan] net_id = {:?} is not 6 hex digits", self.net_id));
        }
        if self.dedup_window_ms > 10_000 {
            errs.push("[lorawan] dedup_window_ms must be at most 10000".into());
        }
        let (mut names, mut euis, mut addrs) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, d) in self.devices.iter().enumerate() {
            let at = if d.name.is_empty() {
                format!("[[lorawan.devices]] #{}", i + 1)
            } else {
                format!("lorawan device {:?}", d.name)
            };
            if d.name.is_empty() || !names.insert(d.name.clone()) {
                errs.push(format!("{at}: name must be set and unique"));
            }
            match hex_bytes::<8>(&d.dev_eui) {
                None => errs.push(format!("{at}: dev_eui must be 16 hex digits")),
                Some(e) if !euis.insert(e) => errs.push(format!("{at}: dev_eui is used twice")),
                Some(_) => {}
            }
            let key = |name: &str, v: &str, errs: &mut Vec<String>| {
                if hex_bytes::<16>(v).is_none() {
                    errs.push(format!("{at}: {name} must be 32 hex digits"));
                }
            };
            match d.activation {
                Activation::Abp => {
                    match hex_bytes::<4>(&d.dev_addr) {
                        None => errs.push(format!("{at}: activation = \"abp\" needs dev_addr (8 hex digits)")),
                        Some(a) if !addrs.insert(a) => errs.push(format!("{at}: dev_addr is used twice")),
                        Some(_) => {}
                    }
                    key("nwk_skey", &d.nwk_skey, &mut errs);
                    key("app_skey", &d.app_skey, &mut errs);
                }
                Activation::Otaa => {
                    if hex_bytes::<8>(&d.app_eui).is_none() {
                        errs.push(format!("{at}: activation = \"otaa\" needs app_eui (16 hex digits)"));
                    }
                    key("app_key", &d.app_key, &mut errs);
                }
            }
            if let Err(e) = kalima_core::tx::validate_address(&d.address) {
                errs.push(format!("{at}: {e}"));
            } else if kalima_core::registry::is_system_address(&d.address) {
                errs.push(format!("{at}: address {:?} is reserved for the node", d.address));
            }
            if let Some(k) = &d.kalima_device
                && kalima_core::registry::validate_device_id(k).is_err()
            {
                errs.push(format!("{at}: kalima_device = {k:?} is not a valid device id"));
            }
            match d.codec {
                Codec::Fields => {
                    if d.fields.is_empty() {
                        errs.push(format!("{at}: codec = \"fields\" needs [[lorawan.devices.fields]]"));
                    }
                    errs.extend(crate::codec::validate_fields(&d.fields).into_iter().map(|e| format!("{at}: {e}")));
                }
                _ if !d.fields.is_empty() => errs.push(format!("{at}: fields apply to codec = \"fields\" only")),
                _ => {}
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LorawanSection {
        #[derive(Deserialize)]
        struct Root {
            lorawan: LorawanSection,
        }
        toml::from_str::<Root>(text).unwrap().lorawan
    }

    #[test]
    fn documented_example_parses_and_validates() {
        let s = parse(include_str!("../example.toml"));
        assert_eq!(s.validate(), Vec::<String>::new());
        assert_eq!(s.devices.len(), 3);
        assert!(s.devices.iter().any(|d| d.activation == Activation::Otaa));
    }

    #[test]
    fn every_mistake_is_reported() {
        let s = parse(
            r#"
            [lorawan]
            listen = "0.0.0.0:1700"
            gateways = ["0102"]
            net_id = "xyz"
            [[lorawan.devices]]
            name = "a"
            dev_eui = "0102030405060708"
            address = "/farm"
            [[lorawan.devices]]
            name = "a"
            dev_eui = "0102030405060708"
            activation = "otaa"
            address = "farm"
            codec = "fields"
            "#,
        );
        let all = s.validate().join("\n");
        for want in [
            "gateways: \"0102\"",
            "net_id",
            "needs dev_addr",
            "nwk_skey must be",
            "name must be set and unique",
            "dev_eui is used twice",
            "needs app_eui",
            "app_key must be",
            "needs [[lorawan.devices.fields]]",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        let off = LorawanSection { devices: s.devices.clone(), listen: String::new(), ..LorawanSection::default() };
        assert!(off.validate()[0].contains("listen is empty"));
    }
}
