//! The `KlxToken` contract: metadata, the supply cap and owner-only minting.

use alloy::primitives::U256;
use kalima_bridge_ethereum::contracts::KlxToken::{self, KlxTokenErrors};

use super::{Fixture, klx, send};

#[tokio::test]
async fn token_is_capped_klx() {
    let f = Fixture::new().await;
    assert_eq!(f.token.name().call().await.expect("name"), "Kalima");
    assert_eq!(f.token.symbol().call().await.expect("symbol"), "KLX");
    assert_eq!(f.token.decimals().call().await.expect("decimals"), 18);
    assert_eq!(f.token.cap().call().await.expect("cap"), klx(480_000_000_000));
    let supply = f.token.totalSupply().call().await.expect("totalSupply");
    let cap = klx(480_000_000_000);
    let over = cap - supply + U256::from(1u8);
    let err = send(f.token.mint(f.user.address(), over)).await.expect_err("mint above the cap");
    assert_eq!(
        err.as_decoded_interface_error::<KlxTokenErrors>(),
        Some(KlxTokenErrors::ERC20ExceededCap(KlxToken::ERC20ExceededCap {
            increasedSupply: cap + U256::from(1u8),
            cap
        }))
    );
    let err = send(f.token_as(&f.user).mint(f.user.address(), U256::from(1u8))).await.expect_err("mint by non-owner");
    assert_eq!(
        err.as_decoded_interface_error::<KlxTokenErrors>(),
        Some(KlxTokenErrors::OwnableUnauthorizedAccount(KlxToken::OwnableUnauthorizedAccount {
            account: f.user.address()
        }))
    );
    assert_eq!(f.token.totalSupply().call().await.expect("totalSupply"), supply);
}
