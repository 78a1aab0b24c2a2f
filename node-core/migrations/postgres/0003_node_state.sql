-- Mutable bookkeeping of this node that is not chain data: the Raft state machine's applied
-- log position and membership, written in the same transaction as the blocks they produced.
CREATE TABLE node_state (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
