//! Registers to values and back: data types, byte and word order, scale and offset.

use crate::config::{DataType, Function, Order, PointConfig};

/// A decoded point value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A bit, or a register read as non-zero.
    Bool(bool),
    /// An integer type without scale or offset.
    Int(i128),
    /// A float type, or any number after scale and offset.
    Float(f64),
    /// A string point.
    Text(String),
}

impl Value {
    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => {
                if let Ok(v) = i64::try_from(*i) {
                    v.into()
                } else if let Ok(v) = u64::try_from(*i) {
                    v.into()
                } else {
                    // Unreachable for 64-bit registers; kept total instead of panicking.
                    serde_json::Value::String(i.to_string())
                }
            }
            Value::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Value::Text(s) => serde_json::Value::String(s.clone()),
        }
    }

    /// The value as a number, for deadband comparisons.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Bool(_) | Value::Text(_) => None,
        }
    }
}

/// Why registers could not be read as a point's value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The response held fewer registers than the point spans.
    #[error("expected {expected} registers, got {got}")]
    Short {
        /// Registers the point spans.
        expected: usize,
        /// Registers present.
        got: usize,
    },
    /// A float register pair held NaN or an infinity.
    #[error("value is not a finite number")]
    NotFinite,
    /// A string point held bytes that are not UTF-8.
    #[error("string registers are not valid UTF-8")]
    NotUtf8,
}

/// Why a set-point cannot be written to a point.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    /// The JSON value has the wrong kind for the point.
    #[error("expected {0}")]
    WrongKind(&'static str),
    /// The raw value after offset and scale does not fit the type.
    #[error("raw value {raw} does not fit {ty}")]
    OutOfRange {
        /// Raw value after removing offset and scale.
        raw: f64,
        /// The point's type.
        ty: &'static str,
    },
}

/// What to write for a set-point.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    /// One coil.
    Bit(bool),
    /// Holding registers from the point's first register.
    Words(Vec<u16>),
}

fn word_bytes(w: u16, order: Order) -> [u8; 2] {
    match order {
        Order::Big => w.to_be_bytes(),
        Order::Little => w.to_le_bytes(),
    }
}

fn word_of(b: [u8; 2], order: Order) -> u16 {
    match order {
        Order::Big => u16::from_be_bytes(b),
        Order::Little => u16::from_le_bytes(b),
    }
}

/// The point's bytes, most significant first.
fn bytes_of(point: &PointConfig, words: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 2);
    let mut push = |w: u16| out.extend_from_slice(&word_bytes(w, point.byte_order));
    match point.word_order {
        Order::Big => words.iter().copied().for_each(&mut push),
        Order::Little => words.iter().rev().copied().for_each(&mut push),
    }
    out
}

fn scaled(point: &PointConfig, raw: Value) -> Value {
    let identity = point.scale == 1.0 && point.offset == 0.0;
    match raw {
        Value::Int(i) if !identity => Value::Float(i as f64 * point.scale + point.offset),
        Value::Float(f) if !identity => Value::Float(f * point.scale + point.offset),
        v => v,
    }
}

/// Decodes a bit-table point.
pub fn decode_bit(bit: bool) -> Value {
    Value::Bool(bit)
}

/// Decodes a register point from exactly its registers (extra registers are ignored).
pub fn decode(point: &PointConfig, words: &[u16]) -> Result<Value, DecodeError> {
    let n = usize::from(point.len());
    let words = words.get(..n).ok_or(DecodeError::Short { expected: n, got: words.len() })?;
    let b = bytes_of(point, words);
    let arr = |k: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[8 - k..].copy_from_slice(&b[..k]);
        a
    };
    let raw = match point.data_type {
        DataType::Bool => Value::Bool(words.iter().any(|w| *w != 0)),
        DataType::U16 => Value::Int(i128::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::I16 => Value::Int(i128::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::U32 => Value::Int(i128::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::I32 => Value::Int(i128::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::U64 => Value::Int(i128::from(u64::from_be_bytes(arr(8)))),
        DataType::I64 => Value::Int(i128::from(i64::from_be_bytes(arr(8)))),
        DataType::F32 => {
            let f = f32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if !f.is_finite() {
                return Err(DecodeError::NotFinite);
            }
            Value::Float(f64::from(f))
        }
        DataType::F64 => {
            let f = f64::from_be_bytes(arr(8));
            if !f.is_finite() {
                return Err(DecodeError::NotFinite);
            }
            Value::Float(f)
        }
        DataType::String => return decode_text(point, words),
    };
    let v = scaled(point, raw);
    if let Value::Float(f) = v
        && !f.is_finite()
    {
        return Err(DecodeError::NotFinite);
    }
    Ok(v)
}

fn decode_text(point: &PointConfig, words: &[u16]) -> Result<Value, DecodeError> {
    // Text is stored in register order whatever the numeric word order.
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| word_bytes(*w, point.byte_order)).collect();
    while matches!(bytes.last(), Some(0 | b' ')) {
        bytes.pop();
    }
    String::from_utf8(bytes).map(Value::Text).map_err(|_| DecodeError::NotUtf8)
}

fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::Bool => "bool",
        DataType::U16 => "u16",
        DataType::I16 => "i16",
        DataType::U32 => "u32",
        DataType::I32 => "i32",
        DataType::U64 => "u64",
        DataType::I64 => "i64",
        DataType::F32 => "f32",
        DataType::F64 => "f64",
        DataType::String => "string",
    }
}

