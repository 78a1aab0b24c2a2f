//! Payload codecs: turn the decrypted FRMPayload of an uplink into the JSON body of a transaction,
//! either as raw hex, as Cayenne LPP v1, or as fields read at configured byte offsets. Also owns the
//! validation of `[[lorawan.devices.fields]]`, since only the codec knows what a field can express.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value, json};

mod cayenne;

use cayenne::decode_lpp;

/// The largest application payload any LoRaWAN region allows; a field beyond it can never be read.
const MAX_FRM_PAYLOAD: usize = 242;

/// How a device's payload is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// The bytes as lowercase hex, for devices whose format the node does not know.
    #[default]
    Raw,
    /// Cayenne Low Power Payload v1 with the extended IPSO types.
    CayenneLpp,
    /// The device's `[[lorawan.devices.fields]]`.
    Fields,
}

/// How a field's bytes are read as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// One byte, unsigned.
    U8,
    /// One byte, two's complement.
    I8,
    /// Two bytes, unsigned.
    U16,
    /// Two bytes, two's complement.
    I16,
    /// Three bytes, unsigned.
    U24,
    /// Three bytes, two's complement.
    I24,
    /// Four bytes, unsigned.
    U32,
    /// Four bytes, two's complement.
    I32,
    /// Four bytes, IEEE 754 single precision.
    F32,
    /// One byte: non-zero, or one bit of it when `bit` is set.
    Bool,
}

impl FieldType {
    /// Bytes the type spans.
    pub fn size(self) -> usize {
        match self {
            FieldType::U8 | FieldType::I8 | FieldType::Bool => 1,
            FieldType::U16 | FieldType::I16 => 2,
            FieldType::U24 | FieldType::I24 => 3,
            FieldType::U32 | FieldType::I32 | FieldType::F32 => 4,
        }
    }

    /// Name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::U8 => "u8",
            FieldType::I8 => "i8",
            FieldType::U16 => "u16",
            FieldType::I16 => "i16",
            FieldType::U24 => "u24",
            FieldType::I24 => "i24",
            FieldType::U32 => "u32",
            FieldType::I32 => "i32",
            FieldType::F32 => "f32",
            FieldType::Bool => "bool",
        }
    }

    fn is_signed(self) -> bool {
        matches!(self, FieldType::I8 | FieldType::I16 | FieldType::I24 | FieldType::I32)
    }
}

/// Byte order of a multi-byte field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ByteOrder {
    /// Most significant byte first (network order, what most sensor vendors document).
    #[default]
    Big,
    /// Least significant byte first (what little-endian MCUs emit when they copy a struct).
    Little,
}

/// One field of the `fields` codec (config: `[[lorawan.devices.fields]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldConfig {
    /// Key of the value in the transaction body.
    pub name: String,
    /// First byte of the field in the FRMPayload, 0-based.
    pub offset: usize,
    /// How the bytes are read.
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// Byte order of multi-byte types.
    pub byte_order: ByteOrder,
    /// Value = raw * scale + add.
    pub scale: f64,
    /// Added after scaling.
    pub add: f64,
    /// Unit written beside the value (omitted when empty).
    pub unit: String,
    /// Only decode the field on uplinks to this FPort (devices often send one layout per port).
    pub fport: Option<u8>,
    /// For type `bool`: the bit (0 = least significant) of the byte; unset means the whole byte is non-zero.
    pub bit: Option<u8>,
}

impl Default for FieldConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            offset: 0,
            field_type: FieldType::U8,
            byte_order: ByteOrder::Big,
            scale: 1.0,
            add: 0.0,
            unit: String::new(),
            fport: None,
            bit: None,
        }
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// A Cayenne LPP value, or the type byte after its channel, runs past the end of the frame.
    #[error("cayenne lpp channel {channel}: needs {need} more bytes, the frame has {have} left")]
    LppTruncated {
        /// Channel of the value that is cut off.
        channel: u8,
        /// Bytes the value (or the type byte) needs.
        need: usize,
        /// Bytes left in the frame.
        have: usize,
    },
    /// A Cayenne LPP type this decoder does not know; its size is unknown, so the rest of the frame is too.
    #[error("cayenne lpp channel {channel}: unknown type {type_id}, the rest of the frame cannot be located")]
    UnknownLppType {
        /// Channel the unknown type was sent on.
        channel: u8,
        /// The unknown type id.
        type_id: u8,
    },
    /// A configured field runs past the end of the payload.
    #[error("field {field:?}: needs {need} payload bytes, the payload has {have}")]
    FieldTruncated {
        /// Name of the field.
        field: String,
        /// Payload length the field needs (offset + size).
        need: usize,
        /// Payload length received.
        have: usize,
    },
    /// A field is NaN or infinite, as an `f32` or after scale and add; JSON cannot carry it.
    #[error("field {field:?}: value is not a finite number")]
    NotFinite {
        /// Name of the field.
        field: String,
    },
}

