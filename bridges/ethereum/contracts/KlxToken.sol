// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Capped} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Capped.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title KLX on Ethereum-compatible chains, used by the bridge tests.
/// @notice The cap equals the MainChain's total supply, so the ERC20 side can never hold
///         more KLX than exists natively.
contract KlxToken is ERC20Capped, Ownable {
    /// @notice 480 billion KLX with 18 decimals.
    uint256 public constant MAX_SUPPLY = 480_000_000_000 * 10 ** 18;

    constructor() ERC20("Kalima", "KLX") ERC20Capped(MAX_SUPPLY) Ownable(msg.sender) {}

    /// @notice Mints `amount` base units to `to`; reverts above the cap.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
