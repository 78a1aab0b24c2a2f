#!/usr/bin/env python3
"""Modbus server peer for the Modbus adapter's integration tests.

An independent Modbus implementation (pymodbus 3.16.1) that the Rust tests
talk to over Modbus TCP or Modbus RTU (on a pseudo-terminal from socat).

    modbus_sim.py (--tcp HOST:PORT | --rtu PATH [--baud 9600])
                  [--unit 1] [--registers JSON] [--verbose]

--registers takes a JSON object whose keys are 0-based protocol addresses:

    {"holding": {"0": 1234, "10": 65535}, "input": {"5": 7},
     "coils": {"3": true}, "discrete": {"0": true}}

Every table has 1000 entries (addresses 0..999), zero/false where not given;
a request touching an address >= 1000 gets exception 02 (illegal data
address), see BoundedContext. Holding registers and coils are writable
(function codes 5, 6, 15, 16, also 22 and 23) and written values persist for
the life of the process.

When the server listens and can answer, exactly one line "READY" is printed
to stdout; nothing else ever goes to stdout. Diagnostics go to stderr, and
pymodbus's own logging is silenced unless --verbose. SIGTERM and SIGINT stop
the server and exit with status 0. Bad arguments exit 2, a failure to start
listening (port in use, missing device) exits 1.

--rtu needs pyserial in the same interpreter: pymodbus's serial transport is
built on it, but pymodbus lists it only as the optional extra
"pymodbus[serial]", so "pymodbus==3.16.1" alone does not bring it in. Without
it --rtu exits 1 with a message on stderr; --tcp does not need it.

Datastore API notes (pymodbus 3.16):
  * The device is built with the new, non-deprecated SimDevice/SimData API
    (pymodbus.simulator). The older ModbusDeviceContext,
    ModbusServerContext and ModbusSequentialDataBlock still exist in 3.16 but
    log a deprecation warning ("will be removed in v4") when constructed,
    and are converted internally into SimDevice/SimData anyway.
  * SimData addresses are 0-based protocol addresses, the same as in the
    requests. (The deprecated ModbusSequentialDataBlock(address, values) is
    1-based: it builds SimData(address - 1, ...), so block address 1 is
    protocol address 0.)
  * The four tables are separate ("non-shared" blocks, a 4-tuple of
    coils, discrete inputs, holding, input); with that layout coils and
    discrete inputs are addressed bit by bit, as in ordinary Modbus.

Unit id behaviour (pymodbus 3.16 default, checked against its source and by
test): the device is a SimDevice with id=--unit. A request for any other unit
id is still decoded (neither the TCP nor the RTU server framer filters on the
unit id), the lookup of that id in the datastore fails, and the server
ANSWERS with an exception response, code 04 (server device failure), echoing
the requested unit id, e.g. function 03 -> 0x83 0x04. This is the same over
TCP and RTU. (The server's ignore_missing_devices option, which would give
"no answer", only applies to the deprecated ModbusServerContext datastore
when it is used with the old simulator, so it has no effect here.)
--unit 0 is special in pymodbus: a device with id 0 answers every unit id.
Broadcast handling is off, so unit 0 is otherwise an ordinary id.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

TABLE_SIZE = 1000
TABLES = ("holding", "input", "coils", "discrete")


def fail(msg: str, code: int = 2) -> None:
    """Print an error to stderr and exit."""
    print(f"modbus_sim: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_tcp(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [ADDR]:PORT)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port_no = int(port, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}") from None
    if not 0 <= port_no <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, port_no


def parse_unit(value: str) -> int:
    """Parse the unit id, 0..255 (Modbus proper uses 1..247)."""
    try:
        unit = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad unit id {value!r}") from None
    if not 0 <= unit <= 255:
        raise argparse.ArgumentTypeError(f"unit id {unit} not in 0..255")
    return unit


def parse_registers(text: str) -> dict[str, list]:
    """Turn the --registers JSON into four full tables of TABLE_SIZE values."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--registers is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError("--registers must be a JSON object")
    tables: dict[str, list] = {
        "holding": [0] * TABLE_SIZE,
        "input": [0] * TABLE_SIZE,
        "coils": [False] * TABLE_SIZE,
        "discrete": [False] * TABLE_SIZE,
    }
    for name, entries in spec.items():
        if name not in tables:
            raise ValueError(
                f"--registers: unknown table {name!r} (use {', '.join(TABLES)})"
            )
        if not isinstance(entries, dict):
            raise ValueError(f"--registers: {name} must be an object")
        bits = name in ("coils", "discrete")
        for key, value in entries.items():
            try:
                address = int(key, 10)
            except ValueError:
                raise ValueError(
                    f"--registers: {name} address {key!r} is not a number"
                ) from None
            if not 0 <= address < TABLE_SIZE:
                raise ValueError(
                    f"--registers: {name} address {address} not in 0..{TABLE_SIZE - 1}"
                )
            if bits:
                if isinstance(value, bool):
                    tables[name][address] = value
                elif isinstance(value, int) and value in (0, 1):
                    tables[name][address] = bool(value)
                else:
                    raise ValueError(
                        f"--registers: {name}[{address}] = {value!r} is not a boolean"
                    )
            else:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int)
                    or not 0 <= value <= 0xFFFF
                ):
                    raise ValueError(
                        f"--registers: {name}[{address}] = {value!r} is not 0..65535"
                    )
                tables[name][address] = value
    return tables


