#!/usr/bin/env python3
"""pytezos as an independent Tezos implementation for the Tezos bridge's tests.

Reads one JSON request on stdin, writes one JSON answer on stdout.

  tezos_peer.py forge     {"cases": [{"name", "operation": {"branch", "contents"},
                            "signature": hex, "public_key": "edpk..."}]}
      -> [{"name", "forged": hex, "hash": "o...", "signature_ok": bool, "error"}]
      pytezos's local forger (pytezos.operation.forge.forge_operation_group) forges the
      group, its base58 and blake2b give the operation hash of forged bytes || signature, and
      its Key.verify checks the Ed25519 signature over 0x03 || forged bytes.

  tezos_peer.py contract  {"code": "<Michelson source>", "scenarios": [{"name",
                            "entrypoint", "arg", "storage": {"admin", "last": {hex: int}},
                            "sender", "amount"}]}
      -> [{"name", "ok": bool, "failwith": str | null, "storage", "events", "error"}]
      pytezos's Michelson interpreter runs each call (ContractInterface ... .interpret).
"""

import json
import sys
import traceback


def forge(req):
    from pytezos.crypto.encoding import base58_encode
    from pytezos.crypto.key import Key, blake2b_32
    from pytezos.operation.forge import forge_operation_group

    out = []
    for case in req["cases"]:
        res = {"name": case["name"], "forged": None, "hash": None, "signature_ok": False, "error": None}
        try:
            forged = forge_operation_group(case["operation"])
            res["forged"] = forged.hex()
            signature = bytes.fromhex(case["signature"])
            res["hash"] = base58_encode(blake2b_32(forged + signature).digest(), b"o").decode()
            key = Key.from_encoded_key(case["public_key"])
            try:
                key.verify(base58_encode(signature, b"edsig").decode(), b"\x03" + forged)
                res["signature_ok"] = True
            except ValueError as e:
                res["error"] = f"signature: {e}"
        except Exception as e:  # reported to the Rust side, which fails the test
            res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        out.append(res)
    return out


def failwith_of(err):
    """The FAILWITH value of a MichelsonRuntimeError, as pytezos prints it."""
    text = str(err.args[-1]) if getattr(err, "args", None) else str(err)
    return text.strip("'\"")


def contract(req):
    from pytezos import ContractInterface
    from pytezos.michelson.repl import MichelsonRuntimeError

    ci = ContractInterface.from_michelson(req["code"])
    out = []
    for sc in req["scenarios"]:
        res = {"name": sc["name"], "ok": False, "failwith": None, "storage": None, "events": [], "error": None}
        try:
            storage = {
                "admin": sc["storage"]["admin"],
                "last": {bytes.fromhex(k): v for k, v in sc["storage"]["last"].items()},
            }
            arg = sc["arg"]
            if sc["entrypoint"] == "anchor":
                call = ci.anchor(
                    chain=bytes.fromhex(arg["chain"]),
                    tree_size=arg["tree_size"],
                    root=bytes.fromhex(arg["root"]),
                    height=arg["height"],
                )
            else:
                call = getattr(ci, sc["entrypoint"])(arg)
            r = call.with_amount(sc.get("amount", 0)).interpret(storage=storage, sender=sc["sender"])
            res["ok"] = True
            res["storage"] = {
                "admin": r.storage["admin"],
                "last": {k.hex(): v for k, v in r.storage["last"].items()},
            }
            res["events"] = [
                {"tag": op.get("tag"), "payload": op.get("payload")} for op in r.operations if op.get("kind") == "event"
            ]
        except MichelsonRuntimeError as e:
            res["failwith"] = failwith_of(e)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        out.append(res)
    return out


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("forge", "contract"):
        sys.stderr.write("usage: tezos_peer.py forge|contract < request.json\n")
        return 2
    req = json.load(sys.stdin)
    answer = forge(req) if sys.argv[1] == "forge" else contract(req)
    json.dump(answer, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
