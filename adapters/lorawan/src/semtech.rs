//! The Semtech UDP packet-forwarder protocol (versions 1 and 2): datagram headers,
//! `rxpk` uplinks parsed strictly, `txpk` downlinks and `txpk_ack` reports.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// Identifier of each datagram kind (byte 3 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Gateway -> server: uplinks and status.
    PushData,
    /// Server -> gateway: PUSH_DATA received.
    PushAck,
    /// Gateway -> server: keep-alive that opens the downlink path.
    PullData,
    /// Server -> gateway: a downlink to transmit.
    PullResp,
    /// Server -> gateway: PULL_DATA received.
    PullAck,
    /// Gateway -> server: outcome of a PULL_RESP.
    TxAck,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::PushData,
            1 => Kind::PushAck,
            2 => Kind::PullData,
            3 => Kind::PullResp,
            4 => Kind::PullAck,
            5 => Kind::TxAck,
            _ => return None,
        })
    }

    fn byte(self) -> u8 {
        match self {
            Kind::PushData => 0,
            Kind::PushAck => 1,
            Kind::PullData => 2,
            Kind::PullResp => 3,
            Kind::PullAck => 4,
            Kind::TxAck => 5,
        }
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than its header.
    #[error("datagram of {0} bytes is shorter than its header")]
    Short(usize),
    /// Protocol version other than 1 or 2.
    #[error("protocol version {0} is not 1 or 2")]
    Version(u8),
    /// Unknown identifier byte.
    #[error("unknown datagram identifier {0:#04x}")]
    Identifier(u8),
    /// A datagram only servers send arrived from a gateway.
    #[error("{0:?} is sent by servers, not gateways")]
    Direction(Kind),
    /// The JSON body is not what the protocol defines.
    #[error("invalid JSON body: {0}")]
    Json(String),
    /// An `rxpk` entry is inconsistent.
    #[error("rxpk #{index}: {reason}")]
    Rxpk {
        /// Position in the `rxpk` array.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl PacketError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PacketError::Short(_) | PacketError::Version(_) | PacketError::Identifier(_) => "malformed_header",
            PacketError::Direction(_) => "wrong_direction",
            PacketError::Json(_) => "malformed_json",
            PacketError::Rxpk { .. } => "malformed_rxpk",
        }
    }
}

/// One received LoRa frame as a gateway reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rxpk {
    /// Internal concentrator timestamp, µs (wraps).
    pub tmst: u32,
    /// UTC time of reception, when the gateway has GPS or NTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Frequency, MHz.
    pub freq: f64,
    /// Concentrator IF channel.
    #[serde(default)]
    pub chan: u8,
    /// Concentrator RF chain.
    #[serde(default)]
    pub rfch: u8,
    /// CRC status: 1 OK, -1 fail, 0 none.
    pub stat: i8,
    /// `LORA` or `FSK`.
    pub modu: String,
    /// LoRa: `SF7BW125`-style string; FSK: bits per second.
    pub datr: serde_json::Value,
    /// LoRa coding rate, e.g. `4/5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codr: Option<String>,
    /// RSSI, dBm.
    pub rssi: i32,
    /// LoRa SNR, dB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsnr: Option<f64>,
    /// Payload size, bytes.
    pub size: u32,
    /// PHYPayload, base64.
    pub data: String,
}

#[derive(Debug, Deserialize)]
struct PushBody {
    #[serde(default)]
    rxpk: Vec<serde_json::Value>,
}

/// A received frame with its decoded PHYPayload.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    /// Metadata.
    pub rx: Rxpk,
    /// PHYPayload bytes.
    pub phy: Vec<u8>,
}

