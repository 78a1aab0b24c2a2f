#!/usr/bin/env node
// Independent LoRaWAN 1.0.x frame peer for the LoRaWAN adapter's tests.
//
// Builds and checks PHYPayloads with the npm package `lora-packet` (pinned in
// scripts/peers/package.json, installed by scripts/peers/install into
// $KALIMA_PEERS_DIR/npm), so the adapter's own frame code is checked against
// an implementation it shares nothing with.
//
// Reads ONE JSON object from stdin, writes ONE JSON object to stdout.
// On any error it writes {"error": "..."} and exits 1.
//
// Conventions:
//   * keys are 32 hex digits; `phy` is base64 of the PHYPayload;
//   * DevAddr, AppEUI/JoinEUI, DevEUI, DevNonce, AppNonce and NetID are hex
//     of the value as usually printed (big-endian, most significant byte
//     first); on the wire LoRaWAN sends them little-endian, and the reversal
//     is done here (by lora-packet);
//   * `payload` / FRMPayload is plain hex bytes, no reversal.
//
// Commands (field `cmd`):
//   uplink              {dev_addr, nwk_skey, app_skey, fcnt (0..2^32-1),
//                        fport (0..255, or null/absent for no FPort),
//                        payload (hex, may be ""), confirmed (bool),
//                        adr, adr_ack_req, ack (bools, optional),
//                        fopts (hex, optional, plain)}
//                       -> {phy}
//                       The frame carries the low 16 bits of fcnt; the MIC
//                       and the encryption use the full 32-bit counter.
//   join_request        {app_eui, dev_eui, dev_nonce, app_key} -> {phy}
//   join_accept_decode  {phy (encrypted, as sent by the network server),
//                        app_key, dev_nonce}
//                       -> {mic_ok, app_nonce, net_id, dev_addr, dl_settings,
//                           rx_delay, cf_list, nwk_skey, app_skey}
//   parse               {phy, nwk_skey, app_skey, fcnt_msb (optional int, the
//                        upper 16 bits of the 32-bit FCnt)}
//                       -> data frames: {mtype, dir, confirmed, dev_addr,
//                           fcnt (16-bit, as carried), fport (int|null),
//                           adr, ack, adr_ack_req, fpending, fopts, mic_ok,
//                           payload (decrypted hex)}
//                       -> join request: {mtype, app_eui, dev_eui, dev_nonce,
//                           mic_ok (only with app_key given)}
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');

function fail(msg) {
    process.stdout.write(JSON.stringify({ error: String(msg) }) + '\n');
    process.exit(1);
}

function loadLoraPacket() {
    const peers = process.env.KALIMA_PEERS_DIR
        || path.join(process.env.HOME || os.homedir(), '.cache', 'kalima-peers');
    const dir = path.join(peers, 'npm', 'node_modules');
    try {
        return require(path.join(dir, 'lora-packet'));
    } catch (e) {
        fail(`cannot load lora-packet from ${dir} (run scripts/peers/install): ${e.message}`);
    }
    return null;
}

// --- input helpers ------------------------------------------------------------

function hexField(req, name, bytes, { optional = false } = {}) {
    const v = req[name];
    if (v === undefined || v === null) {
        if (optional) return null;
        fail(`missing field ${name}`);
    }
    if (typeof v !== 'string' || !/^([0-9a-fA-F]{2})*$/.test(v)) {
        fail(`${name} must be a string of hex byte pairs`);
    }
    const buf = Buffer.from(v, 'hex');
    if (bytes !== undefined && buf.length !== bytes) {
        fail(`${name} must be ${bytes} bytes (${bytes * 2} hex digits), got ${buf.length}`);
    }
    return buf;
}

function intField(req, name, min, max, { optional = false } = {}) {
    const v = req[name];
    if (v === undefined || v === null) {
        if (optional) return null;
        fail(`missing field ${name}`);
    }
    if (!Number.isInteger(v) || v < min || v > max) {
        fail(`${name} must be an integer in ${min}..${max}`);
    }
    return v;
}

function boolField(req, name) {
    const v = req[name];
    if (v === undefined || v === null) return false;
    if (typeof v !== 'boolean') fail(`${name} must be a boolean`);
    return v;
}

function phyField(req) {
    const v = req.phy;
    if (typeof v !== 'string' || v.length === 0) fail('missing field phy (base64)');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(v) || v.length % 4 !== 0) fail('phy must be padded standard base64');
    return Buffer.from(v, 'base64');
}

