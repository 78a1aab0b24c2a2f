-- Layout v2. A block's transactions are packed and sealed together in one row, so a commit
-- writes one row per block instead of one per transaction. Lookups go through compact
-- integer indexes keyed by salted 64-bit hashes: addresses, keys, devices and idempotency
-- keys no longer appear in plaintext at rest. A hash collision only costs a wasted read:
-- every lookup checks the decrypted transaction it lands on.
-- Rows of the v1 `txs` table are repacked into this layout by the node on its first start
-- (one database transaction), after which that table is dropped.
CREATE TABLE block_txs (
    height    INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    key_id    INTEGER NOT NULL,
    -- 32-byte leaf hashes of the block's transactions, in order (Merkle rebuilds and proofs).
    leaves    BLOB    NOT NULL,
    -- nonce || AES-256-GCM of the packed canonical transaction bytes.
    sealed    BLOB    NOT NULL
);
CREATE UNIQUE INDEX block_txs_by_first_seq ON block_txs (first_seq);

-- Transaction id (first 8 bytes of the leaf hash) -> transaction.
CREATE TABLE tx_ids (
    h          INTEGER NOT NULL,
    global_seq INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    PRIMARY KEY (h, global_seq)
) WITHOUT ROWID;

-- Salted hash of (address, key) -> its history.
CREATE TABLE tx_by_stream (
    stream     INTEGER NOT NULL,
    global_seq INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    PRIMARY KEY (stream, global_seq)
) WITHOUT ROWID;

-- Salted hash of the address, per-address sequence -> transaction.
CREATE TABLE tx_by_address (
    address    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    global_seq INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    PRIMARY KEY (address, seq, global_seq)
) WITHOUT ROWID;

-- Salted hash of (device, idempotency key) -> the transaction that used it.
CREATE TABLE tx_idempotency (
    h          INTEGER NOT NULL,
    global_seq INTEGER NOT NULL,
    height     INTEGER NOT NULL,
    PRIMARY KEY (h, global_seq)
) WITHOUT ROWID;
CREATE INDEX tx_idempotency_recent ON tx_idempotency (global_seq);

-- Store-wide values written once (the index salt).
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TRIGGER block_txs_no_update BEFORE UPDATE ON block_txs BEGIN SELECT RAISE(ABORT, 'transactions are immutable'); END;
CREATE TRIGGER block_txs_no_delete BEFORE DELETE ON block_txs BEGIN SELECT RAISE(ABORT, 'transactions are immutable'); END;
CREATE TRIGGER tx_ids_no_update BEFORE UPDATE ON tx_ids BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_ids_no_delete BEFORE DELETE ON tx_ids BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_by_stream_no_update BEFORE UPDATE ON tx_by_stream BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_by_stream_no_delete BEFORE DELETE ON tx_by_stream BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_by_address_no_update BEFORE UPDATE ON tx_by_address BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_by_address_no_delete BEFORE DELETE ON tx_by_address BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_idempotency_no_update BEFORE UPDATE ON tx_idempotency BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER tx_idempotency_no_delete BEFORE DELETE ON tx_idempotency BEGIN SELECT RAISE(ABORT, 'index rows are immutable'); END;
CREATE TRIGGER store_meta_no_update BEFORE UPDATE ON store_meta BEGIN SELECT RAISE(ABORT, 'store metadata is immutable'); END;
CREATE TRIGGER store_meta_no_delete BEFORE DELETE ON store_meta BEGIN SELECT RAISE(ABORT, 'store metadata is immutable'); END;