def build_device(unit: int, tables: dict[str, list]):
    """Build the pymodbus device: four separate 0-based tables."""
    from pymodbus.simulator import DataType, SimData, SimDevice

    def block(values: list, datatype: DataType) -> list:
        return [SimData(address=0, values=values, datatype=datatype)]

    return SimDevice(
        id=unit,
        # (coils, discrete inputs, holding registers, input registers)
        simdata=(
            block(tables["coils"], DataType.BITS),
            block(tables["discrete"], DataType.BITS),
            block(tables["holding"], DataType.REGISTERS),
            block(tables["input"], DataType.REGISTERS),
        ),
    )


class BoundedContext:
    """Datastore wrapper that makes every table end exactly at TABLE_SIZE.

    pymodbus stores coils and discrete inputs 16 to a register and pads the
    last register, so by itself it would also serve coils/discrete inputs
    1000..1007 (as false). This wrapper answers exception 02 (illegal data
    address) for any request reaching past address 999, in every table.
    Requests for an unknown unit id are passed through untouched, so they
    keep pymodbus's own behaviour (see the module docstring).
    """

    def __init__(self, inner, unit: int) -> None:
        self.inner = inner
        self.unit = unit

    def device_ids(self) -> list[int]:
        return self.inner.device_ids()

    def _past_end(self, device_id: int, address: int, count: int) -> bool:
        known = device_id == self.unit or self.unit == 0
        return known and address + count > TABLE_SIZE

    async def async_getValues(self, device_id, func_code, address, count=1):
        from pymodbus.constants import ExcCodes

        if self._past_end(device_id, address, count):
            return ExcCodes.ILLEGAL_ADDRESS
        return await self.inner.async_getValues(device_id, func_code, address, count)

    async def async_setValues(self, device_id, func_code, address, values):
        from pymodbus.constants import ExcCodes

        if self._past_end(device_id, address, len(values)):
            return ExcCodes.ILLEGAL_ADDRESS
        return await self.inner.async_setValues(device_id, func_code, address, values)


async def serve(args: argparse.Namespace, device) -> int:
    """Run the server until SIGTERM/SIGINT."""
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.tcp is not None:
        server = ModbusTcpServer(device, address=args.tcp)
        where = f"tcp {args.tcp[0]}:{args.tcp[1]}"
    else:
        server = ModbusSerialServer(
            device,
            port=args.rtu,
            baudrate=args.baud,
            bytesize=8,
            parity="N",
            stopbits=1,
        )
        where = f"rtu {args.rtu}"
    # The server turns the SimDevice into its internal datastore (SimCore) in
    # its constructor and uses it only through server.context.
    server.context = BoundedContext(server.context, args.unit)

    # Let pymodbus say why listening failed (it logs a warning with the OS
    # error), even when it is otherwise silenced.
    pm_logger = logging.getLogger("pymodbus.logging")
    quiet_level = pm_logger.level
    if not args.verbose:
        pm_logger.setLevel(logging.WARNING)
    try:
        await server.serve_forever(background=True)
    except (RuntimeError, OSError) as exc:
        print(f"modbus_sim: cannot serve {where}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if not args.verbose:
            pm_logger.setLevel(quiet_level)
    # The serial transport registers its reader with call_soon: let it run.
    await asyncio.sleep(0)
    if args.verbose:
        print(f"modbus_sim: serving unit {args.unit} on {where}", file=sys.stderr)

    try:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass

    await stop.wait()
    await server.shutdown()
    return 0


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        description="Modbus TCP/RTU server peer (pymodbus) for integration tests."
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--tcp", metavar="HOST:PORT", type=parse_tcp, help="serve Modbus TCP here"
    )
    where.add_argument(
        "--rtu", metavar="PATH", help="serve Modbus RTU on this serial device"
    )
    parser.add_argument(
        "--baud", type=int, default=9600, help="RTU baud rate, 8N1 (default 9600)"
    )
    parser.add_argument(
        "--unit", type=parse_unit, default=1, help="unit/slave id served (default 1)"
    )
    parser.add_argument(
        "--registers",
        metavar="JSON",
        default="{}",
        help='initial values, e.g. {"holding": {"0": 1234}, "coils": {"3": true}}',
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="pymodbus debug logging to stderr"
    )
    args = parser.parse_args()
    if args.baud <= 0:
        parser.error("--baud must be positive")

    try:
        tables = parse_registers(args.registers)
    except ValueError as exc:
        parser.error(str(exc))

    # pymodbus logs through the "pymodbus.logging" logger. Without a handler,
    # Python's last-resort handler would print its warnings and errors (with
    # frame dumps) to stderr; keep them out unless asked for. Only stderr is
    # ever used, never stdout.
    if args.verbose:
        from pymodbus import pymodbus_apply_logging_config

        pymodbus_apply_logging_config(logging.DEBUG)
    else:
        logging.getLogger("pymodbus.logging").setLevel(logging.CRITICAL + 1)

    if args.rtu is not None:
        try:
            import serial  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            fail("--rtu needs pyserial (pip install pyserial) in this interpreter", 1)

    device = build_device(args.unit, tables)
    return asyncio.run(serve(args, device))


if __name__ == "__main__":
    sys.exit(main())
