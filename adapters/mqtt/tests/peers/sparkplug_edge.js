#!/usr/bin/env node
// A Sparkplug B edge node built on Eclipse Tahu's npm sparkplug-client (an implementation
// independent of the node's), used by the tests as the edge side. One JSON argument:
//   {"broker":"tcp://127.0.0.1:1883","group":"plant","edge":"edge-1","device":"dev-1",
//    "data":5,"interval_ms":200,"births":true,"linger_ms":3000}
// On connect it publishes NBIRTH (Temperature Float, Count Int32) and DBIRTH (Pressure
// Double) unless "births" is false, then "data" rounds of NDATA + DDATA. Every NCMD it
// receives is printed as a JSON line {"event":"ncmd","metrics":[...]} and a Rebirth request
// is answered by publishing the births again. Progress lines: {"event":"birth"|"data"|"done"}.
"use strict";
const path = require("path");
const os = require("os");
const peers = process.env.KALIMA_PEERS_DIR || path.join(os.homedir(), ".cache", "kalima-peers");
let sparkplug;
try {
  sparkplug = require(path.join(peers, "npm", "node_modules", "sparkplug-client"));
} catch (e) {
  console.log(JSON.stringify({ error: "npm sparkplug-client missing: run scripts/peers/install (" + e.message + ")" }));
  process.exit(1);
}
const args = JSON.parse(process.argv[2] || "{}");
const out = (o) => console.log(JSON.stringify(o));
const client = sparkplug.newClient({
  serverUrl: args.broker,
  groupId: args.group,
  edgeNode: args.edge,
  clientId: args.edge + "-" + process.pid,
  version: "spBv1.0",
  username: "",
  password: "",
});
let temperature = 20.0;
const births = () => {
  client.publishNodeBirth({
    timestamp: Date.now(),
    metrics: [
      { name: "Temperature", type: "Float", value: temperature, alias: 1 },
      { name: "Count", type: "Int32", value: -5, alias: 2 },
    ],
  });
  client.publishDeviceBirth(args.device, {
    timestamp: Date.now(),
    metrics: [{ name: "Pressure", type: "Double", value: 1.25, alias: 3 }],
  });
  out({ event: "birth" });
};
client.on("birth", async () => {
  if (args.births !== false) births();
  for (let i = 0; i < (args.data || 0); i++) {
    await new Promise((r) => setTimeout(r, args.interval_ms || 200));
    temperature += 0.5;
    client.publishNodeData({ timestamp: Date.now(), metrics: [{ name: "Temperature", type: "Float", value: temperature }] });
    client.publishDeviceData(args.device, { timestamp: Date.now(), metrics: [{ name: "Pressure", type: "Double", value: 1.25 + i }] });
    out({ event: "data", temperature });
  }
  setTimeout(() => {
    out({ event: "done" });
    client.stop();
    process.exit(0);
  }, args.linger_ms || 3000);
});
client.on("ncmd", (payload) => {
  const metrics = (payload.metrics || []).map((m) => ({ name: m.name, value: m.value }));
  out({ event: "ncmd", metrics });
  if (metrics.some((m) => m.name === "Node Control/Rebirth" && m.value)) births();
});
client.on("error", (e) => out({ event: "error", message: String(e) }));
