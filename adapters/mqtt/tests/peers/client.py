#!/usr/bin/env python3
"""An interactive MQTT client (paho-mqtt 2.x) driven by JSON lines, for the adapter tests.

Usage: client.py '{"host": "127.0.0.1", "port": 1883, "version": "5" | "3.1.1",
                   "username": "dev", "password": "token", "client_id": "c1", "inflight": 20}'

It connects at once and prints one JSON object per line on stdout for everything the
server sends or the client does:

  {"event": "connack", "reason_code": 0, "failure": false}
  {"event": "published", "tag": T, "mid": 1, "rc": 0}            (a publish command was queued)
  {"event": "ack", "mid": 1, "reason_code": 0}                     (PUBACK, or PUBCOMP for QoS 2)
  {"event": "suback", "mid": 2, "codes": [1, 135]}
  {"event": "unsuback", "mid": 3}
  {"event": "message", "topic": "...", "payload_hex": "...", "payload": "..." | null, "qos": 1}
  {"event": "disconnect", "reason_code": 0}                        (then the process exits)

Commands, one JSON object per line on stdin:

  {"cmd": "publish", "tag": T, "topic": "...", "payload": "text" | "payload_hex": "00ff..",
   "qos": 0|1|2, "props": [["name", "value"], ...]}
  {"cmd": "subscribe", "tag": T, "filters": [["kalima/out/#", 1], ...]}
  {"cmd": "unsubscribe", "tag": T, "filters": ["kalima/out/#"]}
  {"cmd": "disconnect"}

Reason codes are paho's numeric values: MQTT 3.1.1 CONNACK codes are mapped to their MQTT 5
equivalents (4, bad user name or password, is 134), SUBACK failure 0x80 is 128.
The network loop runs in the main thread and never reconnects, so a connection the server
closes shows as one "disconnect" event and the end of the process.
"""

import json
import queue
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ARGS = json.loads(sys.argv[1])
V5 = str(ARGS.get("version", "5")) == "5"
OUT_LOCK = threading.Lock()


def emit(obj):
    with OUT_LOCK:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def code(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def on_connect(client, userdata, flags, reason_code, properties):
    emit({"event": "connack", "reason_code": code(reason_code), "failure": reason_code.is_failure})


def on_disconnect(client, userdata, flags, reason_code, properties):
    userdata["gone"] = True
    emit({"event": "disconnect", "reason_code": code(reason_code)})


def on_publish(client, userdata, mid, reason_code, properties):
    emit({"event": "ack", "mid": mid, "reason_code": code(reason_code)})


def on_subscribe(client, userdata, mid, reason_codes, properties):
    emit({"event": "suback", "mid": mid, "codes": [code(c) for c in reason_codes]})


def on_unsubscribe(client, userdata, mid, reason_codes, properties):
    emit({"event": "unsuback", "mid": mid})


def on_message(client, userdata, msg):
    try:
        text = msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    emit({
        "event": "message",
        "topic": msg.topic,
        "payload_hex": msg.payload.hex(),
        "payload": text,
        "qos": msg.qos,
    })


def read_stdin(commands):
    for line in sys.stdin:
        line = line.strip()
        if line:
            commands.put(json.loads(line))
    commands.put({"cmd": "disconnect"})


def run_command(client, cmd):
    kind = cmd.get("cmd")
    tag = cmd.get("tag")
    if kind == "publish":
        if "payload_hex" in cmd:
            payload = bytes.fromhex(cmd["payload_hex"])
        else:
            payload = cmd.get("payload", "").encode("utf-8")
        props = None
        if V5 and cmd.get("props"):
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [(k, v) for k, v in cmd["props"]]
        info = client.publish(cmd["topic"], payload, qos=cmd.get("qos", 1), properties=props)
        emit({"event": "published", "tag": tag, "mid": info.mid, "rc": int(info.rc)})
    elif kind == "subscribe":
        filters = [(f, q) for f, q in cmd["filters"]]
        rc, mid = client.subscribe(filters)
        emit({"event": "subscribe_sent", "tag": tag, "mid": mid, "rc": int(rc)})
    elif kind == "unsubscribe":
        rc, mid = client.unsubscribe(cmd["filters"])
        emit({"event": "unsubscribe_sent", "tag": tag, "mid": mid, "rc": int(rc)})
    elif kind == "disconnect":
        client.disconnect()
    else:
        emit({"event": "error", "message": f"unknown command {cmd!r}"})


def main():
    state = {"gone": False}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=ARGS.get("client_id", "kalima-test"),
        protocol=mqtt.MQTTv5 if V5 else mqtt.MQTTv311,
        userdata=state,
        reconnect_on_failure=False,
    )
    if ARGS.get("username") is not None:
        client.username_pw_set(ARGS["username"], ARGS.get("password"))
    client.max_inflight_messages_set(int(ARGS.get("inflight", 20)))
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_unsubscribe = on_unsubscribe
    client.on_message = on_message
    try:
        client.connect(ARGS.get("host", "127.0.0.1"), int(ARGS["port"]), keepalive=int(ARGS.get("keepalive", 60)))
    except OSError as e:
        emit({"event": "connect_error", "message": str(e)})
        return
    commands = queue.Queue()
    threading.Thread(target=read_stdin, args=(commands,), daemon=True).start()
    while not state["gone"]:
        while True:
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                break
            run_command(client, cmd)
        rc = client.loop(timeout=0.01)
        if rc != mqtt.MQTT_ERR_SUCCESS and not state["gone"]:
            # paho reports a lost connection through on_disconnect in most paths; make sure.
            emit({"event": "disconnect", "reason_code": -int(rc)})
            break


if __name__ == "__main__":
    main()