// lora-packet wants the upper 16 bits of a 32-bit FCnt as a 2-byte buffer in
// wire order (little-endian): it is placed right after the (little-endian)
// low 16 bits in the B0 / A_i blocks.
function fcntMsbBuf(msb) {
    const b = Buffer.alloc(2);
    b.writeUInt16LE(msb, 0);
    return b;
}

const hex = (b) => Buffer.from(b).toString('hex');

// --- commands -----------------------------------------------------------------

function cmdUplink(lp, req) {
    const devAddr = hexField(req, 'dev_addr', 4);
    const nwkSKey = hexField(req, 'nwk_skey', 16);
    const appSKey = hexField(req, 'app_skey', 16);
    const fcnt = intField(req, 'fcnt', 0, 0xffffffff);
    const fport = intField(req, 'fport', 0, 255, { optional: true });
    const payload = hexField(req, 'payload', undefined, { optional: true }) || Buffer.alloc(0);
    const fopts = hexField(req, 'fopts', undefined, { optional: true }) || Buffer.alloc(0);
    if (fopts.length > 15) fail('fopts must be at most 15 bytes');
    if (fport === null && payload.length > 0) fail('a payload needs an fport');
    const confirmed = boolField(req, 'confirmed');

    const fcntMsb = fcntMsbBuf(Math.floor(fcnt / 0x10000));
    const fields = {
        MType: confirmed ? 'Confirmed Data Up' : 'Unconfirmed Data Up',
        DevAddr: devAddr, // big-endian; lora-packet reverses it on the wire
        FCtrl: {
            ADR: boolField(req, 'adr'),
            ADRACKReq: boolField(req, 'adr_ack_req'),
            ACK: boolField(req, 'ack'),
            FPending: false,
        },
        FCnt: fcnt & 0xffff, // fromFields throws past 0xffff; frame carries the low half
        FOpts: fopts,
        payload,
    };
    if (fport !== null) fields.FPort = fport;
    // No AppKey: with AppSKey+NwkSKey+AppKey and FPort 0 lora-packet takes a
    // LoRaWAN 1.1 path.
    const pkt = lp.fromFields(fields, appSKey, nwkSKey, undefined, fcntMsb);
    if (fport === null) {
        // fromFields only computes the MIC when it encrypts, i.e. when there
        // is an FPort; a frame without one still needs its MIC.
        lp.recalculateMIC(pkt, nwkSKey, undefined, fcntMsb);
    }
    if (!lp.verifyMIC(pkt, nwkSKey, undefined, fcntMsb)) fail('internal: built uplink fails its own MIC');
    return { phy: pkt.getPHYPayload().toString('base64') };
}

function cmdJoinRequest(lp, req) {
    const appEui = hexField(req, 'app_eui', 8);
    const devEui = hexField(req, 'dev_eui', 8);
    const devNonce = hexField(req, 'dev_nonce', 2);
    const appKey = hexField(req, 'app_key', 16);
    const pkt = lp.fromFields(
        { MType: 'Join Request', AppEUI: appEui, DevEUI: devEui, DevNonce: devNonce },
        undefined, undefined, appKey,
    );
    if (!lp.verifyMIC(pkt, undefined, appKey)) fail('internal: built join request fails its own MIC');
    return { phy: pkt.getPHYPayload().toString('base64') };
}

function cmdJoinAcceptDecode(lp, req) {
    const phy = phyField(req);
    const appKey = hexField(req, 'app_key', 16);
    const devNonce = hexField(req, 'dev_nonce', 2);
    if (phy.length !== 17 && phy.length !== 33) {
        fail(`a JoinAccept is 17 or 33 bytes, got ${phy.length}`);
    }
    if ((phy[0] >> 5) !== 1) fail(`MType is ${phy[0] >> 5}, not 1 (Join Accept)`);
    // The network server encrypts with AES-decrypt; the device undoes it with
    // AES-encrypt (ECB) over everything after MHDR, MIC included.
    const plain = lp.decryptJoinAccept(lp.fromWire(phy), appKey);
    const ja = lp.fromWire(plain);
    const dlSettings = ja.DLSettings.readUInt8(0);
    // LoRaWAN 1.0.x: MIC = aes128_cmac(AppKey, MHDR | the decrypted fields)[0..3].
    // lora-packet switches to the 1.1 MIC when DLSettings bit 7 (OptNeg, RFU
    // in 1.0.x) is set, which a wrong AppKey's garbage does half the time; it
    // reads that bit from the DLSettings field, but CMACs the raw MACPayload,
    // so clearing the field's copy keeps the 1.0.x MIC over the real bytes.
    ja.DLSettings = Buffer.from([dlSettings & 0x7f]);
    const micOk = lp.verifyMIC(ja, undefined, appKey);
    // ja.AppNonce / NetID are big-endian here; generateSessionKeys reverses
    // them (and DevNonce) into the little-endian key-derivation block
    // 0x01|0x02 | AppNonce | NetID | DevNonce | pad.
    const keys = lp.generateSessionKeys(appKey, ja.NetID, ja.AppNonce, devNonce);
    return {
        mic_ok: micOk,
        app_nonce: hex(ja.AppNonce),
        net_id: hex(ja.NetID),
        dev_addr: hex(ja.DevAddr),
        dl_settings: dlSettings,
        rx_delay: ja.RxDelay.readUInt8(0),
        cf_list: hex(ja.CFList),
        nwk_skey: hex(keys.NwkSKey),
        app_skey: hex(keys.AppSKey),
    };
}

