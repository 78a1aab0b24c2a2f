//! Micheline values, the subset a call parameter needs (data, no instructions): the binary form
//! and the JSON form the Octez RPC uses, both ways (binary reading is the decoder's).

use num_bigint::BigInt;
use serde_json::{Value, json};

use super::binary::{put_dynamic, put_z};
use super::decode::Reader;
use super::short;
use crate::error::{Error, Result};

/// Deepest Micheline nesting the decoder accepts (outside input must not exhaust the stack).
pub(super) const MAX_MICHELINE_DEPTH: usize = 256;

/// Michelson data constructors and their binary codes (the values a call parameter holds;
/// instructions and types are never forged here).
pub(super) const DATA_PRIMS: [(&str, u8); 9] = [
    ("False", 3),
    ("Elt", 4),
    ("Left", 5),
    ("None", 6),
    ("Pair", 7),
    ("Right", 8),
    ("Some", 9),
    ("True", 10),
    ("Unit", 11),
];

/// A Micheline expression (the subset a call parameter needs: data, no instructions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Micheline {
    /// An integer (`int`, `nat`, `mutez`).
    Int(BigInt),
    /// A string (printable ASCII in Michelson).
    String(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A sequence `{ ... }`.
    Seq(Vec<Micheline>),
    /// A primitive application such as `Pair a b`.
    Prim {
        /// Its name (`Pair`, `Left`, `Unit`...).
        prim: String,
        /// Its arguments.
        args: Vec<Micheline>,
        /// Its annotations.
        annots: Vec<String>,
    },
}

impl Micheline {
    /// An integer.
    pub fn int(v: impl Into<BigInt>) -> Self {
        Micheline::Int(v.into())
    }

    /// `Pair a b`.
    pub fn pair(a: Micheline, b: Micheline) -> Self {
        Micheline::Prim { prim: "Pair".into(), args: vec![a, b], annots: Vec::new() }
    }

