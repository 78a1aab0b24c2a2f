// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable2Step, Ownable} from "@openzeppelin/contracts/access/Ownable2Step.sol";

/// @title KlxAnchor
/// @notice Public record of Kalima checkpoints: a signed tree head (chain name, tree size,
/// Merkle root, block height) anchored here lets anyone check a reading's inclusion proof
/// against a root that the chain's operators can no longer change.
/// @dev Only anchorers chosen by the owner may anchor, so a verifier trusts the event's
/// emitter and sender, not any caller. Tree sizes only grow per chain name: an anchor can
/// never be replaced by an older or different history of the same size.
contract KlxAnchor is Ownable2Step {
    /// @notice A checkpoint was anchored.
    event Anchored(string chain, uint64 treeSize, bytes32 root, uint64 height, address indexed anchorer);
    /// @notice An anchorer was allowed or removed.
    event AnchorerSet(address indexed anchorer, bool allowed);

    error NotAnchorer(address caller);
    error ZeroRoot();
    error NotNewer(uint64 treeSize, uint64 latest);

    /// @notice Who may anchor.
    mapping(address => bool) public anchorers;
    /// @notice The largest tree size anchored per chain name (keccak256 of the name).
    mapping(bytes32 => uint64) public latestSize;

    constructor(address[] memory anchorers_) Ownable(msg.sender) {
        for (uint256 i = 0; i < anchorers_.length; i++) {
            anchorers[anchorers_[i]] = true;
            emit AnchorerSet(anchorers_[i], true);
        }
    }

    /// @notice Allows or removes an anchorer.
    function setAnchorer(address anchorer, bool allowed) external onlyOwner {
        anchorers[anchorer] = allowed;
        emit AnchorerSet(anchorer, allowed);
    }

    /// @notice Anchors the checkpoint of `chain` at `treeSize` with `root`.
    function anchor(string calldata chain, uint64 treeSize, bytes32 root, uint64 height) external {
        if (!anchorers[msg.sender]) revert NotAnchorer(msg.sender);
        if (root == bytes32(0)) revert ZeroRoot();
        bytes32 key = keccak256(bytes(chain));
        uint64 latest = latestSize[key];
        if (treeSize <= latest) revert NotNewer(treeSize, latest);
        latestSize[key] = treeSize;
        emit Anchored(chain, treeSize, root, height, msg.sender);
    }
}