impl Rxpk {
    /// The data rate as written by the gateway (`SF7BW125`, or FSK bit rate).
    pub fn data_rate(&self) -> String {
        match &self.datr {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

fn valid_lora_datr(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("SF") else { return false };
    let Some((sf, bw)) = rest.split_once("BW") else { return false };
    matches!(sf.parse::<u8>(), Ok(5..=12)) && matches!(bw, "125" | "250" | "500")
}

fn check_rxpk(index: usize, v: serde_json::Value) -> Result<Uplink, PacketError> {
    let bad = |reason: String| PacketError::Rxpk { index, reason };
    let rx: Rxpk = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
    if !rx.freq.is_finite() || rx.freq <= 0.0 || rx.freq > 10_000.0 {
        return Err(bad(format!("freq {} MHz is out of range", rx.freq)));
    }
    if !matches!(rx.stat, -1..=1) {
        return Err(bad(format!("stat {} is not 1, 0 or -1", rx.stat)));
    }
    match rx.modu.as_str() {
        "LORA" => {
            if !rx.datr.as_str().is_some_and(valid_lora_datr) {
                return Err(bad(format!("datr {} is not SF<5-12>BW<125|250|500>", rx.datr)));
            }
            if !rx.codr.as_deref().is_some_and(|c| matches!(c, "4/5" | "4/6" | "4/7" | "4/8" | "OFF")) {
                return Err(bad(format!("codr {:?} is not a LoRa coding rate", rx.codr)));
            }
        }
        "FSK" => {
            if rx.datr.as_u64().is_none_or(|r| r == 0) {
                return Err(bad(format!("FSK datr {} is not a bit rate", rx.datr)));
            }
        }
        m => return Err(bad(format!("modu {m:?} is not LORA or FSK"))),
    }
    if rx.lsnr.is_some_and(|s| !s.is_finite()) {
        return Err(bad("lsnr is not a number".into()));
    }
    let phy = B64.decode(rx.data.as_bytes()).map_err(|e| bad(format!("data is not base64: {e}")))?;
    if phy.len() != rx.size as usize {
        return Err(bad(format!("size {} but data holds {} bytes", rx.size, phy.len())));
    }
    if phy.is_empty() || phy.len() > 255 {
        return Err(bad(format!("a PHYPayload of {} bytes is impossible", phy.len())));
    }
    Ok(Uplink { rx, phy })
}

/// A datagram from a gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum FromGateway {
    /// Uplinks (each checked on its own; a bad entry does not hide the good ones).
    PushData {
        /// Protocol version to answer with.
        version: u8,
        /// Token to echo in PUSH_ACK.
        token: u16,
        /// Gateway EUI.
        gateway: [u8; 8],
        /// The `rxpk` entries, in order.
        uplinks: Vec<Result<Uplink, PacketError>>,
    },
    /// Keep-alive; its source address is where downlinks go.
    PullData {
        /// Protocol version to answer with.
        version: u8,
        /// Token to echo in PULL_ACK.
        token: u16,
        /// Gateway EUI.
        gateway: [u8; 8],
    },
    /// Outcome of a downlink.
    TxAck {
        /// Token of the PULL_RESP it answers.
        token: u16,
        /// Gateway EUI.
        gateway: [u8; 8],
        /// `NONE` on success, otherwise the gateway's error name.
        error: String,
    },
}

fn eui(b: &[u8]) -> Result<[u8; 8], PacketError> {
    b.get(4..12).and_then(|s| <[u8; 8]>::try_from(s).ok()).ok_or(PacketError::Short(b.len()))
}

/// Parses a datagram a gateway sent.
pub fn parse(b: &[u8]) -> Result<FromGateway, PacketError> {
    if b.len() < 4 {
        return Err(PacketError::Short(b.len()));
    }
    let version = b[0];
    if !matches!(version, 1 | 2) {
        return Err(PacketError::Version(version));
    }
    let token = u16::from_be_bytes([b[1], b[2]]);
    let kind = Kind::from_byte(b[3]).ok_or(PacketError::Identifier(b[3]))?;
    match kind {
        Kind::PushData => {
            let gateway = eui(b)?;
            let body: PushBody = serde_json::from_slice(&b[12..]).map_err(|e| PacketError::Json(e.to_string()))?;
            let uplinks = body.rxpk.into_iter().enumerate().map(|(i, v)| check_rxpk(i, v)).collect();
            Ok(FromGateway::PushData { version, token, gateway, uplinks })
        }
        Kind::PullData => {
            if b.len() != 12 {
                return Err(PacketError::Json(format!("PULL_DATA has {} bytes, not 12", b.len())));
            }
            Ok(FromGateway::PullData { version, token, gateway: eui(b)? })
        }
        Kind::TxAck => {
            let gateway = eui(b)?;
            let rest = &b[12..];
            let error = if rest.iter().all(u8::is_ascii_whitespace) {
                "NONE".to_string()
            } else {
                let v: serde_json::Value =
                    serde_json::from_slice(rest).map_err(|e| PacketError::Json(e.to_string()))?;
                v.get("txpk_ack").and_then(|a| a.get("error")).and_then(|e| e.as_str()).unwrap_or("NONE").to_string()
            };
            Ok(FromGateway::TxAck { token, gateway, error })
        }
        k @ (Kind::PushAck | Kind::PullAck | Kind::PullResp) => Err(PacketError::Direction(k)),
    }
}

/// PUSH_ACK or PULL_ACK for `token`.
pub fn ack(version: u8, token: u16, kind: Kind) -> [u8; 4] {
    let t = token.to_be_bytes();
    [version, t[0], t[1], kind.byte()]
}

/// A downlink for the gateway to transmit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Txpk {
    /// Send immediately (class C) instead of at `tmst`.
    #[serde(default)]
    pub imme: bool,
    /// Concentrator time to send at, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmst: Option<u32>,
    /// Frequency, MHz.
    pub freq: f64,
    /// RF chain.
    pub rfch: u8,
    /// Power, dBm.
    pub powe: u8,
    /// `LORA`.
    pub modu: String,
    /// Data rate.
    pub datr: String,
    /// Coding rate.
    pub codr: String,
    /// Inverted polarity (true for downlinks to devices).
    pub ipol: bool,
    /// Payload size.
    pub size: u32,
    /// PHYPayload, base64.
    pub data: String,
}

impl Txpk {
    /// A downlink of `phy` in the RX1 window of `rx` (same frequency and data rate), `delay_us` after it.
    pub fn rx1(rx: &Rxpk, phy: &[u8], delay_us: u32, power_dbm: u8) -> Txpk {
        Txpk {
            imme: false,
            tmst: Some(rx.tmst.wrapping_add(delay_us)),
            freq: rx.freq,
            rfch: 0,
            powe: power_dbm,
            modu: "LORA".into(),
            datr: rx.data_rate(),
            codr: rx.codr.clone().unwrap_or_else(|| "4/5".into()),
            ipol: true,
            size: phy.len() as u32,
            data: B64.encode(phy),
        }
    }
}

/// A PULL_RESP datagram carrying `txpk`.
pub fn pull_resp(version: u8, token: u16, txpk: &Txpk) -> Vec<u8> {
    let t = token.to_be_bytes();
    let mut out = vec![version, t[0], t[1], Kind::PullResp.byte()];
    let body = serde_json::json!({ "txpk": txpk });
    out.extend_from_slice(body.to_string().as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(json: &str) -> Vec<u8> {
        let mut b = vec![2, 0x12, 0x34, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        b.extend_from_slice(json.as_bytes());
        b
    }

    // The example PUSH_DATA of the packet forwarder's PROTOCOL.TXT, section 4.
    const SPEC_RXPK: &str = r#"{"rxpk":[{"time":"2013-03-31T16:21:17.528002Z","tmst":3512348611,"chan":2,"rfch":0,"freq":866.349812,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/6","rssi":-35,"lsnr":5.1,"size":32,"data":"-DS4CGaDCdG+48eJNM3Vai-zDpsR71Pn9CPA9uCON84"},{"time":"2013-03-31T16:21:17.530974Z","tmst":3512348514,"chan":9,"rfch":1,"freq":869.1,"stat":1,"modu":"FSK","datr":50000,"rssi":-75,"size":16,"data":"VEVTVF9QQUNLRVRfMTIzNA=="}]}"#;

    #[test]
    fn the_protocol_example_parses_entry_by_entry() {
        let Ok(FromGateway::PushData { version, token, gateway, uplinks }) = parse(&push(SPEC_RXPK)) else {
            panic!("not a PUSH_DATA")
        };
        assert_eq!((version, token, gateway), (2, 0x1234, [1, 2, 3, 4, 5, 6, 7, 8]));
        // The first entry's data uses the URL-safe alphabet, which the protocol does not allow.
        assert!(matches!(&uplinks[0], Err(PacketError::Rxpk { index: 0, reason }) if reason.contains("base64")));
        let fsk = uplinks[1].as_ref().unwrap();
        assert_eq!(fsk.phy, b"TEST_PACKET_1234");
        assert_eq!(fsk.rx.rssi, -75);
        assert_eq!(ack(2, 0x1234, Kind::PushAck), [2, 0x12, 0x34, 1]);
    }

    #[test]
    fn inconsistent_entries_are_named() {
        let cases = [
            (
                r#"{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF13BW125","codr":"4/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "datr",
            ),
            (
                r#"{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","rssi":-1,"size":2,"data":"AA=="}"#,
                "size 2",
            ),
            (
                r#"{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"5/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "codr",
            ),
            (
                r#"{"tmst":1,"freq":868.1,"stat":3,"modu":"LORA","datr":"SF7BW125","codr":"4/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "stat",
            ),
            (
                r#"{"tmst":1,"freq":"868.1","stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "invalid type",
            ),
            (
                r#"{"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "tmst",
            ),
            (
                r#"{"tmst":1,"freq":868.1,"stat":1,"modu":"GFSK","datr":"SF7BW125","codr":"4/5","rssi":-1,"size":1,"data":"AA=="}"#,
                "modu",
            ),
        ];
        for (entry, want) in cases {
            let Ok(FromGateway::PushData { uplinks, .. }) = parse(&push(&format!(r#"{{"rxpk":[{entry}]}}"#))) else {
                panic!("{entry}")
            };
            let err = uplinks[0].as_ref().unwrap_err().to_string();
            assert!(err.contains(want), "{entry}: {err}");
        }
    }

    #[test]
    fn headers_and_directions() {
        assert_eq!(parse(&[2, 0, 0]), Err(PacketError::Short(3)));
        assert_eq!(parse(&[3, 0, 0, 0]), Err(PacketError::Version(3)));
        assert_eq!(parse(&[2, 0, 0, 9]), Err(PacketError::Identifier(9)));
        assert_eq!(parse(&[2, 0, 0, 3]), Err(PacketError::Direction(Kind::PullResp)));
        assert_eq!(parse(&[2, 0, 0, 0, 1, 2]), Err(PacketError::Short(6)));
        assert!(matches!(parse(&push("{not json")), Err(PacketError::Json(_))));
        assert_eq!(
            parse(&[2, 0xab, 0xcd, 2, 1, 2, 3, 4, 5, 6, 7, 8]),
            Ok(FromGateway::PullData { version: 2, token: 0xabcd, gateway: [1, 2, 3, 4, 5, 6, 7, 8] })
        );
        let mut tx = vec![2, 0, 7, 5, 1, 2, 3, 4, 5, 6, 7, 8];
        tx.extend_from_slice(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
        assert!(matches!(parse(&tx), Ok(FromGateway::TxAck { token: 7, error, .. }) if error == "TOO_LATE"));
    }

    #[test]
    fn downlinks_answer_in_rx1() {
        let rx: Rxpk = serde_json::from_str(
            r#"{"tmst":4294967000,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF9BW125","codr":"4/5","rssi":-80,"lsnr":7.5,"size":1,"data":"AA=="}"#,
        )
        .unwrap();
        let tx = Txpk::rx1(&rx, &[1, 2, 3], 5_000_000, 14);
        assert_eq!(tx.tmst, Some(4_294_967_000u32.wrapping_add(5_000_000)));
        assert_eq!((tx.freq, tx.datr.as_str(), tx.ipol, tx.size), (868.1, "SF9BW125", true, 3));
        let d = pull_resp(2, 9, &tx);
        assert_eq!(&d[..4], &[2, 0, 9, 3]);
        let v: serde_json::Value = serde_json::from_slice(&d[4..]).unwrap();
        assert_eq!(v["txpk"]["data"], "AQID");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse(&b);
        }
    }
}