fn words_of(point: &PointConfig, be: &[u8]) -> Vec<u16> {
    let mut words: Vec<u16> =
        be.chunks(2).map(|c| word_of([c[0], c.get(1).copied().unwrap_or(0)], point.byte_order)).collect();
    if point.word_order == Order::Little {
        words.reverse();
    }
    words
}

/// Encodes a set-point given in engineering units (the inverse of [`decode`]).
pub fn encode(point: &PointConfig, value: &serde_json::Value) -> Result<Encoded, EncodeError> {
    if point.function == Function::Coil || point.data_type == DataType::Bool {
        let b = match value {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) if n.as_u64() == Some(0) => false,
            serde_json::Value::Number(n) if n.as_u64() == Some(1) => true,
            _ => return Err(EncodeError::WrongKind("true or false")),
        };
        return Ok(if point.function == Function::Coil { Encoded::Bit(b) } else { Encoded::Words(vec![u16::from(b)]) });
    }
    let v = value.as_f64().ok_or(EncodeError::WrongKind("a number"))?;
    let raw = (v - point.offset) / point.scale;
    let ty = type_name(point.data_type);
    let out_of_range = || EncodeError::OutOfRange { raw, ty };
    if !raw.is_finite() {
        return Err(out_of_range());
    }
    let int = |lo: f64, hi: f64| -> Result<i128, EncodeError> {
        let r = raw.round();
        if r < lo || r > hi { Err(out_of_range()) } else { Ok(r as i128) }
    };
    let be: Vec<u8> = match point.data_type {
        DataType::U16 => (int(0.0, f64::from(u16::MAX))? as u16).to_be_bytes().to_vec(),
        DataType::I16 => (int(f64::from(i16::MIN), f64::from(i16::MAX))? as i16).to_be_bytes().to_vec(),
        DataType::U32 => (int(0.0, f64::from(u32::MAX))? as u32).to_be_bytes().to_vec(),
        DataType::I32 => (int(f64::from(i32::MIN), f64::from(i32::MAX))? as i32).to_be_bytes().to_vec(),
        DataType::U64 => (int(0.0, u64::MAX as f64)? as u64).to_be_bytes().to_vec(),
        DataType::I64 => (int(i64::MIN as f64, i64::MAX as f64)? as i64).to_be_bytes().to_vec(),
        DataType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(out_of_range());
            }
            (raw as f32).to_be_bytes().to_vec()
        }
        DataType::F64 => raw.to_be_bytes().to_vec(),
        DataType::Bool | DataType::String => return Err(EncodeError::WrongKind("a writable numeric point")),
    };
    Ok(Encoded::Words(words_of(point, &be)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(t: DataType, byte: Order, word: Order) -> PointConfig {
        PointConfig { data_type: t, byte_order: byte, word_order: word, key: "k".into(), ..PointConfig::default() }
    }

    // 123456.0f32 = 0x47F12000: the four orders vendors document as ABCD, CDAB, BADC, DCBA.
    #[test]
    fn float_in_every_documented_order() {
        let cases = [
            (Order::Big, Order::Big, [0x47F1, 0x2000]),
            (Order::Big, Order::Little, [0x2000, 0x47F1]),
            (Order::Little, Order::Big, [0xF147, 0x0020]),
            (Order::Little, Order::Little, [0x0020, 0xF147]),
        ];
        for (byte, word, regs) in cases {
            let p = point(DataType::F32, byte, word);
            assert_eq!(decode(&p, &regs), Ok(Value::Float(123456.0)), "{byte:?}/{word:?}");
        }
    }

    #[test]
    fn integers_signs_and_widths() {
        let p = point(DataType::I16, Order::Big, Order::Big);
        assert_eq!(decode(&p, &[0xFFFE]), Ok(Value::Int(-2)));
        let p = point(DataType::U32, Order::Big, Order::Little);
        assert_eq!(decode(&p, &[0x0001, 0x0002]), Ok(Value::Int(0x0002_0001)));
        let p = point(DataType::U64, Order::Big, Order::Big);
        assert_eq!(decode(&p, &[0xFFFF; 4]), Ok(Value::Int(i128::from(u64::MAX))));
        assert_eq!(Value::Int(i128::from(u64::MAX)).to_json(), serde_json::json!(u64::MAX));
        let p = point(DataType::I64, Order::Big, Order::Big);
        assert_eq!(decode(&p, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]), Ok(Value::Int(-1)));
    }

    #[test]
    fn scale_offset_and_short_responses() {
        let mut p = point(DataType::I16, Order::Big, Order::Big);
        p.scale = 0.1;
        p.offset = -40.0;
        let Ok(Value::Float(f)) = decode(&p, &[655]) else { panic!() };
        assert!((f - 25.5).abs() < 1e-9);
        let p = point(DataType::F64, Order::Big, Order::Big);
        assert_eq!(decode(&p, &[1, 2]), Err(DecodeError::Short { expected: 4, got: 2 }));
        let p = point(DataType::F32, Order::Big, Order::Big);
        assert_eq!(decode(&p, &[0x7FC0, 0]), Err(DecodeError::NotFinite));
    }

    #[test]
    fn strings_trim_padding_and_reject_bad_utf8() {
        let mut p = point(DataType::String, Order::Big, Order::Big);
        p.count = Some(3);
        assert_eq!(decode(&p, &[0x4142, 0x4300, 0x0000]), Ok(Value::Text("ABC".into())));
        p.byte_order = Order::Little;
        assert_eq!(decode(&p, &[0x4241, 0x4320, 0x2020]), Ok(Value::Text("AB C".into())));
        assert_eq!(decode(&p, &[0xFFFF, 0, 0]), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn setpoints_refuse_wrong_kinds_and_ranges() {
        let p = point(DataType::U16, Order::Big, Order::Big);
        assert_eq!(encode(&p, &serde_json::json!(70000)), Err(EncodeError::OutOfRange { raw: 70000.0, ty: "u16" }));
        assert_eq!(encode(&p, &serde_json::json!("x")), Err(EncodeError::WrongKind("a number")));
        assert_eq!(encode(&p, &serde_json::json!(-0.4)), Ok(Encoded::Words(vec![0])));
        let coil = PointConfig { function: Function::Coil, data_type: DataType::Bool, ..PointConfig::default() };
        assert_eq!(encode(&coil, &serde_json::json!(true)), Ok(Encoded::Bit(true)));
        assert_eq!(encode(&coil, &serde_json::json!(2)), Err(EncodeError::WrongKind("true or false")));
    }

    fn any_order() -> impl Strategy<Value = Order> {
        prop_oneof![Just(Order::Big), Just(Order::Little)]
    }

    proptest! {
        // Any integer written as a set-point reads back as itself, in every order and width.
        #[test]
        fn encode_then_decode_is_identity(v in any::<i32>(), byte in any_order(), word in any_order(), wide in any::<bool>()) {
            let ty = if wide { DataType::I64 } else { DataType::I32 };
            let p = point(ty, byte, word);
            let Ok(Encoded::Words(w)) = encode(&p, &serde_json::json!(v)) else { panic!() };
            prop_assert_eq!(decode(&p, &w), Ok(Value::Int(i128::from(v))));
        }

        #[test]
        fn scaled_floats_round_trip(raw in -1.0e6f64..1.0e6, scale in 0.001f64..100.0, offset in -100.0f64..100.0, byte in any_order(), word in any_order()) {
            let mut p = point(DataType::F64, byte, word);
            p.scale = scale;
            p.offset = offset;
            let v = raw * scale + offset;
            let Ok(Encoded::Words(w)) = encode(&p, &serde_json::json!(v)) else { panic!() };
            let Ok(Value::Float(back)) = decode(&p, &w) else { panic!() };
            prop_assert!((back - v).abs() <= 1e-6 * v.abs().max(1.0));
        }

        // Arbitrary register contents never panic the decoder, whatever the map says.
        #[test]
        fn decoding_arbitrary_words_is_total(words in proptest::collection::vec(any::<u16>(), 0..10), count in 0u16..6, byte in any_order(), word in any_order()) {
            for t in [DataType::Bool, DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::U64, DataType::I64, DataType::F32, DataType::F64, DataType::String] {
                let mut p = point(t, byte, word);
                p.count = Some(count);
                let _ = decode(&p, &words);
            }
        }
    }
}
