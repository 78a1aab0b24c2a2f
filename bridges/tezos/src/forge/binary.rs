//! The building blocks of the binary encoding: unsigned zarith (`N`, our own writer), signed
//! zarith (`Z`, from `tezos_data_encoding`) and fields behind a 4-byte big-endian length.

use num_bigint::BigInt;
use tezos_data_encoding::enc::BinWriter;
use tezos_data_encoding::types::Zarith;

use crate::error::{Error, Result};

/// Writes `v` as an unsigned zarith (`N`): little-endian groups of 7 bits, the high bit set
/// when more follow.
///
/// Written here rather than taken from `tezos_data_encoding` 0.6, whose `enc::n_bignum`
/// drops the eighth group of values of 2^56 and above (see the test `crate_n_bignum_is_wrong`);
/// fees and counters are not that large today, but a wrong byte in a signed operation is not
/// a risk worth taking.
pub fn put_n(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Writes `v` as a signed zarith (`Z`, Micheline integers).
pub fn put_z(v: &BigInt, out: &mut Vec<u8>) -> Result<()> {
    Zarith(v.clone()).bin_write(out).map_err(|e| Error::encoding(format!("zarith {v}: {e:?}")))
}

/// Writes `bytes` behind their length as a big-endian u32.
pub(super) fn put_dynamic(bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::encoding("a field longer than 4 GiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use num_bigint::BigUint;

    use super::*;
    use crate::forge::decode::Reader;

    fn n(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_n(v, &mut out);
        out
    }

    #[test]
    fn natural_zarith_bytes() {
        assert_eq!(n(0), [0x00]);
        assert_eq!(n(127), [0x7f]);
        assert_eq!(n(128), [0x80, 0x01]);
        assert_eq!(n(16383), [0xff, 0x7f]);
        assert_eq!(n(16384), [0x80, 0x80, 0x01]);
        assert_eq!(n(u64::MAX), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        for v in [0, 1, 127, 128, 300, 16383, 16384, 1 << 56, (1 << 56) - 1, u64::MAX] {
            let bytes = n(v);
            let mut r = Reader::new(&bytes);
            assert_eq!(r.n().ok(), Some(v));
            assert!(r.is_empty());
        }
    }

    /// Why [`put_n`] exists: the crate's writer loses a 7-bit group at 2^56 and above. When
    /// this test fails, the crate was fixed and `put_n` may give way to it.
    #[test]
    fn crate_n_bignum_is_wrong() {
        let mut theirs = Vec::new();
        let r = tezos_data_encoding::enc::n_bignum(&BigUint::from(1u64 << 56), &mut theirs);
        assert!(r.is_ok());
        assert_ne!(theirs, n(1 << 56));
        let mut small = Vec::new();
        let r = tezos_data_encoding::enc::n_bignum(&BigUint::from(16384u64), &mut small);
        assert!(r.is_ok());
        assert_eq!(small, n(16384));
    }

    #[test]
    fn integer_zarith_bytes() {
        let z = |v: i64| {
            let mut out = Vec::new();
            put_z(&BigInt::from(v), &mut out).unwrap();
            out
        };
        assert_eq!(z(0), [0x00]);
        assert_eq!(z(63), [0x3f]);
        assert_eq!(z(64), [0x80, 0x01]);
        assert_eq!(z(-1), [0x41]);
        assert_eq!(z(8191), [0xbf, 0x7f]);
        assert_eq!(z(8192), [0x80, 0x80, 0x01]);
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;
        use crate::forge::decode::Reader;

        proptest! {
            #[test]
            fn naturals_round_trip(v in any::<u64>()) {
                let mut out = Vec::new();
                put_n(v, &mut out);
                let mut r = Reader::new(&out);
                prop_assert_eq!(r.n().unwrap(), v);
                prop_assert!(r.is_empty());
            }
        }
    }
}
