-- Layout v2. A block's transactions are packed and sealed together in one row, so a commit
-- writes one row per block instead of one per transaction. Lookups go through compact
-- integer indexes keyed by salted 64-bit hashes: addresses, keys, devices and idempotency
-- keys no longer appear in plaintext at rest. A hash collision only costs a wasted read:
-- every lookup checks the decrypted transaction it lands on.
-- Rows of the v1 `txs` table are repacked into this layout by the node on its first start
-- (one database transaction), after which that table is dropped.
CREATE TABLE block_txs (
    height    BIGINT PRIMARY KEY,
    first_seq BIGINT NOT NULL,
    key_id    BIGINT NOT NULL,
    -- 32-byte leaf hashes of the block's transactions, in order (Merkle rebuilds and proofs).
    leaves    BYTEA  NOT NULL,
    -- nonce || AES-256-GCM of the packed canonical transaction bytes.
    sealed    BYTEA  NOT NULL
);
CREATE UNIQUE INDEX block_txs_by_first_seq ON block_txs (first_seq);

-- Transaction id (first 8 bytes of the leaf hash) -> transaction.
CREATE TABLE tx_ids (
    h          BIGINT NOT NULL,
    global_seq BIGINT NOT NULL,
    height     BIGINT NOT NULL,
    PRIMARY KEY (h, global_seq)
);

-- Salted hash of (address, key) -> its history.
CREATE TABLE tx_by_stream (
    stream     BIGINT NOT NULL,
    global_seq BIGINT NOT NULL,
    height     BIGINT NOT NULL,
    PRIMARY KEY (stream, global_seq)
);

-- Salted hash of the address, per-address sequence -> transaction.
CREATE TABLE tx_by_address (
    address    BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    global_seq BIGINT NOT NULL,
    height     BIGINT NOT NULL,
    PRIMARY KEY (address, seq, global_seq)
);

-- Salted hash of (device, idempotency key) -> the transaction that used it.
CREATE TABLE tx_idempotency (
    h          BIGINT NOT NULL,
    global_seq BIGINT NOT NULL,
    height     BIGINT NOT NULL,
    PRIMARY KEY (h, global_seq)
);
CREATE INDEX tx_idempotency_recent ON tx_idempotency (global_seq);

-- Store-wide values written once (the index salt).
CREATE TABLE store_meta (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TRIGGER block_txs_immutable BEFORE UPDATE OR DELETE ON block_txs FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER block_txs_no_truncate BEFORE TRUNCATE ON block_txs FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_ids_immutable BEFORE UPDATE OR DELETE ON tx_ids FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_ids_no_truncate BEFORE TRUNCATE ON tx_ids FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_by_stream_immutable BEFORE UPDATE OR DELETE ON tx_by_stream FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_by_stream_no_truncate BEFORE TRUNCATE ON tx_by_stream FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_by_address_immutable BEFORE UPDATE OR DELETE ON tx_by_address FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_by_address_no_truncate BEFORE TRUNCATE ON tx_by_address FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_idempotency_immutable BEFORE UPDATE OR DELETE ON tx_idempotency FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER tx_idempotency_no_truncate BEFORE TRUNCATE ON tx_idempotency FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER store_meta_immutable BEFORE UPDATE OR DELETE ON store_meta FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER store_meta_no_truncate BEFORE TRUNCATE ON store_meta FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
