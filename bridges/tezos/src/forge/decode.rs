//! Unforging: a bounds-checked cursor over outside bytes that reads back what this module forges
//! (zarith numbers, contents, entrypoints, Micheline values) and refuses anything else, without
//! panicking or exhausting the stack. The stand-in Octez node and the tests read injected
//! operations with it.

use num_bigint::{BigInt, BigUint};
use tezos_crypto_rs::hash::{ContractKt1Hash, ContractTz1Hash, HashTrait, PublicKeyEd25519};

use super::content::{Content, ManagerFields, Parameters, RESERVED_ENTRYPOINTS};
use super::micheline::{DATA_PRIMS, MAX_MICHELINE_DEPTH, Micheline};
use super::{TAG_REVEAL, TAG_TRANSACTION};
use crate::error::{Error, Result};

/// A cursor over outside bytes: every read is bounds-checked.
pub(super) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(super) fn finish(&self, what: &str) -> Result<()> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(Error::encoding(format!("{} bytes left after the {what}", self.data.len() - self.pos)))
        }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len()).ok_or_else(|| {
            Error::encoding(format!("truncated: {n} bytes wanted at offset {} of {}", self.pos, self.data.len()))
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn dynamic(&mut self) -> Result<&'a [u8]> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().map_err(Error::encoding)?);
        self.take(len as usize)
    }

    pub(super) fn n(&mut self) -> Result<u64> {
        let rest = &self.data[self.pos..];
        let (left, v): (_, BigUint) = tezos_data_encoding::nom::n_bignum(rest)
            .map_err(|e| Error::encoding(format!("zarith natural at offset {}: {e:?}", self.pos)))?;
        self.pos += rest.len() - left.len();
        u64::try_from(&v).map_err(|_| Error::encoding(format!("natural {v} does not fit in 64 bits")))
    }

    fn z(&mut self) -> Result<BigInt> {
        let rest = &self.data[self.pos..];
        let (left, v) = tezos_data_encoding::nom::z_bignum(rest)
            .map_err(|e| Error::encoding(format!("zarith integer at offset {}: {e:?}", self.pos)))?;
        self.pos += rest.len() - left.len();
        Ok(v)
    }

    fn manager(&mut self) -> Result<ManagerFields> {
        let tag = self.byte()?;
        if tag != 0x00 {
            return Err(Error::encoding(format!("source with key tag {tag}: only Ed25519 (tz1) is supported")));
        }
        let source = ContractTz1Hash::try_from_bytes(self.take(20)?).map_err(Error::encoding)?;
        Ok(ManagerFields { source, fee: self.n()?, counter: self.n()?, gas_limit: self.n()?, storage_limit: self.n()? })
    }

    pub(super) fn content(&mut self) -> Result<Content> {
        let tag = self.byte()?;
        match tag {
            TAG_REVEAL => {
                let manager = self.manager()?;
                let key_tag = self.byte()?;
                if key_tag != 0x00 {
                    return Err(Error::encoding(format!("reveal of a key with tag {key_tag}: only Ed25519")));
                }
                let public_key = PublicKeyEd25519::try_from_bytes(self.take(32)?).map_err(Error::encoding)?;
                match self.byte()? {
                    0x00 => {}
                    0xff => return Err(Error::encoding("reveal with a proof of possession (tz4 keys only)")),
                    b => return Err(Error::encoding(format!("reveal proof presence byte {b:#04x}"))),
                }
                Ok(Content::Reveal { manager, public_key })
            }
            TAG_TRANSACTION => {
                let manager = self.manager()?;
                let amount = self.n()?;
                let dest_tag = self.byte()?;
                if dest_tag != 0x01 {
                    return Err(Error::encoding(format!("destination with tag {dest_tag}: only KT1 contracts")));
                }
                let destination = ContractKt1Hash::try_from_bytes(self.take(20)?).map_err(Error::encoding)?;
                if self.byte()? != 0x00 {
                    return Err(Error::encoding("KT1 destination padding is not zero"));
                }
                let parameters = match self.byte()? {
                    0x00 => None,
                    0xff => {
                        let entrypoint = self.entrypoint()?;
                        let value = Micheline::from_bytes(self.dynamic()?)?;
                        Some(Parameters { entrypoint, value })
                    }
                    b => return Err(Error::encoding(format!("parameters presence byte {b:#04x}"))),
                };
                Ok(Content::Transaction { manager, amount, destination, parameters })
            }
            t => Err(Error::encoding(format!("operation tag {t}: only reveal (107) and transaction (108)"))),
        }
    }

    fn entrypoint(&mut self) -> Result<String> {
        match self.byte()? {
            0xff => {
                let len = self.byte()?;
                let name = self.take(len as usize)?;
                String::from_utf8(name.to_vec()).map_err(|_| Error::encoding("entrypoint name is not UTF-8"))
            }
            t => RESERVED_ENTRYPOINTS
                .get(t as usize)
                .map(|s| s.to_string())
                .ok_or_else(|| Error::encoding(format!("entrypoint tag {t}"))),
        }
    }

    pub(super) fn micheline(&mut self, depth: usize) -> Result<Micheline> {
        if depth > MAX_MICHELINE_DEPTH {
            return Err(Error::encoding("Micheline nested too deep"));
        }
        let tag = self.byte()?;
        match tag {
            0x00 => Ok(Micheline::Int(self.z()?)),
            0x01 => {
                let s = self.dynamic()?;
                String::from_utf8(s.to_vec())
                    .map(Micheline::String)
                    .map_err(|_| Error::encoding("Micheline string is not UTF-8"))
            }
            0x02 => {
                let inner = self.dynamic()?;
                let mut r = Reader::new(inner);
                let mut items = Vec::new();
                while !r.is_empty() {
                    items.push(r.micheline(depth + 1)?);
                }
                Ok(Micheline::Seq(items))
            }
            0x03..=0x09 => {
                let code = self.byte()?;
                let prim =
                    DATA_PRIMS.iter().find(|(_, c)| *c == code).map(|(name, _)| name.to_string()).ok_or_else(|| {
                        Error::encoding(format!("Micheline primitive code {code} is not a data constructor"))
                    })?;
                let (args, annots) = match tag {
                    0x03 | 0x04 => (Vec::new(), tag == 0x04),
                    0x05 | 0x06 => (vec![self.micheline(depth + 1)?], tag == 0x06),
                    0x07 | 0x08 => (vec![self.micheline(depth + 1)?, self.micheline(depth + 1)?], tag == 0x08),
                    _ => {
                        let inner = self.dynamic()?;
                        let mut r = Reader::new(inner);
                        let mut args = Vec::new();
                        while !r.is_empty() {
                            args.push(r.micheline(depth + 1)?);
                        }
                        (args, true)
                    }
                };
                let annots = if annots {
                    let text = std::str::from_utf8(self.dynamic()?)
                        .map_err(|_| Error::encoding("Micheline annotations are not UTF-8"))?;
                    text.split(' ').filter(|a| !a.is_empty()).map(str::to_string).collect()
                } else {
                    Vec::new()
                };
                Ok(Micheline::Prim { prim, args, annots })
            }
            0x0a => Ok(Micheline::Bytes(self.dynamic()?.to_vec())),
            t => Err(Error::encoding(format!("Micheline tag {t}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forge::OperationGroup;

    #[test]
    fn decoder_refuses_garbage_without_panicking() {
        for data in [&[][..], &[0u8; 31], &[0u8; 33], &[0xffu8; 40], &[7, 7, 0], &[2, 0xff, 0xff, 0xff, 0xff]] {
            assert!(OperationGroup::unforge(data).is_err());
            assert!(Micheline::from_bytes(data).is_err());
        }
        let deep = [0x05u8, 0x09].repeat(10_000);
        assert!(Micheline::from_bytes(&deep).is_err());
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;
        use crate::forge::{OperationGroup, SignedOperation};

        proptest! {
            #[test]
            fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..400)) {
                let _ = OperationGroup::unforge(&data);
                let _ = SignedOperation::unforge(&data);
                let _ = Micheline::from_bytes(&data);
            }
        }
    }
}
