-- The lookup indexes move to their own file beside the database (`<db>-index`), written
-- behind the chain by the index writer so that a commit writes blocks and bodies only. They
-- are derived data: the node rebuilds them there from the bodies on its next start.
DROP TABLE IF EXISTS main.tx_ids;
DROP TABLE IF EXISTS main.tx_by_stream;
DROP TABLE IF EXISTS main.tx_by_address;
DROP TABLE IF EXISTS main.tx_idempotency;
