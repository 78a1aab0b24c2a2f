#!/usr/bin/env python3
"""A pipelining MQTT publisher (paho-mqtt 2.x): publishes uniquely numbered messages and
records every acknowledgement, in the order it arrived.

Usage: publish.py '{"host": "127.0.0.1", "port": 1883, "version": "5" | "3.1.1",
                    "username": "dev", "password": "token", "client_id": "p1",
                    "topic": "kalima/bulk/n", "qos": 1, "payload": "{n}",
                    "start": 0, "count": 2000, "window": 100,
                    "duration_s": null, "timeout_s": 60}'

Message numbers run from `start`; `payload` is a template in which `{n}` is replaced by the
number. At most `window` messages are unacknowledged at any time. It stops after `count`
messages (when given) are all acknowledged, after `duration_s` seconds (when given), after
`timeout_s` seconds, or when the server closes the connection (e.g. a node killed mid-stream),
and then prints one JSON object on stdout:

  {"connack": 0, "end": "done" | "duration" | "timeout" | "disconnected" | "refused",
   "sent": 2000,                       # messages handed to the socket
   "acks": [[n, mid, reason_code], ...] # every PUBACK (PUBCOMP for QoS 2), in arrival order
  }

A reason code below 128 is a success. Nothing is ever retransmitted and the client never
reconnects, so each number is sent at most once.
"""

import json
import sys
import time

import paho.mqtt.client as mqtt

ARGS = json.loads(sys.argv[1])
V5 = str(ARGS.get("version", "5")) == "5"


def main():
    state = {"connack": None, "gone": False, "acks": [], "inflight": {}}

    def on_connect(client, userdata, flags, reason_code, properties):
        state["connack"] = reason_code.value

    def on_disconnect(client, userdata, flags, reason_code, properties):
        state["gone"] = True

    def on_publish(client, userdata, mid, reason_code, properties):
        if mid not in state["inflight"]:
            return  # a QoS 0 message left the socket: nothing was acknowledged
        n = state["inflight"].pop(mid)
        state["acks"].append([n, mid, reason_code.value])

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=ARGS.get("client_id", "kalima-publisher"),
        protocol=mqtt.MQTTv5 if V5 else mqtt.MQTTv311,
        reconnect_on_failure=False,
    )
    if ARGS.get("username") is not None:
        client.username_pw_set(ARGS["username"], ARGS.get("password"))
    window = int(ARGS.get("window", 100))
    # paho's own limit stays above ours, so every publish goes to the socket at once.
    client.max_inflight_messages_set(window + 1)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish

    result = {"connack": None, "end": None, "sent": 0, "acks": state["acks"]}
    started = time.monotonic()
    timeout = float(ARGS.get("timeout_s", 60))
    duration = ARGS.get("duration_s")
    count = ARGS.get("count")
    topic = ARGS["topic"]
    qos = int(ARGS.get("qos", 1))
    template = ARGS.get("payload", "{n}")
    start = int(ARGS.get("start", 0))

    try:
        client.connect(ARGS.get("host", "127.0.0.1"), int(ARGS["port"]), keepalive=60)
    except OSError as e:
        result["end"] = "connect_error: " + str(e)
        print(json.dumps(result))
        return
    while state["connack"] is None and not state["gone"] and time.monotonic() - started < timeout:
        if client.loop(timeout=0.01) != mqtt.MQTT_ERR_SUCCESS:
            break
    result["connack"] = state["connack"]
    if state["connack"] != 0:
        result["end"] = "refused"
        print(json.dumps(result))
        return

    n = start
    end = None
    while end is None:
        elapsed = time.monotonic() - started
        if duration is not None and elapsed >= float(duration):
            end = "duration"
            break
        if elapsed >= timeout:
            end = "timeout"
            break
        while len(state["inflight"]) < window and (count is None or n < start + int(count)):
            info = client.publish(topic, template.replace("{n}", str(n)).encode("utf-8"), qos=qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                end = "disconnected"
                break
            if qos > 0:
                state["inflight"][info.mid] = n
            result["sent"] += 1
            n += 1
        if end is not None:
            break
        if count is not None and n >= start + int(count) and not state["inflight"]:
            end = "done"
            break
        if client.loop(timeout=0.01) != mqtt.MQTT_ERR_SUCCESS or state["gone"]:
            end = "disconnected"
    result["end"] = end
    if end != "disconnected":
        client.disconnect()
        client.loop(timeout=0.1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
