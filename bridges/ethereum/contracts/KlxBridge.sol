// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Ownable2Step} from "@openzeppelin/contracts/access/Ownable2Step.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title Lock/release bridge between KLX on this chain and native KLX on the Kalima MainChain.
/// @notice Deposits lock tokens here and are credited on the MainChain by the relayers;
///         withdrawals from the MainChain are paid out by `release` once `threshold` of the
///         relayers have signed the EIP-712 `Release` message.
contract KlxBridge is EIP712, Pausable, Ownable2Step {
    using SafeERC20 for IERC20;

    /// @dev The chain id and the bridge address are bound by the EIP-712 domain, the token by
    ///      the struct, so a signature is valid for exactly one (chain, bridge, token).
    bytes32 public constant RELEASE_TYPEHASH = keccak256(
        "Release(address token,address recipient,uint256 amount,bytes32 withdrawalId,uint256 expiry)"
    );

    /// @dev One bucket of the rolling window: everything released in the block at `timestamp`.
    struct WindowEntry {
        uint64 timestamp;
        uint192 amount;
    }

    /// @notice The ERC20 this bridge locks and releases.
    IERC20 public immutable token;

    /// @notice How many distinct relayer signatures a release needs.
    uint256 public threshold;
    /// @notice The nonce the next deposit will carry; deposits are numbered 0, 1, 2, ... without gaps.
    uint64 public depositNonce;
    /// @notice The key allowed to pause and unpause; kept apart from the owner so a
    ///         compromised owner cannot also silence the emergency stop (and vice versa).
    address public guardian;
    /// @notice Largest amount a single release may pay.
    uint256 public perTxCap;
    /// @notice Largest sum releases may pay within any `windowSeconds`.
    uint256 public windowCap;
    /// @notice Length of the rate-limit window.
    uint256 public windowSeconds;
    /// @notice MainChain withdrawal ids already paid.
    mapping(bytes32 withdrawalId => bool) public released;

    address[] private _relayers;
    mapping(address => bool) private _isRelayer;

    /// @dev The rolling window as a queue: entries in [_windowHead, _windowTail) are not yet
    ///      pruned, `_windowSum` is their total.
    mapping(uint256 => WindowEntry) private _window;
    uint256 private _windowHead;
    uint256 private _windowTail;
    uint256 private _windowSum;

    /// @notice Tokens were locked for `mainchainRecipient` on the MainChain.
    event Deposit(
        uint64 indexed nonce, address indexed from, bytes32 indexed mainchainRecipient, uint256 amount, address token
    );
    /// @notice The MainChain withdrawal `withdrawalId` was paid to `recipient`.
    event Released(bytes32 indexed withdrawalId, address indexed recipient, uint256 amount);
    /// @notice The relayer set and threshold were replaced.
    event RelayersChanged(address[] relayers, uint256 threshold);
    /// @notice The rate limits were replaced.
    event LimitsChanged(uint256 perTxCap, uint256 windowCap, uint256 windowSeconds);
    /// @notice The guardian was replaced.
    event GuardianChanged(address guardian);

    error ZeroAmount();
    error ZeroRecipient();
    error ZeroAddress();
    error ReleaseExpired(uint256 expiry, uint256 now);
    error AlreadyReleased(bytes32 withdrawalId);
    error NotRelayer(address signer);
    error SignersNotStrictlyIncreasing();
    error InvalidSignature();
    error NotEnoughSignatures(uint256 have, uint256 need);
    error PerTxCapExceeded(uint256 amount, uint256 cap);
    error WindowCapExceeded(uint256 wouldBe, uint256 cap);
    error BadThreshold(uint256 threshold, uint256 relayers);
    error BadLimits(uint256 perTxCap, uint256 windowCap, uint256 windowSeconds);
    error DuplicateRelayer(address relayer);
    error NotGuardian(address caller);
    error DepositAmountMismatch(uint256 expected, uint256 received);

    modifier onlyGuardian() {
        if (msg.sender != guardian) revert NotGuardian(msg.sender);
        _;
    }

    constructor(
        IERC20 token_,
        address[] memory relayers_,
        uint256 threshold_,
        address guardian_,
        uint256 perTxCap_,
        uint256 windowCap_,
        uint256 windowSeconds_
    ) EIP712("KlxBridge", "1") Ownable(msg.sender) {
        if (address(token_) == address(0)) revert ZeroAddress();
        token = token_;
        _setRelayers(relayers_, threshold_);
        _setGuardian(guardian_);
        _setLimits(perTxCap_, windowCap_, windowSeconds_);
    }

    // ------------------------------------------------------------------ deposits

    /// @notice Locks `amount` tokens of the caller (who must have approved this bridge) for
    ///         `mainchainRecipient`, a MainChain account.
    function deposit(uint256 amount, bytes32 mainchainRecipient) external whenNotPaused {
        if (amount == 0) revert ZeroAmount();
        // A zero recipient would lock the tokens for nobody on the MainChain.
        if (mainchainRecipient == bytes32(0)) revert ZeroRecipient();

        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = token.balanceOf(address(this)) - before;
        // Crediting more than arrived (fee-on-transfer or rebasing tokens) would make the
        // MainChain supply exceed what is locked here.
        if (received != amount) revert DepositAmountMismatch(amount, received);

        uint64 nonce = depositNonce;
        depositNonce = nonce + 1;
        emit Deposit(nonce, msg.sender, mainchainRecipient, amount, address(token));
    }

    // ------------------------------------------------------------------ releases

    /// @notice Pays `amount` to `recipient` for the MainChain withdrawal `withdrawalId`, given
    ///         at least `threshold` relayer signatures ordered by signer address, ascending.
    function release(
        address recipient,
        uint256 amount,
        bytes32 withdrawalId,
        uint256 expiry,
        bytes[] calldata signatures
    ) external whenNotPaused {
        if (block.timestamp > expiry) revert ReleaseExpired(expiry, block.timestamp);
        if (released[withdrawalId]) revert AlreadyReleased(withdrawalId);
        if (amount == 0) revert ZeroAmount();
        if (recipient == address(0)) revert ZeroRecipient();
        if (amount > perTxCap) revert PerTxCapExceeded(amount, perTxCap);
        _consumeWindow(amount);

        bytes32 digest = releaseDigest(recipient, amount, withdrawalId, expiry);
        address last = address(0);
        for (uint256 i = 0; i < signatures.length; ++i) {
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, signatures[i]);
            // tryRecover rejects high-s (malleable) signatures, bad v and the zero address.
            if (err != ECDSA.RecoverError.NoError) revert InvalidSignature();
            if (!_isRelayer[signer]) revert NotRelayer(signer);
            // Strict ordering makes each relayer count at most once without a per-call set.
            if (signer <= last) revert SignersNotStrictlyIncreasing();
            last = signer;
        }
        if (signatures.length < threshold) revert NotEnoughSignatures(signatures.length, threshold);

        released[withdrawalId] = true;
        token.safeTransfer(recipient, amount);
        emit Released(withdrawalId, recipient, amount);
    }

    /// @notice The EIP-712 digest the relayers sign for a release.
    function releaseDigest(address recipient, uint256 amount, bytes32 withdrawalId, uint256 expiry)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(
            keccak256(abi.encode(RELEASE_TYPEHASH, address(token), recipient, amount, withdrawalId, expiry))
        );
    }

    /// @notice The sum released within the last `windowSeconds`.
    function windowReleased() external view returns (uint256 sum) {
        sum = _windowSum;
        uint256 cutoff = _windowCutoff();
        for (uint256 i = _windowHead; i < _windowTail; ++i) {
            WindowEntry memory e = _window[i];
            if (e.timestamp > cutoff) break;
            sum -= e.amount;
        }
    }

    /// @dev Drops entries that left the window, then books `amount` in it. Each entry is
    ///      pushed once and popped once, so the cost is amortised O(1) per release; releases
    ///      in the same block share one entry.
    function _consumeWindow(uint256 amount) private {
        uint256 cutoff = _windowCutoff();
        uint256 head = _windowHead;
        uint256 tail = _windowTail;
        uint256 sum = _windowSum;
        while (head < tail) {
            WindowEntry memory e = _window[head];
            if (e.timestamp > cutoff) break;
            sum -= e.amount;
            delete _window[head];
            ++head;
        }
        _windowHead = head;

        uint256 wouldBe = sum + amount;
        if (wouldBe > windowCap) revert WindowCapExceeded(wouldBe, windowCap);
        _windowSum = wouldBe;

        // Packing an entry into one slot halves the storage writes; SafeCast keeps a limit set
        // above 2^192 from silently truncating what the window counts.
        uint64 now_ = SafeCast.toUint64(block.timestamp);
        uint192 amount_ = SafeCast.toUint192(amount);
        if (tail > head && _window[tail - 1].timestamp == now_) {
            _window[tail - 1].amount += amount_;
        } else {
            _window[tail] = WindowEntry(now_, amount_);
            _windowTail = tail + 1;
        }
    }

    /// @dev Entries stamped at or before the cutoff are outside the window.
    function _windowCutoff() private view returns (uint256) {
        return block.timestamp >= windowSeconds ? block.timestamp - windowSeconds : 0;
    }

    // ------------------------------------------------------------------ administration

    /// @notice The current relayers.
    function relayers() external view returns (address[] memory) {
        return _relayers;
    }

    /// @notice Replaces the relayer set and threshold in one step.
    function setRelayers(address[] calldata relayers_, uint256 threshold_) external onlyOwner {
        _setRelayers(relayers_, threshold_);
    }

    /// @notice Replaces the rate limits.
    function setLimits(uint256 perTxCap_, uint256 windowCap_, uint256 windowSeconds_) external onlyOwner {
        _setLimits(perTxCap_, windowCap_, windowSeconds_);
    }

    /// @notice Replaces the guardian.
    function setGuardian(address guardian_) external onlyOwner {
        _setGuardian(guardian_);
    }

    /// @notice Stops deposits and releases.
    function pause() external onlyGuardian {
        _pause();
    }

    /// @notice Resumes deposits and releases.
    function unpause() external onlyGuardian {
        _unpause();
    }

    function _setRelayers(address[] memory relayers_, uint256 threshold_) private {
        // A zero threshold would accept an empty signature list; a threshold above the set
        // size would lock every withdrawal forever.
        if (threshold_ == 0 || threshold_ > relayers_.length) {
            revert BadThreshold(threshold_, relayers_.length);
        }
        uint256 old = _relayers.length;
        for (uint256 i = 0; i < old; ++i) {
            _isRelayer[_relayers[i]] = false;
        }
        delete _relayers;
        for (uint256 i = 0; i < relayers_.length; ++i) {
            address r = relayers_[i];
            // ecrecover yields address(0) for garbage; it must never be a signer.
            if (r == address(0)) revert ZeroAddress();
            // A duplicate would let one key count twice towards the threshold's intent.
            if (_isRelayer[r]) revert DuplicateRelayer(r);
            _isRelayer[r] = true;
            _relayers.push(r);
        }
        threshold = threshold_;
        emit RelayersChanged(relayers_, threshold_);
    }

    function _setLimits(uint256 perTxCap_, uint256 windowCap_, uint256 windowSeconds_) private {
        if (windowSeconds_ == 0 || perTxCap_ > windowCap_) {
            revert BadLimits(perTxCap_, windowCap_, windowSeconds_);
        }
        perTxCap = perTxCap_;
        windowCap = windowCap_;
        windowSeconds = windowSeconds_;
        emit LimitsChanged(perTxCap_, windowCap_, windowSeconds_);
    }

    function _setGuardian(address guardian_) private {
        if (guardian_ == address(0)) revert ZeroAddress();
        guardian = guardian_;
        emit GuardianChanged(guardian_);
    }
}
