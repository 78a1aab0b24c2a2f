#!/usr/bin/env python3
"""Writes the Octez response files of this directory (protocol Tallinn shapes).

The operations in them are real: signed by the test keys (Ed25519 seeds 7, 8 and 9 repeated
32 times; seed 7 is the anchoring contract's admin), forged by pytezos, their hashes computed
from their bytes. Values that depend on a live chain (block hashes, levels, big_map ids, gas
figures) are fixed by a seeded generator. Run with the peers' venv:

    ~/.cache/kalima-peers/venv/bin/python bridges/tezos/tests/it/octez/make_responses.py
"""

import json
import os
import random
from pytezos.crypto.encoding import base58_encode, base58_decode
from pytezos.crypto.key import Key, blake2b_32
from pytezos.operation.forge import forge_operation_group

OUT = os.path.dirname(os.path.abspath(__file__))
rnd = random.Random(2026)
def rb(n): return bytes(rnd.getrandbits(8) for _ in range(n))
def b58(prefix, n): return base58_encode(rb(n), prefix).decode()
PROTO = 'PtTALLiNtPec7mE7yY4m3k26J8Qukef3E3ehzhfXgFZKGtDdAXu'
CHAIN = 'NetXdQprcVkpaWU'
keys = {s: Key.from_encoded_key(base58_encode(bytes([s])*32, b'edsk').decode()) for s in (7, 8, 9)}
ADMIN = keys[7].public_key_hash()
OTHER = keys[8].public_key_hash()
THIRD = keys[9].public_key_hash()
CONTRACT = 'KT1BEqzn5Wx8uJrZNvuS9DVHmLvG9td3fDLi'
FA2 = base58_encode(rb(20), b'KT1').decode()
BIGMAP = '1065432'
ROOT = rb(32).hex()

def dump(name, v):
    with open(os.path.join(OUT, name), 'w') as f:
        json.dump(v, f, indent=2, ensure_ascii=False)
        f.write('\n')

header = {
    "protocol": PROTO, "chain_id": CHAIN, "hash": b58(b'B', 32), "level": 11432100, "proto": 24,
    "predecessor": b58(b'B', 32), "timestamp": "2026-11-20T09:14:36Z", "validation_pass": 4,
    "operations_hash": b58(b'LLo', 32), "fitness": ["02", "00ae71a4", "", "ffffffff", "00000000"],
    "context": b58(b'Co', 32), "payload_hash": b58(b'vh', 32), "payload_round": 0,
    "proof_of_work_nonce": rb(8).hex(), "liquidity_baking_toggle_vote": "pass",
    "signature": base58_encode(rb(64), b'sig').decode(),
}
dump('header.json', header)

constants = {
    "proof_of_work_nonce_size": 8, "nonce_length": 32, "max_anon_ops_per_block": 132,
    "max_operation_data_length": 32768, "max_proposals_per_delegate": 20,
    "max_micheline_node_count": 50000, "max_micheline_bytes_limit": 50000,
    "max_allowed_global_constants_depth": 10000, "cache_layout_size": 3,
    "michelson_maximum_type_size": 2001, "max_slashing_period": 2,
    "smart_rollup_max_wrapped_proof_binary_size": 30000, "smart_rollup_message_size_limit": 4096,
    "smart_rollup_max_number_of_messages_per_level": "1000000",
    "consensus_rights_delay": 2, "blocks_preservation_cycles": 1,
    "delegate_parameters_activation_delay": 5, "tolerated_inactivity_period": 2,
    "blocks_per_cycle": 14400, "blocks_per_commitment": 112, "nonce_revelation_threshold": 400,
    "cycles_per_voting_period": 14, "hard_gas_limit_per_operation": "1040000",
    "hard_gas_limit_per_block": "1040000", "proof_of_work_threshold": "-1",
    "minimal_stake": "6000000000", "minimal_frozen_stake": "600000000",
    "vdf_difficulty": "2400000000", "origination_size": 257, "cost_per_byte": "250",
    "hard_storage_limit_per_operation": "60000", "quorum_min": 2000, "quorum_max": 7000,
    "min_proposal_quorum": 500, "liquidity_baking_toggle_ema_threshold": 1000000000,
    "max_operations_time_to_live": 600, "minimal_block_delay": "6",
    "delay_increment_per_round": "3", "consensus_committee_size": 7000,
    "consensus_threshold_size": 4667, "limit_of_delegation_over_baking": 9,
    "percentage_of_frozen_deposits_slashed_per_double_baking": 500,
    "percentage_of_frozen_deposits_slashed_per_double_attestation": 5000,
    "max_slashing_threshold": {"numerator": 1, "denominator": 3},
    "cache_script_size": 100000000, "cache_stake_distribution_cycles": 5,
    "cache_sampler_state_cycles": 5,
}
dump('constants.json', constants)

