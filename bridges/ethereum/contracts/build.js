#!/usr/bin/env node
// Compiles the bridge contracts with solc-js and writes the artifacts the Rust bindings embed.
//
//   node bridges/ethereum/contracts/build.js           write out/*.json
//   node bridges/ethereum/contracts/build.js --check   exit 1 if out/*.json differ from a fresh build
//
// Exit codes: 0 ok, 1 artifacts out of date, 2 compiler missing or compilation failed.
// The compiler and OpenZeppelin come from $KALIMA_PEERS_DIR/npm (default
// $HOME/.cache/kalima-peers/npm), installed by scripts/peers/install.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');

// The committed artifacts are only reproducible with exactly these inputs.
const SOLC_VERSION = '0.8.37';
const OPENZEPPELIN_VERSION = '5.7.0';
// Source unit (relative to this directory) -> contract name; the artifact path mirrors the
// source path under out/. test/ holds contracts that exist only to exercise the bridge.
const CONTRACTS = [
  ['KlxToken.sol', 'KlxToken'],
  ['KlxBridge.sol', 'KlxBridge'],
  ['KlxAnchor.sol', 'KlxAnchor'],
  ['test/FeeOnTransferToken.sol', 'FeeOnTransferToken'],
];
const REBUILD = 'node bridges/ethereum/contracts/build.js';

const contractsDir = __dirname;
const outDir = path.join(contractsDir, 'out');
const peersDir = process.env.KALIMA_PEERS_DIR || path.join(os.homedir(), '.cache', 'kalima-peers');
const nodeModules = path.join(peersDir, 'npm', 'node_modules');

function fail(code, message) {
  process.stderr.write(message.endsWith('\n') ? message : message + '\n');
  process.exit(code);
}

function packageVersion(dir) {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')).version;
  } catch (e) {
    return null;
  }
}

function loadSolc() {
  const solcDir = path.join(nodeModules, 'solc');
  const ozDir = path.join(nodeModules, '@openzeppelin', 'contracts');
  const solcVersion = packageVersion(solcDir);
  const ozVersion = packageVersion(ozDir);
  if (solcVersion === null || ozVersion === null) {
    fail(2, `solc or @openzeppelin/contracts not found under ${nodeModules}; run scripts/peers/install`);
  }
  if (solcVersion !== SOLC_VERSION || ozVersion !== OPENZEPPELIN_VERSION) {
    fail(
      2,
      `need solc ${SOLC_VERSION} and @openzeppelin/contracts ${OPENZEPPELIN_VERSION}, ` +
        `found ${solcVersion} and ${ozVersion} under ${nodeModules}; run scripts/peers/install`,
    );
  }
  return require(solcDir);
}

// Source unit names are relative ("KlxBridge.sol", "@openzeppelin/...") rather than absolute
// paths: they end up in the metadata hash appended to the bytecode, so absolute paths would
// make the artifacts depend on where the repository and the peers are checked out.
function findImport(unitName) {
  if (!unitName.startsWith('@openzeppelin/')) {
    return { error: `unexpected import ${unitName}: only @openzeppelin/ is resolvable` };
  }
  const file = path.join(nodeModules, unitName);
  if (!path.resolve(file).startsWith(path.resolve(nodeModules) + path.sep)) {
    return { error: `import ${unitName} escapes ${nodeModules}` };
  }
  try {
    return { contents: fs.readFileSync(file, 'utf8') };
  } catch (e) {
    return { error: `cannot read ${file}: ${e.message}` };
  }
}

function compile(solc) {
  const sources = {};
  for (const [unit] of CONTRACTS) {
    sources[unit] = { content: fs.readFileSync(path.join(contractsDir, unit), 'utf8') };
  }
  const input = {
    language: 'Solidity',
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: 'cancun',
      outputSelection: {
        '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const diagnostics = output.errors || [];
  const errors = diagnostics.filter((d) => d.severity === 'error');
  for (const d of diagnostics.filter((d) => d.severity !== 'error')) {
    process.stderr.write(d.formattedMessage || d.message);
  }
  if (errors.length > 0) {
    fail(2, errors.map((d) => d.formattedMessage || d.message).join('\n'));
  }

  const artifacts = {};
  for (const [unit, name] of CONTRACTS) {
    const c = output.contracts && output.contracts[unit] && output.contracts[unit][name];
    if (!c) fail(2, `solc produced no output for ${name} in ${unit}`);
    const artifact = {
      contractName: name,
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    };
    artifacts[path.join(outDir, path.dirname(unit), `${name}.json`)] = JSON.stringify(artifact, null, 2) + '\n';
  }
  return artifacts;
}

function main() {
  const args = process.argv.slice(2);
  const check = args.includes('--check');
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length > 0) fail(2, `unknown arguments: ${unknown.join(' ')}\nusage: build.js [--check]`);

  const artifacts = compile(loadSolc());
  if (check) {
    const stale = [];
    for (const [file, text] of Object.entries(artifacts)) {
      let current = null;
      try {
        current = fs.readFileSync(file, 'utf8');
      } catch (e) {
        // Missing counts as stale.
      }
      if (current !== text) stale.push(path.relative(process.cwd(), file) || file);
    }
    if (stale.length > 0) {
      fail(1, `${stale.join(', ')} differ from the Solidity sources; run ${REBUILD}`);
    }
    return;
  }
  for (const [file, text] of Object.entries(artifacts)) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, text);
    process.stdout.write(`wrote ${path.relative(process.cwd(), file)}\n`);
  }
}

main();