function cmdParse(lp, req) {
    const phy = phyField(req);
    if (phy.length < 5) fail(`PHYPayload too short (${phy.length} bytes)`);
    let pkt;
    try {
        pkt = lp.fromWire(phy);
    } catch (e) {
        fail(`cannot parse PHYPayload: ${e.message}`);
    }
    const mtype = pkt.getMType();
    if (pkt.isJoinRequestMessage()) {
        const appKey = hexField(req, 'app_key', 16, { optional: true });
        const out = {
            mtype,
            app_eui: hex(pkt.AppEUI),
            dev_eui: hex(pkt.DevEUI),
            dev_nonce: hex(pkt.DevNonce),
        };
        if (appKey) out.mic_ok = lp.verifyMIC(pkt, undefined, appKey);
        return out;
    }
    if (!pkt.isDataMessage()) {
        if (pkt.isJoinAcceptMessage()) fail('a Join Accept is encrypted: use cmd join_accept_decode');
        fail(`unsupported MType ${mtype}`);
    }
    if (phy.length < 12) fail(`data frame too short (${phy.length} bytes)`);
    const nwkSKey = hexField(req, 'nwk_skey', 16);
    const appSKey = hexField(req, 'app_skey', 16, { optional: true });
    const fcntMsb = fcntMsbBuf(intField(req, 'fcnt_msb', 0, 0xffff, { optional: true }) || 0);
    if (8 + (pkt.FCtrl[0] & 0x0f) > phy.length - 4) fail('FOptsLen runs past the frame');
    const fport = pkt.getFPort();
    let payload = Buffer.alloc(0);
    if (pkt.FRMPayload && pkt.FRMPayload.length > 0) {
        if (fport !== 0 && !appSKey) fail('app_skey is needed to decrypt a payload on FPort > 0');
        payload = lp.decrypt(pkt, appSKey || undefined, nwkSKey, fcntMsb);
    }
    const down = pkt.getDir() === 'down';
    return {
        mtype,
        dir: pkt.getDir(),
        confirmed: pkt.isConfirmed(),
        dev_addr: hex(pkt.DevAddr),
        fcnt: pkt.getFCnt(),
        fport,
        adr: pkt.getFCtrlADR(),
        ack: pkt.getFCtrlACK(),
        // bit 4 of FCtrl is FPending downlink, RFU (ClassB) uplink; bit 6 is
        // ADRACKReq uplink, RFU downlink
        adr_ack_req: down ? false : pkt.getFCtrlADRACKReq(),
        fpending: down ? pkt.getFCtrlFPending() : false,
        fopts: hex(pkt.FOpts),
        mic_ok: lp.verifyMIC(pkt, nwkSKey, undefined, fcntMsb),
        payload: hex(payload),
    };
}

const COMMANDS = {
    uplink: cmdUplink,
    join_request: cmdJoinRequest,
    join_accept_decode: cmdJoinAcceptDecode,
    parse: cmdParse,
};

function main() {
    let text;
    try {
        text = fs.readFileSync(0, 'utf8');
    } catch (e) {
        fail(`cannot read stdin: ${e.message}`);
    }
    let req;
    try {
        req = JSON.parse(text);
    } catch (e) {
        fail(`stdin is not JSON: ${e.message}`);
    }
    if (req === null || typeof req !== 'object' || Array.isArray(req)) fail('stdin must hold one JSON object');
    const run = COMMANDS[req.cmd];
    if (!run) fail(`unknown cmd ${JSON.stringify(req.cmd)}; one of ${Object.keys(COMMANDS).join(', ')}`);
    const lp = loadLoraPacket();
    let out;
    try {
        out = run(lp, req);
    } catch (e) {
        fail(`${req.cmd}: ${e.message}`);
    }
    process.stdout.write(JSON.stringify(out) + '\n');
}

main();
