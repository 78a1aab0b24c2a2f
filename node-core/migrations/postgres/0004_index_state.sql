-- The lookup indexes are written behind the chain by the index writer; this row is how far
-- they reach (a block height, that block's hash, and a check of the index salt). Until now
-- they were written with the blocks, so they reach the highest block they name.
CREATE TABLE index_state (
    id         INTEGER PRIMARY KEY CHECK (id = 0),
    height     BIGINT NOT NULL,
    block_hash BYTEA,
    salt_check BYTEA
);
INSERT INTO index_state (id, height, block_hash)
SELECT 0, COALESCE(m.h + 1, 0), (SELECT hash FROM blocks WHERE height = m.h)
FROM (SELECT MAX(height) AS h FROM tx_ids) m;
