-- The chain: blocks, transactions (sealed with AES-256-GCM) and signed checkpoints.
-- Rows are append-only; triggers refuse UPDATE and DELETE so no code path can rewrite history.
CREATE TABLE blocks (
    height       INTEGER PRIMARY KEY,
    hash         BLOB    NOT NULL,
    header       BLOB    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    tree_size    INTEGER NOT NULL,
    tx_count     INTEGER NOT NULL
);

CREATE TABLE txs (
    global_seq INTEGER PRIMARY KEY,
    height     INTEGER NOT NULL,
    hash       BLOB    NOT NULL,
    address    TEXT    NOT NULL,
    tx_key     TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    device_id  TEXT    NOT NULL,
    idem_key   TEXT,
    key_id     INTEGER NOT NULL,
    sealed     BLOB    NOT NULL
);
CREATE UNIQUE INDEX txs_by_hash ON txs (hash);
CREATE INDEX txs_by_address_key ON txs (address, tx_key, global_seq);
CREATE UNIQUE INDEX txs_by_address_seq ON txs (address, seq);
CREATE UNIQUE INDEX txs_by_idempotency ON txs (device_id, idem_key) WHERE idem_key IS NOT NULL;

CREATE TABLE checkpoints (
    tree_size    INTEGER PRIMARY KEY,
    height       INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    root         BLOB    NOT NULL,
    signer       TEXT    NOT NULL,
    signature    BLOB    NOT NULL
);

CREATE TRIGGER blocks_no_update BEFORE UPDATE ON blocks BEGIN SELECT RAISE(ABORT, 'blocks are immutable'); END;
CREATE TRIGGER blocks_no_delete BEFORE DELETE ON blocks BEGIN SELECT RAISE(ABORT, 'blocks are immutable'); END;
CREATE TRIGGER txs_no_update BEFORE UPDATE ON txs BEGIN SELECT RAISE(ABORT, 'transactions are immutable'); END;
CREATE TRIGGER txs_no_delete BEFORE DELETE ON txs BEGIN SELECT RAISE(ABORT, 'transactions are immutable'); END;
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints BEGIN SELECT RAISE(ABORT, 'checkpoints are immutable'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints BEGIN SELECT RAISE(ABORT, 'checkpoints are immutable'); END;
