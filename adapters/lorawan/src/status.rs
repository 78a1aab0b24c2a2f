//! What the LoRaWAN adapter has seen, for the status API: per device (joined, counters, last
//! reception) and per gateway (last contact, downlink path).

use serde::Serialize;

/// One configured device.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = LorawanDeviceStatus)]
pub struct DeviceStatus {
    /// Configured name.
    pub name: String,
    /// DevEUI (hex, most significant first).
    pub dev_eui: String,
    /// `abp` or `otaa`.
    pub activation: String,
    /// Address its readings go to.
    pub address: String,
    /// Whether it has a session (ABP always; OTAA after a join).
    pub joined: bool,
    /// Current DevAddr (hex), when joined.
    pub dev_addr: Option<String>,
    /// Uplinks accepted since the node started.
    pub uplinks: u64,
    /// Joins accepted since the node started.
    pub joins: u64,
    /// Counter of the last accepted uplink.
    pub last_fcnt: Option<u32>,
    /// Counter the next downlink will use.
    pub fcnt_down: Option<u32>,
    /// Unix ms of the last accepted uplink or join.
    pub last_seen_ms: Option<i64>,
    /// Gateway that heard it best last time (EUI hex).
    pub last_gateway: Option<String>,
    /// RSSI of that reception, dBm.
    pub last_rssi: Option<i32>,
    /// SNR of that reception, dB.
    pub last_snr: Option<f64>,
}

/// One allow-listed gateway.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = LorawanGatewayStatus)]
pub struct GatewayStatus {
    /// Gateway EUI (hex).
    pub eui: String,
    /// PUSH_DATA datagrams received since the node started.
    pub push_data: u64,
    /// Unix ms of the last PUSH_DATA.
    pub last_push_ms: Option<i64>,
    /// Unix ms of the last PULL_DATA (keep-alive).
    pub last_pull_ms: Option<i64>,
    /// Whether downlinks can be sent to it (it has sent PULL_DATA).
    pub downlink_path: bool,
    /// TX_ACK reports with an error (the gateway could not send a downlink).
    pub tx_errors: u64,
}

/// The adapter's whole status.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[schema(as = LorawanAdapterStatus)]
pub struct Status {
    /// Configured devices, in config order.
    pub devices: Vec<DeviceStatus>,
    /// Allow-listed gateways, in config order.
    pub gateways: Vec<GatewayStatus>,
}

/// Unix ms now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