def forged_addr(tz1):
    return '0000' + base58_decode(tz1.encode()).hex()

EVENT_TYPE = {"prim": "pair", "args": [{"prim": "bytes", "annots": ["%chain"]}, {"prim": "pair", "args": [
    {"prim": "nat", "annots": ["%tree_size"]}, {"prim": "pair", "args": [{"prim": "bytes", "annots": ["%root"]},
    {"prim": "nat", "annots": ["%height"]}]}]}]}

def expr_hash(packed):
    return base58_encode(blake2b_32(packed).digest(), b'expr').decode()

def anchor_value(chain, ts, root, h):
    return {"prim": "Pair", "args": [{"bytes": chain.encode().hex()}, {"prim": "Pair", "args": [
        {"int": str(ts)}, {"prim": "Pair", "args": [{"bytes": root}, {"int": str(h)}]}]}]}

def tx_applied_meta(origin, source, fee, chain, ts, root, h, paid):
    from pytezos.michelson.forge import forge_micheline
    key = {"bytes": chain.encode().hex()}
    burn = []
    if paid:
        burn = [{"kind": "contract", "contract": source, "change": str(-paid * 250), "origin": origin},
                {"kind": "burned", "category": "storage fees", "change": str(paid * 250), "origin": origin}]
    return {
        "balance_updates": fee_updates(origin, source, fee),
        "operation_result": {
            "status": "applied",
            "storage": {"prim": "Pair", "args": [{"bytes": forged_addr(source)}, {"int": BIGMAP}]},
            "balance_updates": burn,
            "consumed_milligas": "1868437",
            "storage_size": "1342",
            "paid_storage_size_diff": str(paid),
            "lazy_storage_diff": [{"kind": "big_map", "id": BIGMAP, "diff": {"action": "update", "updates": [
                {"key_hash": expr_hash(b'\x05' + forge_micheline(key)), "key": key, "value": {"int": str(ts)}}]}}],
        },
        "internal_operation_results": [{
            "kind": "event", "source": CONTRACT, "nonce": 0, "type": EVENT_TYPE, "tag": "anchored",
            "payload": {"prim": "Pair", "args": [key, {"int": str(ts)}, {"bytes": root}, {"int": str(h)}]},
            "result": {"status": "applied", "consumed_milligas": "100000"},
        }],
    }

def fee_updates(origin, source, fee):
    if fee == 0:
        return []
    return [{"kind": "contract", "contract": source, "change": str(-fee), "origin": origin},
            {"kind": "accumulator", "category": "block fees", "change": str(fee), "origin": origin}]

def reveal_meta(origin, source, fee):
    return {"balance_updates": fee_updates(origin, source, fee),
            "operation_result": {"status": "applied", "consumed_milligas": "1000000"}}

def failed_meta(origin, source, fee, with_, contract, location):
    return {"balance_updates": fee_updates(origin, source, fee),
            "operation_result": {"status": "failed", "errors": [
                {"kind": "temporary", "id": "proto.024-PtTALLiN.michelson_v1.runtime_error",
                 "contract_handle": contract, "contract_code": "Deprecated"},
                {"kind": "temporary", "id": "proto.024-PtTALLiN.michelson_v1.script_rejected",
                 "location": location, "with": {"string": with_}}]}}

# --- run_operation: reveal + first anchor of "plant-1" (fee 0, limits at the simulation maxima)
sim_reveal = {"kind": "reveal", "source": ADMIN, "fee": "0", "counter": "42", "gas_limit": "520000",
              "storage_limit": "0", "public_key": keys[7].public_key()}
sim_tx = {"kind": "transaction", "source": ADMIN, "fee": "0", "counter": "43", "gas_limit": "520000",
          "storage_limit": "60000", "amount": "0", "destination": CONTRACT,
          "parameters": {"entrypoint": "anchor", "value": anchor_value("plant-1", 1200, ROOT, 87)}}
dump('run_operation_reveal_and_anchor.json', {"contents": [
    dict(sim_reveal, metadata=reveal_meta("simulation", ADMIN, 0)),
    dict(sim_tx, metadata=tx_applied_meta("simulation", ADMIN, 0, "plant-1", 1200, ROOT, 87, 70)),
]})
sim_tx2 = dict(sim_tx, counter="44", gas_limit="1040000", parameters={"entrypoint": "anchor", "value": anchor_value("plant-1", 1100, ROOT, 80)})
dump('run_operation_anchor_failwith.json', {"contents": [
    dict(sim_tx2, metadata=failed_meta("simulation", ADMIN, 0, "TREE_SIZE_NOT_NEWER", CONTRACT, 63)),
]})

