-- The chain: blocks, transactions (sealed with AES-256-GCM) and signed checkpoints.
-- Rows are append-only; triggers refuse UPDATE, DELETE and TRUNCATE so no code path can rewrite history.
CREATE TABLE blocks (
    height       BIGINT PRIMARY KEY,
    hash         BYTEA  NOT NULL,
    header       BYTEA  NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    tree_size    BIGINT NOT NULL,
    tx_count     BIGINT NOT NULL
);

CREATE TABLE txs (
    global_seq BIGINT PRIMARY KEY,
    height     BIGINT NOT NULL,
    hash       BYTEA  NOT NULL,
    address    TEXT   NOT NULL,
    tx_key     TEXT   NOT NULL,
    seq        BIGINT NOT NULL,
    device_id  TEXT   NOT NULL,
    idem_key   TEXT,
    key_id     BIGINT NOT NULL,
    sealed     BYTEA  NOT NULL
);
CREATE UNIQUE INDEX txs_by_hash ON txs (hash);
CREATE INDEX txs_by_address_key ON txs (address, tx_key, global_seq);
CREATE UNIQUE INDEX txs_by_address_seq ON txs (address, seq);
CREATE UNIQUE INDEX txs_by_idempotency ON txs (device_id, idem_key) WHERE idem_key IS NOT NULL;

CREATE TABLE checkpoints (
    tree_size    BIGINT PRIMARY KEY,
    height       BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    root         BYTEA  NOT NULL,
    signer       TEXT   NOT NULL,
    signature    BYTEA  NOT NULL
);

CREATE FUNCTION kalima_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% is immutable', TG_TABLE_NAME;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER blocks_immutable BEFORE UPDATE OR DELETE ON blocks FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER blocks_no_truncate BEFORE TRUNCATE ON blocks FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER txs_immutable BEFORE UPDATE OR DELETE ON txs FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER txs_no_truncate BEFORE TRUNCATE ON txs FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER checkpoints_immutable BEFORE UPDATE OR DELETE ON checkpoints FOR EACH ROW EXECUTE FUNCTION kalima_immutable();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints FOR EACH STATEMENT EXECUTE FUNCTION kalima_immutable();