    /// The binary form (without the length prefix a parameter puts in front).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write(&mut out)?;
        Ok(out)
    }

    fn write(&self, out: &mut Vec<u8>) -> Result<()> {
        match self {
            Micheline::Int(i) => {
                out.push(0x00);
                put_z(i, out)
            }
            Micheline::String(s) => {
                out.push(0x01);
                put_dynamic(s.as_bytes(), out)
            }
            Micheline::Bytes(b) => {
                out.push(0x0a);
                put_dynamic(b, out)
            }
            Micheline::Seq(items) => {
                out.push(0x02);
                let mut inner = Vec::new();
                for item in items {
                    item.write(&mut inner)?;
                }
                put_dynamic(&inner, out)
            }
            Micheline::Prim { prim, args, annots } => {
                let code =
                    DATA_PRIMS.iter().find(|(name, _)| name == prim).map(|(_, code)| *code).ok_or_else(|| {
                        Error::encoding(format!("Micheline primitive {prim:?} is not a data constructor"))
                    })?;
                let with_annots = !annots.is_empty();
                let tag = match args.len() {
                    0 => 3,
                    1 => 5,
                    2 => 7,
                    _ => 9,
                } + u8::from(with_annots && args.len() < 3);
                out.push(tag);
                out.push(code);
                if args.len() < 3 {
                    for a in args {
                        a.write(out)?;
                    }
                } else {
                    let mut inner = Vec::new();
                    for a in args {
                        a.write(&mut inner)?;
                    }
                    put_dynamic(&inner, out)?;
                }
                if with_annots || args.len() >= 3 {
                    put_dynamic(annots.join(" ").as_bytes(), out)?;
                }
                Ok(())
            }
        }
    }

    /// Reads one expression from its binary form (all of `data`).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data);
        let m = r.micheline(0)?;
        r.finish("Micheline value")?;
        Ok(m)
    }

    /// The JSON form the Octez RPC uses.
    pub fn to_json(&self) -> Value {
        match self {
            Micheline::Int(i) => json!({ "int": i.to_string() }),
            Micheline::String(s) => json!({ "string": s }),
            Micheline::Bytes(b) => json!({ "bytes": hex::encode(b) }),
            Micheline::Seq(items) => Value::Array(items.iter().map(Micheline::to_json).collect()),
            Micheline::Prim { prim, args, annots } => {
                let mut o = serde_json::Map::new();
                o.insert("prim".into(), json!(prim));
                if !args.is_empty() {
                    o.insert("args".into(), Value::Array(args.iter().map(Micheline::to_json).collect()));
                }
                if !annots.is_empty() {
                    o.insert("annots".into(), json!(annots));
                }
                Value::Object(o)
            }
        }
    }

    /// Reads the JSON form the Octez RPC uses.
    pub fn from_json(v: &Value) -> Result<Self> {
        Self::from_json_at(v, 0)
    }

    fn from_json_at(v: &Value, depth: usize) -> Result<Self> {
        if depth > MAX_MICHELINE_DEPTH {
            return Err(Error::encoding("Micheline JSON nested too deep"));
        }
        match v {
            Value::Array(items) => {
                Ok(Micheline::Seq(items.iter().map(|i| Self::from_json_at(i, depth + 1)).collect::<Result<_>>()?))
            }
            Value::Object(o) => {
                if let Some(i) = o.get("int") {
                    let s = i.as_str().ok_or_else(|| Error::encoding("Micheline \"int\" is not a string"))?;
                    let n = s.parse::<BigInt>().map_err(|e| Error::encoding(format!("Micheline int {s:?}: {e}")))?;
                    Ok(Micheline::Int(n))
                } else if let Some(s) = o.get("string") {
                    let s = s.as_str().ok_or_else(|| Error::encoding("Micheline \"string\" is not a string"))?;
                    Ok(Micheline::String(s.to_string()))
                } else if let Some(b) = o.get("bytes") {
                    let s = b.as_str().ok_or_else(|| Error::encoding("Micheline \"bytes\" is not a string"))?;
                    let b = hex::decode(s).map_err(|e| Error::encoding(format!("Micheline bytes {s:?}: {e}")))?;
                    Ok(Micheline::Bytes(b))
                } else if let Some(p) = o.get("prim") {
                    let prim = p.as_str().ok_or_else(|| Error::encoding("Micheline \"prim\" is not a string"))?;
                    let args = match o.get("args") {
                        None => Vec::new(),
                        Some(Value::Array(a)) => {
                            a.iter().map(|i| Self::from_json_at(i, depth + 1)).collect::<Result<_>>()?
                        }
                        Some(_) => return Err(Error::encoding("Micheline \"args\" is not a list")),
                    };
                    let annots = match o.get("annots") {
                        None => Vec::new(),
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .map(str::to_string)
                                    .ok_or_else(|| Error::encoding("Micheline annotation is not a string"))
                            })
                            .collect::<Result<_>>()?,
                        Some(_) => return Err(Error::encoding("Micheline \"annots\" is not a list")),
                    };
                    Ok(Micheline::Prim { prim: prim.to_string(), args, annots })
                } else {
                    Err(Error::encoding(format!("not a Micheline expression: {}", short(v))))
                }
            }
            _ => Err(Error::encoding(format!("not a Micheline expression: {}", short(v)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micheline_round_trips() {
        let v = Micheline::pair(
            Micheline::Bytes(b"dev".to_vec()),
            Micheline::pair(
                Micheline::int(u64::MAX),
                Micheline::Prim {
                    prim: "Pair".into(),
                    args: vec![Micheline::String("x".into()), Micheline::int(-5), Micheline::Seq(vec![])],
                    annots: vec!["%a".into()],
                },
            ),
        );
        let bytes = v.to_bytes().unwrap();
        assert_eq!(Micheline::from_bytes(&bytes).unwrap(), v);
        assert_eq!(Micheline::from_json(&v.to_json()).unwrap(), v);
    }

    #[test]
    fn micheline_pair_of_int_bytes() {
        // Pair 1 0x00: tag 7 (two args, no annotations), Pair = 7, int 1, bytes of length 1.
        let v = Micheline::pair(Micheline::int(1), Micheline::Bytes(vec![0]));
        assert_eq!(v.to_bytes().unwrap(), [7, 7, 0, 1, 10, 0, 0, 0, 1, 0]);
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        fn micheline() -> impl Strategy<Value = Micheline> {
            let leaf = prop_oneof![
                any::<i64>().prop_map(Micheline::int),
                ".{0,12}".prop_map(Micheline::String),
                prop::collection::vec(any::<u8>(), 0..40).prop_map(Micheline::Bytes),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Micheline::Seq),
                    (
                        prop::sample::select(DATA_PRIMS.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>()),
                        prop::collection::vec(inner, 0..4),
                        prop::collection::vec("%[a-z]{1,5}", 0..2),
                    )
                        .prop_map(|(prim, args, annots)| Micheline::Prim { prim, args, annots }),
                ]
            })
        }

        proptest! {
            #[test]
            fn micheline_binary_and_json_round_trip(m in micheline()) {
                let bytes = m.to_bytes().unwrap();
                prop_assert_eq!(Micheline::from_bytes(&bytes).unwrap(), m.clone());
                prop_assert_eq!(Micheline::from_json(&m.to_json()).unwrap(), m);
            }
        }
    }
}