def signed_op(branch, contents, key):
    forged = forge_operation_group({"branch": branch, "contents": contents})
    sig = key.sign(b'\x03' + forged)
    sig_bytes = base58_decode(sig.encode())
    h = base58_encode(blake2b_32(forged + sig_bytes).digest(), b'o').decode()
    return h, sig

branch = header["hash"]
# --- block 11432103: a tez transfer by someone else, then the anchor (reveal + call)
transfer = [{"kind": "transaction", "source": THIRD, "fee": "385", "counter": "118204", "gas_limit": "169",
             "storage_limit": "0", "amount": "1500000", "destination": OTHER}]
h1, s1 = signed_op(branch, transfer, keys[9])
rv = dict(sim_reveal, fee="455", gas_limit="1100", storage_limit="0")
tx = dict(sim_tx, fee="752", gas_limit="1969", storage_limit="90")
h2, s2 = signed_op(branch, [rv, tx], keys[7])
transfer_meta = {"balance_updates": fee_updates("block", THIRD, 385), "operation_result": {
    "status": "applied", "balance_updates": [
        {"kind": "contract", "contract": THIRD, "change": "-1500000", "origin": "block"},
        {"kind": "contract", "contract": OTHER, "change": "1500000", "origin": "block"}],
    "consumed_milligas": "168990"}}
ops_anchor = [
    {"protocol": PROTO, "chain_id": CHAIN, "hash": h1, "branch": branch,
     "contents": [dict(transfer[0], metadata=transfer_meta)], "signature": s1},
    {"protocol": PROTO, "chain_id": CHAIN, "hash": h2, "branch": branch,
     "contents": [dict(rv, metadata=reveal_meta("block", ADMIN, 455)),
                  dict(tx, metadata=tx_applied_meta("block", ADMIN, 752, "plant-1", 1200, ROOT, 87, 70))],
     "signature": s2},
]
dump('operations_3_anchor.json', ops_anchor)

# --- block 11432104: an anchor call refused (not the admin), a call of another contract's entrypoint
bad = [{"kind": "transaction", "source": OTHER, "fee": "700", "counter": "17", "gas_limit": "2100",
        "storage_limit": "90", "amount": "0", "destination": CONTRACT,
        "parameters": {"entrypoint": "anchor", "value": anchor_value("plant-1", 1300, ROOT, 90)}}]
h3, s3 = signed_op(branch, bad, keys[8])
fa2_value = [{"prim": "Pair", "args": [{"string": THIRD}, [{"prim": "Pair", "args": [
    {"string": OTHER}, {"prim": "Pair", "args": [{"int": "0"}, {"int": "25"}]}]}]]}]
fa2 = [{"kind": "transaction", "source": THIRD, "fee": "1290", "counter": "118205", "gas_limit": "4150",
        "storage_limit": "67", "amount": "0", "destination": FA2,
        "parameters": {"entrypoint": "transfer", "value": fa2_value}}]
h4, s4 = signed_op(branch, fa2, keys[9])
fa2_meta = {"balance_updates": fee_updates("block", THIRD, 1290), "operation_result": {
    "status": "applied", "storage": {"int": "988314"}, "balance_updates": [],
    "consumed_milligas": "3972410", "storage_size": "48221", "paid_storage_size_diff": "0",
    "lazy_storage_diff": []}}
ops_failed = [
    {"protocol": PROTO, "chain_id": CHAIN, "hash": h3, "branch": branch,
     "contents": [dict(bad[0], metadata=failed_meta("block", OTHER, 700, "NOT_ADMIN", CONTRACT, 27))],
     "signature": s3},
    {"protocol": PROTO, "chain_id": CHAIN, "hash": h4, "branch": branch,
     "contents": [dict(fa2[0], metadata=fa2_meta)], "signature": s4},
]
dump('operations_3_refused_and_foreign.json', ops_failed)

dump('error_counter_in_the_past.json', [{"kind": "temporary", "id": "proto.024-PtTALLiN.contract.counter_in_the_past",
    "contract": ADMIN, "expected": "45", "found": "44"}])
dump('error_operation_conflict.json', [{"kind": "temporary", "id": "prevalidation.operation_conflict",
    "new_hash": h2, "needed_fee_in_mutez": "790"}])
print(json.dumps({"anchor_op": h2, "transfer_op": h1, "refused_op": h3, "fa2_op": h4, "root": ROOT, "fa2": FA2, "branch": branch}, indent=1))
