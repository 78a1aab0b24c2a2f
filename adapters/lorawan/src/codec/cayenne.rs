//! Cayenne LPP v1 (myDevices): a sequence of `[channel][type][value]`, values big-endian with
//! a fixed size and resolution per type.

use serde_json::{Map, Value, json};

use super::{ByteOrder, CodecError, float, read_int};

/// How the data bytes of an LPP type are read.
#[derive(Debug, Clone, Copy)]
pub(super) enum LppKind {
    /// One unsigned big-endian integer divided by the divisor (1: kept a JSON integer).
    Unsigned(u32),
    /// One two's complement big-endian integer divided by the divisor.
    Signed(u32),
    /// Three signed 16-bit axes divided by the divisor.
    Axes(u32),
    /// Three bytes: red, green, blue.
    Rgb,
    /// Latitude and longitude (signed 24-bit, 0.0001 deg) and altitude (signed 24-bit, 0.01 m).
    Gps,
}

/// One LPP type: its name, unit, value size and how the value is read.
#[derive(Debug, Clone, Copy)]
pub(super) struct LppType {
    name: &'static str,
    unit: &'static str,
    /// Bytes of the value.
    pub(super) size: usize,
    kind: LppKind,
}

const fn lpp(name: &'static str, unit: &'static str, size: usize, kind: LppKind) -> Option<LppType> {
    Some(LppType { name, unit, size, kind })
}

/// The LPP v1 types myDevices documents, plus the IPSO extensions TTN's and ElectronicCats' encoders emit.
pub(super) fn lpp_type(id: u8) -> Option<LppType> {
    use LppKind::{Axes, Gps, Rgb, Signed, Unsigned};
    match id {
        0 => lpp("digital_input", "", 1, Unsigned(1)),
        1 => lpp("digital_output", "", 1, Unsigned(1)),
        2 => lpp("analog_input", "", 2, Signed(100)),
        3 => lpp("analog_output", "", 2, Signed(100)),
        100 => lpp("generic_sensor", "", 4, Unsigned(1)),
        101 => lpp("illuminance", "lux", 2, Unsigned(1)),
        102 => lpp("presence", "", 1, Unsigned(1)),
        103 => lpp("temperature", "C", 2, Signed(10)),
        104 => lpp("humidity", "%", 1, Unsigned(2)),
        113 => lpp("accelerometer", "G", 6, Axes(1000)),
        115 => lpp("barometer", "hPa", 2, Unsigned(10)),
        116 => lpp("voltage", "V", 2, Unsigned(100)),
        117 => lpp("current", "A", 2, Unsigned(1000)),
        118 => lpp("frequency", "Hz", 4, Unsigned(1)),
        120 => lpp("percentage", "%", 1, Unsigned(1)),
        121 => lpp("altitude", "m", 2, Signed(1)),
        125 => lpp("concentration", "ppm", 2, Unsigned(1)),
        128 => lpp("power", "W", 2, Unsigned(1)),
        130 => lpp("distance", "m", 4, Unsigned(1000)),
        131 => lpp("energy", "kWh", 4, Unsigned(1000)),
        132 => lpp("direction", "deg", 2, Unsigned(1)),
        133 => lpp("unix_time", "s", 4, Unsigned(1)),
        134 => lpp("gyrometer", "deg/s", 6, Axes(100)),
        135 => lpp("colour", "", 3, Rgb),
        136 => lpp("gps", "", 9, Gps),
        142 => lpp("switch", "", 1, Unsigned(1)),
        _ => None,
    }
}

pub(super) fn decode_lpp(fport: u8, payload: &[u8]) -> Result<Value, CodecError> {
    let mut channels = Vec::new();
    let mut rest = payload;
    while let [channel, tail @ ..] = rest {
        let channel = *channel;
        let [type_id, tail @ ..] = tail else {
            return Err(CodecError::LppTruncated { channel, need: 1, have: 0 });
        };
        let ty = lpp_type(*type_id).ok_or(CodecError::UnknownLppType { channel, type_id: *type_id })?;
        let (data, tail) = tail.split_at_checked(ty.size).ok_or(CodecError::LppTruncated {
            channel,
            need: ty.size,
            have: tail.len(),
        })?;
        let mut entry = Map::new();
        entry.insert("channel".into(), channel.into());
        entry.insert("type".into(), ty.name.into());
        entry.insert("value".into(), lpp_value(ty.kind, data));
        if !ty.unit.is_empty() {
            entry.insert("unit".into(), ty.unit.into());
        }
        channels.push(Value::Object(entry));
        rest = tail;
    }
    Ok(json!({ "fport": fport, "channels": channels }))
}

/// Reads `data`, which holds exactly the type's size in bytes.
fn lpp_value(kind: LppKind, data: &[u8]) -> Value {
    let int =
        |at: usize, len: usize, signed: bool| data.get(at..at + len).map_or(0, |b| read_int(b, ByteOrder::Big, signed));
    match kind {
        LppKind::Unsigned(div) => divided(int(0, data.len(), false), div),
        LppKind::Signed(div) => divided(int(0, data.len(), true), div),
        LppKind::Axes(div) => json!({
            "x": divided(int(0, 2, true), div),
            "y": divided(int(2, 2, true), div),
            "z": divided(int(4, 2, true), div),
        }),
        LppKind::Rgb => json!({ "r": int(0, 1, false), "g": int(1, 1, false), "b": int(2, 1, false) }),
        LppKind::Gps => json!({
            "latitude": divided(int(0, 3, true), 10_000),
            "longitude": divided(int(3, 3, true), 10_000),
            "altitude": divided(int(6, 3, true), 100),
        }),
    }
}

/// `raw / div`, by division rather than multiplying by the resolution: dividing by an exact power of ten
/// gives the double nearest the decimal (27.2), where `272.0 * 0.1` gives 27.200000000000003.
fn divided(raw: i64, div: u32) -> Value {
    if div == 1 { raw.into() } else { float(raw as f64 / f64::from(div)) }
}
