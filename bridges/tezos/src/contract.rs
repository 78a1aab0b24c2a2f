//! The anchoring contract (`contracts/anchor.tz`) and the value of its `%anchor` parameter:
//! `Pair <chain name as UTF-8 bytes> (Pair <tree size> (Pair <32-byte root> <height>))`.

use num_bigint::BigInt;

use crate::forge::Micheline;

/// The contract's Michelson source.
pub const ANCHOR_CONTRACT: &str = include_str!("../contracts/anchor.tz");
/// The entrypoint an anchor calls.
pub const ENTRYPOINT: &str = "anchor";
/// The tag of the event each anchor emits.
pub const EVENT_TAG: &str = "anchored";

/// The initial storage to originate the contract with, as Michelson text: `admin` (the
/// anchoring account, `tz1...`) and no anchor yet.
pub fn initial_storage(admin: &str) -> String {
    format!("Pair \"{admin}\" {{}}")
}

/// What one anchor records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorParameter {
    /// The Kalima chain's name.
    pub chain: String,
    /// Transactions covered by the checkpoint.
    pub tree_size: u64,
    /// The Merkle root at that size.
    pub root: [u8; 32],
    /// The chain's block height at that size.
    pub height: u64,
}

impl AnchorParameter {
    /// The parameter value, as right-nested pairs.
    pub fn to_micheline(&self) -> Micheline {
        Micheline::pair(
            Micheline::Bytes(self.chain.as_bytes().to_vec()),
            Micheline::pair(
                Micheline::int(self.tree_size),
                Micheline::pair(Micheline::Bytes(self.root.to_vec()), Micheline::int(self.height)),
            ),
        )
    }

    /// Reads the parameter value, as right-nested pairs or as the flat comb `Pair a b c d`
    /// (both are the same Michelson value).
    pub fn from_micheline(m: &Micheline) -> Result<Self, String> {
        let [chain, tree_size, root, height] = comb4(m)?;
        let Micheline::Bytes(chain) = chain else { return Err("the chain name is not bytes".into()) };
        let chain = String::from_utf8(chain).map_err(|_| "the chain name is not UTF-8".to_string())?;
        let Micheline::Bytes(root) = root else { return Err("the root is not bytes".into()) };
        let root: [u8; 32] = root.try_into().map_err(|r: Vec<u8>| format!("the root is {} bytes, not 32", r.len()))?;
        Ok(Self { chain, tree_size: nat(tree_size, "tree size")?, root, height: nat(height, "height")? })
    }
}

fn nat(m: Micheline, what: &str) -> Result<u64, String> {
    match m {
        Micheline::Int(i) => u64::try_from(&i).map_err(|_| format!("the {what} {i} is not a 64-bit natural")),
        _ => Err(format!("the {what} is not an integer")),
    }
}

/// The four leaves of a right comb of pairs.
fn comb4(m: &Micheline) -> Result<[Micheline; 4], String> {
    let mut leaves = Vec::with_capacity(4);
    let mut cur = m.clone();
    while leaves.len() < 3 {
        let mut args = match cur {
            Micheline::Prim { prim, args, .. } if prim == "Pair" && args.len() >= 2 => args,
            Micheline::Seq(items) if items.len() >= 2 => items,
            _ => return Err("not a (pair bytes (pair nat (pair bytes nat))) value".into()),
        };
        let rest = args.split_off(1);
        leaves.extend(args);
        cur = if rest.len() == 1 {
            rest.into_iter().next().unwrap_or(Micheline::Int(BigInt::from(0)))
        } else {
            Micheline::Prim { prim: "Pair".into(), args: rest, annots: Vec::new() }
        };
    }
    leaves.push(cur);
    leaves.try_into().map_err(|_| "not a (pair bytes (pair nat (pair bytes nat))) value".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_reads_back_nested_and_flat() {
        let p = AnchorParameter { chain: "usine-é".into(), tree_size: 42, root: [3; 32], height: 7 };
        assert_eq!(AnchorParameter::from_micheline(&p.to_micheline()).unwrap(), p);
        let flat = Micheline::Prim {
            prim: "Pair".into(),
            args: vec![
                Micheline::Bytes(p.chain.as_bytes().to_vec()),
                Micheline::int(42u64),
                Micheline::Bytes(vec![3; 32]),
                Micheline::int(7u64),
            ],
            annots: vec![],
        };
        assert_eq!(AnchorParameter::from_micheline(&flat).unwrap(), p);
    }

    #[test]
    fn parameter_refuses_other_shapes() {
        let bad = [
            Micheline::int(1),
            Micheline::pair(Micheline::Bytes(vec![]), Micheline::int(1)),
            Micheline::pair(
                Micheline::Bytes(b"x".to_vec()),
                Micheline::pair(Micheline::int(1), Micheline::pair(Micheline::Bytes(vec![0; 31]), Micheline::int(1))),
            ),
            Micheline::pair(
                Micheline::Bytes(b"x".to_vec()),
                Micheline::pair(Micheline::int(-1), Micheline::pair(Micheline::Bytes(vec![0; 32]), Micheline::int(1))),
            ),
        ];
        for m in bad {
            assert!(AnchorParameter::from_micheline(&m).is_err(), "{m:?}");
        }
    }
}