/// Decodes an uplink's FRMPayload into the body of a transaction (`fields` is used by [`Codec::Fields`] only).
pub fn decode(codec: &Codec, fields: &[FieldConfig], fport: u8, payload: &[u8]) -> Result<Value, CodecError> {
    match codec {
        Codec::Raw => Ok(json!({ "fport": fport, "payload": hex::encode(payload) })),
        Codec::CayenneLpp => decode_lpp(fport, payload),
        Codec::Fields => decode_fields(fields, fport, payload),
    }
}

/// Every problem in a device's field list, each naming the field; empty when the list is usable.
///
/// An empty list is not reported: whether a device needs fields depends on its codec, which the caller knows.
pub fn validate_fields(fields: &[FieldConfig]) -> Vec<String> {
    let mut errs = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        let at = if f.name.is_empty() { format!("field #{}", i + 1) } else { format!("field {:?}", f.name) };
        if f.name.is_empty() {
            errs.push(format!("{at}: name is empty"));
        } else if !valid_name(&f.name) {
            errs.push(format!("{at}: name must be 1-64 of A-Z a-z 0-9 _ . -"));
        } else if fields.iter().take(i).any(|g| g.name == f.name && ports_overlap(g.fport, f.fport)) {
            // The same name on disjoint ports is how one measurement moves between frame layouts.
            errs.push(format!("{at}: name is used twice on the same FPort"));
        }
        match (f.field_type, f.bit) {
            (FieldType::Bool, Some(bit)) if bit > 7 => errs.push(format!("{at}: bit must be 0-7, not {bit}")),
            (FieldType::Bool, _) | (_, None) => {}
            (t, Some(_)) => errs.push(format!("{at}: bit applies to type \"bool\" only, not \"{}\"", t.as_str())),
        }
        if !f.scale.is_finite() || f.scale == 0.0 {
            errs.push(format!("{at}: scale must be a finite non-zero number"));
        }
        if !f.add.is_finite() {
            errs.push(format!("{at}: add must be a finite number"));
        }
        if f.field_type == FieldType::Bool && (f.scale != 1.0 || f.add != 0.0) {
            errs.push(format!("{at}: scale and add do not apply to type \"bool\""));
        }
        if let Some(port) = f.fport
            && !(1..=223).contains(&port)
        {
            errs.push(format!("{at}: fport must be 1-223 (0 carries MAC commands, 224-255 are reserved)"));
        }
        if f.offset.saturating_add(f.field_type.size()) > MAX_FRM_PAYLOAD {
            errs.push(format!("{at}: ends past byte {MAX_FRM_PAYLOAD}, the largest LoRaWAN application payload"));
        }
    }
    errs
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether two fields could both be decoded from one uplink.
fn ports_overlap(a: Option<u8>, b: Option<u8>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// A JSON number; callers only pass finite values, and JSON has no other kind.
fn float(v: f64) -> Value {
    Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// An integer of up to 8 bytes, sign-extended from its own width when `signed`.
fn read_int(bytes: &[u8], order: ByteOrder, signed: bool) -> i64 {
    let push = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
    let raw = match order {
        ByteOrder::Big => bytes.iter().fold(0, push),
        ByteOrder::Little => bytes.iter().rev().fold(0, push),
    };
    if !signed {
        return raw as i64;
    }
    let unused = 64u32.saturating_sub(u32::try_from(bytes.len()).unwrap_or(u32::MAX).saturating_mul(8));
    // Shifting the sign bit to the top and back (arithmetically) extends it over the unused high bits.
    (raw as i64).checked_shl(unused).map_or(0, |v| v >> unused)
}

fn decode_fields(fields: &[FieldConfig], fport: u8, payload: &[u8]) -> Result<Value, CodecError> {
    let mut values = Map::new();
    for f in fields.iter().filter(|f| f.fport.is_none_or(|p| p == fport)) {
        let mut entry = Map::new();
        entry.insert("value".into(), field_value(f, payload)?);
        if !f.unit.is_empty() {
            entry.insert("unit".into(), f.unit.clone().into());
        }
        values.insert(f.name.clone(), Value::Object(entry));
    }
    Ok(json!({ "fport": fport, "values": values }))
}

fn field_value(f: &FieldConfig, payload: &[u8]) -> Result<Value, CodecError> {
    let size = f.field_type.size();
    let bytes = f.offset.checked_add(size).and_then(|end| payload.get(f.offset..end)).ok_or_else(|| {
        CodecError::FieldTruncated { field: f.name.clone(), need: f.offset.saturating_add(size), have: payload.len() }
    })?;
    let not_finite = || CodecError::NotFinite { field: f.name.clone() };
    let identity = f.scale == 1.0 && f.add == 0.0;
    match f.field_type {
        FieldType::Bool => {
            let byte = bytes.first().copied().unwrap_or(0);
            // validate_fields rejects bit > 7; reading such a bit as 0 keeps decoding total.
            let on = match f.bit {
                Some(bit) => byte.checked_shr(u32::from(bit)).unwrap_or(0) & 1 == 1,
                None => byte != 0,
            };
            Ok(Value::Bool(on))
        }
        FieldType::F32 => {
            let x = f32::from_bits(read_int(bytes, f.byte_order, false) as u32);
            if !x.is_finite() {
                return Err(not_finite());
            }
            // Through the shortest decimal that reads back as the same f32: the sensor meant 27.2,
            // not the 27.200000762939453 a plain widening to f64 would show.
            let shortest = x.to_string();
            let x: f64 = shortest.parse().map_err(|_| not_finite())?;
            if identity {
                return Ok(float(x));
            }
            let places = decimals(&shortest).saturating_add(decimals(&f.scale.to_string()));
            scaled(x * f.scale + f.add, places.max(decimals(&f.add.to_string()))).ok_or_else(not_finite)
        }
        t => {
            let raw = read_int(bytes, f.byte_order, t.is_signed());
            if identity {
                return Ok(raw.into());
            }
            let places = decimals(&f.scale.to_string()).max(decimals(&f.add.to_string()));
            scaled(raw as f64 * f.scale + f.add, places).ok_or_else(not_finite)
        }
    }
}

/// Digits after the decimal point of a number as Rust prints it (never in exponent form).
fn decimals(printed: &str) -> usize {
    printed.split_once('.').map_or(0, |(_, frac)| frac.len())
}

/// Rounds to `places` decimals, which is where the exact decimal result of raw * scale + add ends,
/// so binary noise (27.200000000000003) does not reach the chain; `None` when not finite.
fn scaled(v: f64, places: usize) -> Option<Value> {
    if !v.is_finite() {
        return None;
    }
    let rounded: f64 = format!("{v:.places$}").parse().unwrap_or(v);
    // -0.0 from a negative scale of a zero reading would print as "-0.0" and read as a sign error.
    let rounded = if rounded == 0.0 { 0.0 } else { rounded };
    Number::from_f64(rounded).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::cayenne::lpp_type;
    use super::*;
    use proptest::prelude::*;

    /// Every type id `lpp_type` knows, so the table and the tests cannot drift apart unnoticed.
    const LPP_IDS: [u8; 26] = [
        0, 1, 2, 3, 100, 101, 102, 103, 104, 113, 115, 116, 117, 118, 120, 121, 125, 128, 130, 131, 132, 133, 134, 135,
        136, 142,
    ];

    fn bytes(hex_text: &str) -> Vec<u8> {
        hex::decode(hex_text.replace(' ', "")).unwrap()
    }

    fn lpp_frame(hex_text: &str) -> Result<Value, CodecError> {
        decode(&Codec::CayenneLpp, &[], 1, &bytes(hex_text))
    }

    fn field(name: &str, offset: usize, t: FieldType, order: ByteOrder) -> FieldConfig {
        FieldConfig { name: name.into(), offset, field_type: t, byte_order: order, ..FieldConfig::default() }
    }

    fn value_of(fields: &[FieldConfig], fport: u8, payload: &[u8], name: &str) -> Value {
        let body = decode(&Codec::Fields, fields, fport, payload).unwrap();
        body["values"][name]["value"].clone()
    }

    #[test]
    fn raw_is_lowercase_hex() {
        let body = decode(&Codec::Raw, &[], 7, &[0xDE, 0xAD, 0x01]).unwrap();
        assert_eq!(body, json!({ "fport": 7, "payload": "dead01" }));
        assert_eq!(decode(&Codec::Raw, &[], 0, &[]).unwrap(), json!({ "fport": 0, "payload": "" }));
    }

    struct LppCase {
        name: &'static str,
        frame: &'static str,
        channels: Value,
    }

    // The examples in myDevices' Cayenne LPP documentation.
    #[test]
    fn lpp_documented_examples() {
        let cases = [
            LppCase {
                name: "two temperature sensors",
                frame: "03 67 01 10 05 67 00 FF",
                channels: json!([
                    { "channel": 3, "type": "temperature", "value": 27.2, "unit": "C" },
                    { "channel": 5, "type": "temperature", "value": 25.5, "unit": "C" },
                ]),
            },
            LppCase {
                name: "negative temperature",
                frame: "01 67 FF D7",
                channels: json!([{ "channel": 1, "type": "temperature", "value": -4.1, "unit": "C" }]),
            },
            LppCase {
                name: "accelerometer",
                frame: "06 71 04 D2 FB 2E 00 00",
                channels: json!([{
                    "channel": 6, "type": "accelerometer", "value": { "x": 1.234, "y": -1.234, "z": 0.0 }, "unit": "G"
                }]),
            },
            LppCase {
                name: "gps",
                frame: "01 88 06 76 5f f2 96 0a 00 03 e8",
                channels: json!([{
                    "channel": 1, "type": "gps",
                    "value": { "latitude": 42.3519, "longitude": -87.9094, "altitude": 10.0 }
                }]),
            },
            LppCase { name: "empty frame", frame: "", channels: json!([]) },
        ];
        for c in cases {
            assert_eq!(lpp_frame(c.frame), Ok(json!({ "fport": 1, "channels": c.channels })), "{}", c.name);
        }
    }

    #[test]
    fn lpp_every_type() {
        let cases: [(&str, &str, Value, &str); 26] = [
            ("00 00 01", "digital_input", json!(1), ""),
            ("00 01 00", "digital_output", json!(0), ""),
            ("00 02 FF 9C", "analog_input", json!(-1.0), ""),
            ("00 03 04 D2", "analog_output", json!(12.34), ""),
            ("00 64 FF FF FF FF", "generic_sensor", json!(4_294_967_295u32), ""),
            ("00 65 FF FF", "illuminance", json!(65535), "lux"),
            ("00 66 01", "presence", json!(1), ""),
            ("00 67 80 00", "temperature", json!(-3276.8), "C"),
            ("00 68 61", "humidity", json!(48.5), "%"),
            ("00 71 00 01 FF FF 03 E8", "accelerometer", json!({ "x": 0.001, "y": -0.001, "z": 1.0 }), "G"),
            ("00 73 27 D5", "barometer", json!(1019.7), "hPa"),
            ("00 74 01 5E", "voltage", json!(3.5), "V"),
            ("00 75 FF FF", "current", json!(65.535), "A"),
            ("00 76 00 0D BB A0", "frequency", json!(900_000), "Hz"),
            ("00 78 64", "percentage", json!(100), "%"),
            ("00 79 FF F6", "altitude", json!(-10), "m"),
            ("00 7D 01 90", "concentration", json!(400), "ppm"),
            ("00 80 0B B8", "power", json!(3000), "W"),
            ("00 82 00 00 30 39", "distance", json!(12.345), "m"),
            ("00 83 00 01 E2 40", "energy", json!(123.456), "kWh"),
            ("00 84 01 68", "direction", json!(360), "deg"),
            ("00 85 65 4A 0C 00", "unix_time", json!(1_699_351_552), "s"),
            ("00 86 00 64 FF 9C 00 00", "gyrometer", json!({ "x": 1.0, "y": -1.0, "z": 0.0 }), "deg/s"),
            ("00 87 FF 80 00", "colour", json!({ "r": 255, "g": 128, "b": 0 }), ""),
            (
                "00 88 F9 89 A1 06 76 5F FF FF 9C",
                "gps",
                json!({ "latitude": -42.3519, "longitude": 42.3519, "altitude": -1.0 }),
                "",
            ),
            ("00 8E 01", "switch", json!(1), ""),
        ];
        for (frame, name, value, unit) in cases {
            let mut want = json!({ "channel": 0, "type": name, "value": value });
            if !unit.is_empty() {
                want["unit"] = unit.into();
            }
            assert_eq!(lpp_frame(frame), Ok(json!({ "fport": 1, "channels": [want] })), "{name}");
        }
    }

    #[test]
    fn lpp_table_matches_the_known_ids() {
        let known: Vec<u8> = (0..=u8::MAX).filter(|id| lpp_type(*id).is_some()).collect();
        assert_eq!(known, LPP_IDS);
    }

    #[test]
    fn lpp_errors_name_the_channel() {
        let cases = [
            ("03 67 01", CodecError::LppTruncated { channel: 3, need: 2, have: 1 }),
            ("03 67 01 10 05", CodecError::LppTruncated { channel: 5, need: 1, have: 0 }),
            ("01 88 06 76 5f f2 96 0a 00 03", CodecError::LppTruncated { channel: 1, need: 9, have: 8 }),
            ("03 67 01 10 04 FF 00 00", CodecError::UnknownLppType { channel: 4, type_id: 255 }),
            ("09 04 00", CodecError::UnknownLppType { channel: 9, type_id: 4 }),
        ];
        for (frame, want) in cases {
            assert_eq!(lpp_frame(frame), Err(want.clone()), "{frame}");
        }
        let msg = lpp_frame("03 67 01").unwrap_err().to_string();
        assert!(msg.contains("channel 3") && msg.contains("needs 2") && msg.contains("has 1"), "{msg}");
        let msg = lpp_frame("07 C8").unwrap_err().to_string();
        assert!(msg.contains("channel 7") && msg.contains("type 200"), "{msg}");
    }

    #[test]
    fn fields_every_type_in_both_byte_orders() {
        use FieldType::*;
        let cases: [(FieldType, &str, &str, Value); 12] = [
            (U8, "FE", "FE", json!(254)),
            (I8, "FE", "FE", json!(-2)),
            (U16, "12 34", "34 12", json!(0x1234)),
            (I16, "FF 38", "38 FF", json!(-200)),
            (U24, "12 34 56", "56 34 12", json!(0x12_3456)),
            (I24, "F2 96 0A", "0A 96 F2", json!(-879_094)),
            (I24, "7F FF FF", "FF FF 7F", json!(8_388_607)),
            (U32, "FF FF FF FE", "FE FF FF FF", json!(4_294_967_294u32)),
            (I32, "80 00 00 00", "00 00 00 80", json!(i32::MIN)),
            (I32, "FF FF FF FF", "FF FF FF FF", json!(-1)),
            (F32, "41 D9 99 9A", "9A 99 D9 41", json!(27.2)),
            (Bool, "02", "02", json!(true)),
        ];
        for (t, big, little, want) in cases {
            // A leading byte checks that the offset is honoured.
            for (order, hex_text) in [(ByteOrder::Big, big), (ByteOrder::Little, little)] {
                let payload = bytes(&format!("AA {hex_text} BB"));
                let got = value_of(&[field("v", 1, t, order)], 2, &payload, "v");
                assert_eq!(got, want, "{} {order:?}", t.as_str());
            }
        }
    }

    #[test]
    fn bool_reads_one_bit_or_the_whole_byte() {
        let payload = [0b1000_0101];
        let flags: Vec<FieldConfig> = (0..8u8)
            .map(|bit| FieldConfig { bit: Some(bit), ..field(&format!("b{bit}"), 0, FieldType::Bool, ByteOrder::Big) })
            .collect();
        let body = decode(&Codec::Fields, &flags, 1, &payload).unwrap();
        let got: Vec<bool> = (0..8).map(|bit| body["values"][format!("b{bit}")]["value"] == json!(true)).collect();
        assert_eq!(got, [true, false, true, false, false, false, false, true]);
        let whole = field("any", 0, FieldType::Bool, ByteOrder::Big);
        assert_eq!(value_of(std::slice::from_ref(&whole), 1, &[0], "any"), json!(false));
        assert_eq!(value_of(&[whole], 1, &[0x10], "any"), json!(true));
    }

    #[test]
    fn fport_filter_and_units() {
        let fields = [
            FieldConfig { unit: "C".into(), ..field("temp", 0, FieldType::I16, ByteOrder::Big) },
            FieldConfig { fport: Some(2), ..field("battery", 2, FieldType::U8, ByteOrder::Big) },
            // Only on port 3, where it would run past this payload.
            FieldConfig { fport: Some(3), ..field("late", 10, FieldType::U32, ByteOrder::Big) },
        ];
        let payload = [0x01, 0x10, 0x5A];
        let body = decode(&Codec::Fields, &fields, 2, &payload).unwrap();
        assert_eq!(
            body,
            json!({ "fport": 2, "values": { "temp": { "value": 272, "unit": "C" }, "battery": { "value": 90 } } })
        );
        let body = decode(&Codec::Fields, &fields, 1, &payload).unwrap();
        assert_eq!(body, json!({ "fport": 1, "values": { "temp": { "value": 272, "unit": "C" } } }));
        assert!(decode(&Codec::Fields, &fields, 3, &payload).is_err());
    }

    #[test]
    fn scale_and_add_without_binary_noise() {
        let with = |t: FieldType, scale: f64, add: f64| FieldConfig { scale, add, ..field("v", 0, t, ByteOrder::Big) };
        let cases = [
            (with(FieldType::I16, 0.1, 0.0), vec![0x01, 0x10], json!(27.2)),
            (with(FieldType::I16, 0.1, 0.0), vec![0xFF, 0xD7], json!(-4.1)),
            (with(FieldType::U8, 0.5, -40.0), vec![0x64], json!(10.0)),
            (with(FieldType::U16, 0.01, 0.03), vec![0x01, 0x5E], json!(3.53)),
            (with(FieldType::U8, 1.0, -40.0), vec![0x41], json!(25.0)),
            (with(FieldType::U8, -0.1, 0.0), vec![0x00], json!(0.0)),
            (with(FieldType::U32, 0.001, 0.0), vec![0xFF, 0xFF, 0xFF, 0xFF], json!(4_294_967.295)),
            (with(FieldType::F32, 0.1, 0.0), vec![0x41, 0xD9, 0x99, 0x9A], json!(2.72)),
            (with(FieldType::F32, 1.0, 0.0), vec![0x3D, 0xCC, 0xCC, 0xCD], json!(0.1)),
        ];
        for (f, payload, want) in cases {
            assert_eq!(value_of(std::slice::from_ref(&f), 1, &payload, "v"), want, "{f:?}");
        }
        let got = value_of(&[with(FieldType::U8, -0.1, 0.0)], 1, &[0x00], "v");
        assert!(got.as_f64().is_some_and(|v| v.is_sign_positive()), "{got}");
    }

    #[test]
    fn field_errors_name_the_field() {
        let f = field("pressure", 3, FieldType::U16, ByteOrder::Little);
        let err = decode(&Codec::Fields, std::slice::from_ref(&f), 1, &[0; 4]).unwrap_err();
        assert_eq!(err, CodecError::FieldTruncated { field: "pressure".into(), need: 5, have: 4 });
        assert_eq!(err.to_string(), "field \"pressure\": needs 5 payload bytes, the payload has 4");
        let far = field("far", usize::MAX, FieldType::U32, ByteOrder::Big);
        let err = decode(&Codec::Fields, &[far], 1, &[0; 8]).unwrap_err();
        assert_eq!(err, CodecError::FieldTruncated { field: "far".into(), need: usize::MAX, have: 8 });
        let nan = field("nan", 0, FieldType::F32, ByteOrder::Big);
        let err = decode(&Codec::Fields, &[nan], 1, &[0x7F, 0xC0, 0, 0]).unwrap_err();
        assert_eq!(err, CodecError::NotFinite { field: "nan".into() });
        let huge = FieldConfig { scale: f64::MAX, ..field("huge", 0, FieldType::U8, ByteOrder::Big) };
        let err = decode(&Codec::Fields, &[huge], 1, &[0xFF]).unwrap_err();
        assert_eq!(err, CodecError::NotFinite { field: "huge".into() });
    }

    #[test]
    fn validation_reports_every_mistake() {
        let ok = [
            FieldConfig { unit: "C".into(), scale: 0.1, ..field("Temp.1", 0, FieldType::I16, ByteOrder::Big) },
            FieldConfig { bit: Some(7), ..field("door-open", 2, FieldType::Bool, ByteOrder::Big) },
            FieldConfig { fport: Some(2), ..field("battery", 3, FieldType::U8, ByteOrder::Big) },
            FieldConfig { fport: Some(3), ..field("battery", 0, FieldType::U8, ByteOrder::Big) },
            field("last", 238, FieldType::F32, ByteOrder::Little),
        ];
        assert_eq!(validate_fields(&ok), Vec::<String>::new());
        assert_eq!(validate_fields(&[]), Vec::<String>::new());

        let bad = [
            field("", 0, FieldType::U8, ByteOrder::Big),
            field("temp °C", 0, FieldType::U8, ByteOrder::Big),
            field(&"x".repeat(65), 0, FieldType::U8, ByteOrder::Big),
            field("dup", 0, FieldType::U8, ByteOrder::Big),
            FieldConfig { fport: Some(9), ..field("dup", 1, FieldType::U8, ByteOrder::Big) },
            FieldConfig { bit: Some(8), ..field("flag", 0, FieldType::Bool, ByteOrder::Big) },
            FieldConfig { bit: Some(0), ..field("level", 0, FieldType::U16, ByteOrder::Big) },
            FieldConfig { scale: 0.0, ..field("zero", 0, FieldType::U8, ByteOrder::Big) },
            FieldConfig { scale: f64::NAN, add: f64::INFINITY, ..field("nan", 0, FieldType::U8, ByteOrder::Big) },
            FieldConfig { scale: 2.0, ..field("scaled_bool", 0, FieldType::Bool, ByteOrder::Big) },
            FieldConfig { fport: Some(0), ..field("mac", 0, FieldType::U8, ByteOrder::Big) },
            FieldConfig { fport: Some(224), ..field("test_port", 0, FieldType::U8, ByteOrder::Big) },
            field("past_end", 239, FieldType::U32, ByteOrder::Big),
        ];
        let errs = validate_fields(&bad);
        let want = [
            "field #1: name is empty",
            "field \"temp °C\": name must be",
            "name must be 1-64",
            "field \"dup\": name is used twice on the same FPort",
            "field \"flag\": bit must be 0-7, not 8",
            "field \"level\": bit applies to type \"bool\" only, not \"u16\"",
            "field \"zero\": scale must be a finite non-zero number",
            "field \"nan\": scale must be a finite non-zero number",
            "field \"nan\": add must be a finite number",
            "field \"scaled_bool\": scale and add do not apply to type \"bool\"",
            "field \"mac\": fport must be 1-223",
            "field \"test_port\": fport must be 1-223",
            "field \"past_end\": ends past byte 242",
        ];
        for w in want {
            assert!(errs.iter().any(|e| e.starts_with(w) || e.contains(w)), "missing {w:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), want.len(), "{errs:#?}");
    }

    #[test]
    fn config_names_and_defaults() {
        let f: FieldConfig =
            serde_json::from_str(r#"{"name": "t", "offset": 1, "type": "i24", "byte_order": "little", "scale": 0.1}"#)
                .unwrap();
        assert_eq!(f, FieldConfig { scale: 0.1, ..field("t", 1, FieldType::I24, ByteOrder::Little) });
        let f: FieldConfig = serde_json::from_str(r#"{"name": "b", "type": "bool", "bit": 3, "fport": 2}"#).unwrap();
        assert_eq!((f.bit, f.fport, f.scale, f.byte_order), (Some(3), Some(2), 1.0, ByteOrder::Big));
        assert!(serde_json::from_str::<FieldConfig>(r#"{"name": "t", "sacle": 2}"#).is_err());
        assert!(serde_json::from_str::<FieldConfig>(r#"{"name": "t", "type": "u64"}"#).is_err());
        let codecs: Vec<Codec> = serde_json::from_str(r#"["raw", "cayenne_lpp", "fields"]"#).unwrap();
        assert_eq!(codecs, [Codec::Raw, Codec::CayenneLpp, Codec::Fields]);
        assert_eq!(Codec::default(), Codec::Raw);
    }

    fn any_type() -> impl Strategy<Value = FieldType> {
        use FieldType::*;
        prop::sample::select(vec![U8, I8, U16, I16, U24, I24, U32, I32, F32, Bool])
    }

    fn any_int_type() -> impl Strategy<Value = FieldType> {
        use FieldType::*;
        prop::sample::select(vec![U8, I8, U16, I16, U24, I24, U32, I32])
    }

    fn any_order() -> impl Strategy<Value = ByteOrder> {
        prop_oneof![Just(ByteOrder::Big), Just(ByteOrder::Little)]
    }

    prop_compose! {
        // Unvalidated configs on purpose: decode must stay total even if validation was skipped.
        fn any_field()(
            name in "[a-c]{0,2}",
            offset in prop_oneof![0usize..16, any::<usize>()],
            field_type in any_type(),
            byte_order in any_order(),
            scale in prop_oneof![Just(1.0), Just(0.1), any::<f64>()],
            add in prop_oneof![Just(0.0), -100.0f64..100.0, any::<f64>()],
            fport in any::<Option<u8>>(),
            bit in any::<Option<u8>>(),
        ) -> FieldConfig {
            FieldConfig { name, offset, field_type, byte_order, scale, add, unit: String::new(), fport, bit }
        }
    }

    fn lpp_value_bytes() -> impl Strategy<Value = Vec<u8>> {
        (any::<u8>(), prop::sample::select(LPP_IDS.to_vec())).prop_flat_map(|(channel, id)| {
            let size = lpp_type(id).map_or(0, |t| t.size);
            prop::collection::vec(any::<u8>(), size).prop_map(move |data| [vec![channel, id], data].concat())
        })
    }

    proptest! {
        #[test]
        fn decode_is_total(
            payload in prop::collection::vec(any::<u8>(), 0..64),
            fport in any::<u8>(),
            fields in prop::collection::vec(any_field(), 0..6),
        ) {
            for codec in [Codec::Raw, Codec::CayenneLpp, Codec::Fields] {
                let _ = decode(&codec, &fields, fport, &payload);
            }
            let _ = validate_fields(&fields);
        }

        // Any sequence of well-formed LPP values decodes, one channel entry per value, in order.
        #[test]
        fn well_formed_lpp_frames_decode(values in prop::collection::vec(lpp_value_bytes(), 0..8)) {
            let body = decode(&Codec::CayenneLpp, &[], 1, &values.concat());
            let channels = body.as_ref().ok().and_then(|b| b["channels"].as_array()).cloned();
            prop_assert_eq!(channels.as_ref().map(Vec::len), Some(values.len()), "{:?}", body);
            for (entry, value) in channels.unwrap_or_default().iter().zip(&values) {
                prop_assert_eq!(entry["channel"].as_u64(), value.first().map(|c| u64::from(*c)));
            }
        }

        // A big- and a little-endian field over mirrored bytes read the same integer.
        #[test]
        fn byte_orders_mirror(v in any::<i32>(), t in any_int_type()) {
            let size = t.size();
            let be = v.to_be_bytes();
            let big: Vec<u8> = be.iter().skip(4 - size).copied().collect();
            let little: Vec<u8> = big.iter().rev().copied().collect();
            let read = |order, payload: &[u8]| value_of(&[field("v", 0, t, order)], 1, payload, "v");
            prop_assert_eq!(read(ByteOrder::Big, &big), read(ByteOrder::Little, &little));
        }
    }
}
