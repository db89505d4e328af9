#!/usr/bin/env python3
"""Reference-SDK (usmp==1.2.2) client driver for interop tests.

    ref_client.py --host 127.0.0.1 --port N --protocol tcp|udp --psk-hex HEX \
        [--device-id-hex 001122334455] --script NAME [--timeout 30] [--seconds N]

Each script prints JSON lines on stdout (one final result line; `hold` also prints
progress lines).  Exit codes: 0 success; 1 failure, printed as
{"error": <exception class name>, "message": ...}; 2 overall --timeout exceeded,
printed as {"error": "ScriptTimeout", ...}.

Scripts
  echo-sizes  echo 0,1,452,453,1808-byte messages, check a 1809-byte send raises
              PayloadError, PING, then one more echo to prove the session survived.
  rekey       75 echoes of 16 bytes, client-initiated rekey, 10 echoes, send
              b"REKEY-NOW" and accept either b"REKEYED" (ref_server --mode rekey-echo
              rekeys then replies) or the plain echo (a gateway in echo mode), 10 more.
  wait-bye    one echo, then recv() until the session ends; reports the exception.
  ping-only   PING every 1 s for --seconds without recv(), then send + recv an echo.
  wrong-psk   connect and report the exception class raised by connect().
  hold        connect, print {"connected": true, ...}, then one {"recv": hex} line
              per received message until the session ends, then {"ended_by": cls}.

UDP note: by default the reference UDP transport is patched so its transport-level
replay baseline is reset on REKEY (the unpatched 1.2.2 ACKs and then silently drops
every frame after a rekey once 65+ frames were received).  --no-udp-rekey-fix
disables the patch.
"""

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

import usmp
from usmp import USMPClient
from usmp import _session as session_mod
from usmp.errors import PayloadError
from usmp.transport.udp import UDPStream


class EchoMismatch(Exception):
    pass


class UnexpectedSuccess(Exception):
    pass


def out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def install_udp_rekey_fix() -> None:
    if getattr(UDPStream, "_pyref_rekey_fix", False):
        return
    orig_set = UDPStream.set_session_keys
    orig_feed = UDPStream.feed_packet

    def set_session_keys(self, tx_key, rx_key):
        orig_set(self, tx_key, rx_key)
        self._last_rx_seq = -1

    def feed_packet(self, data):
        orig_feed(self, data)
        if len(data) >= 12 and data[:2] == b"\xcd\xab" and data[3] == 0x0B:
            self._last_rx_seq = -1

    UDPStream.set_session_keys = set_session_keys
    UDPStream.feed_packet = feed_packet
    UDPStream._pyref_rekey_fix = True


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


class Driver:
    def __init__(self, args):
        self.args = args
        self.psk = bytes.fromhex(args.psk_hex)
        self.device_id = bytes.fromhex(args.device_id_hex) if args.device_id_hex else os.urandom(6)
        self.client = USMPClient(
            host=args.host,
            port=args.port,
            psk=self.psk,
            device_id=self.device_id,
            protocol=args.protocol,
        )
        self.frame_types: dict[int, int] = {}

    async def connect(self) -> None:
        await self.client.connect(timeout=self.args.connect_timeout)
        # Tally the types of incoming frames (e.g. PONGs) for reporting.
        tr = self.client._transport
        orig = tr.read_frame

        async def read_frame(verify_crc: bool = True):
            fr = await orig(verify_crc=verify_crc)
            self.frame_types[int(fr.type)] = self.frame_types.get(int(fr.type), 0) + 1
            return fr

        tr.read_frame = read_frame

    @property
    def session(self):
        return self.client._session

    async def recv(self, timeout: float | None = None) -> bytes:
        t = self.args.recv_timeout if timeout is None else timeout
        return await self.session.recv(timeout=t)

    async def echo(self, data: bytes) -> None:
        await self.client.send(data)
        got = await self.recv()
        if got != data:
            raise EchoMismatch(f"sent {len(data)} bytes, got {len(got)} bytes back ({got[:32].hex()}...)")

    def close_quietly(self) -> None:
        """Drop the connection without a BYE (no ARQ wait on UDP)."""
        tr = self.client._transport
        if tr is not None:
            with contextlib.suppress(Exception):
                tr.close()
        self.client._session = None
        self.client._transport = None

    async def disconnect(self) -> None:
        """Polite disconnect (BYE).  Bounded, since UDP's ARQ can retry for ~15 s."""
        try:
            await asyncio.wait_for(self.client.disconnect(), timeout=5.0)
        except BaseException:  # noqa: BLE001
            self.close_quietly()

    # ── scripts ────────────────────────────────────────────────────────────

    async def script_echo_sizes(self):
        await self.connect()
        sid = self.client.session_id
        sizes = [0, 1, 452, 453, 1808]
        for n in sizes:
            await self.echo(pattern(n))
        oversize_error = None
        try:
            await self.client.send(bytes(1809))
        except PayloadError as e:
            oversize_error = type(e).__name__
        if oversize_error is None:
            raise UnexpectedSuccess("1809-byte send was not refused")
        await self.client.ping()
        await self.echo(b"after-ping")
        await self.disconnect()
        return {
            "ok": True,
            "session_id": sid,
            "sizes": sizes,
            "oversize_error": oversize_error,
            "ping_ok": True,
            "pongs_received": self.frame_types.get(0x07, 0),
        }

    async def script_rekey(self):
        await self.connect()
        sid = self.client.session_id

        async def burst(tag: int, count: int) -> int:
            for i in range(count):
                await self.echo(bytes([tag]) + i.to_bytes(4, "little") + bytes(11))
            return count

        before = await burst(1, self.args.before_rekey)
        await self.session.rekey()
        after_client = await burst(2, 10)
        await self.client.send(b"REKEY-NOW")
        reply = await self.recv()
        if reply == b"REKEYED":
            server_reply = "REKEYED"
        elif reply == b"REKEY-NOW":
            server_reply = "echo"
        else:
            raise EchoMismatch(f"unexpected reply to REKEY-NOW: {reply[:64].hex()}")
        after_server = await burst(3, 10)
        await self.disconnect()
        return {
            "ok": True,
            "session_id": sid,
            "before_rekey": before,
            "after_client_rekey": after_client,
            "server_rekey_reply": server_reply,
            "rekey_frames_received": self.frame_types.get(0x0B, 0),
            "after_server_rekey": after_server,
            "udp_rekey_fix": not self.args.no_udp_rekey_fix,
        }

    async def script_wait_bye(self):
        await self.connect()
        sid = self.client.session_id
        await self.echo(b"bye-me")
        t0 = time.monotonic()
        extra = 0
        ended_by = None
        message = ""
        try:
            while True:
                await self.session.recv()
                extra += 1
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, asyncio.CancelledError):
                raise
            ended_by = type(e).__name__
            message = str(e)
        elapsed = time.monotonic() - t0
        self.close_quietly()
        return {
            "session_id": sid,
            "ended_by": ended_by,
            "message": message,
            "elapsed_s": round(elapsed, 3),
            "extra_messages": extra,
            "bye_frames_received": self.frame_types.get(0x08, 0),
        }

    async def script_ping_only(self):
        await self.connect()
        sid = self.client.session_id
        seconds = self.args.seconds
        t0 = time.monotonic()
        pings = 0
        ping_error = None
        while time.monotonic() - t0 < seconds:
            try:
                await self.client.ping()
                pings += 1
            except Exception as e:  # noqa: BLE001
                ping_error = type(e).__name__
                break
            await asyncio.sleep(1.0)
        send_error = None
        recv_error = None
        echo_ok = False
        try:
            await self.client.send(b"still-there")
        except Exception as e:  # noqa: BLE001
            send_error = type(e).__name__
        if send_error is None:
            try:
                # The reference's recv() ends the session when it processes more than
                # 8 PING/PONG frames within one second, which the PONGs buffered while
                # we did not read would trigger: let time run fast inside this recv so
                # the flood guard window resets for each PONG (unless told otherwise).
                with fast_monotonic(not self.args.keep_flood_guard):
                    got = await self.recv()
                echo_ok = got == b"still-there"
                if not echo_ok:
                    recv_error = "EchoMismatch"
            except Exception as e:  # noqa: BLE001
                recv_error = type(e).__name__
        usable = send_error is None and recv_error is None and echo_ok and ping_error is None
        if usable:
            await self.disconnect()
        else:
            self.close_quietly()
        return {
            "ok": usable,
            "session_id": sid,
            "pings": pings,
            "ping_error": ping_error,
            "send_error": send_error,
            "recv_error": recv_error,
            "echo_ok": echo_ok,
            "pongs_received": self.frame_types.get(0x07, 0),
        }

    async def script_wrong_psk(self):
        try:
            await self.connect()
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, asyncio.CancelledError):
                raise
            return {"error_kind": type(e).__name__, "message": str(e)}
        sid = self.client.session_id
        self.close_quietly()
        raise UnexpectedSuccess(f"connect succeeded (session {sid})")

    async def script_hold(self):
        await self.connect()
        out({"connected": True, "session_id": self.client.session_id, "device_id": self.device_id.hex()})
        n = 0
        try:
            while True:
                data = await self.session.recv()
                n += 1
                out({"recv": data.hex()})
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, asyncio.CancelledError):
                raise
            ended_by = type(e).__name__
            message = str(e)
        self.close_quietly()
        return {"ended_by": ended_by, "message": message, "received": n}


@contextlib.contextmanager
def fast_monotonic(enabled: bool):
    if not enabled:
        yield
        return
    real = session_mod.time
    state = {"t": real.monotonic()}

    def mono() -> float:
        state["t"] += 1.5
        return state["t"]

    class _T:
        monotonic = staticmethod(mono)

        def __getattr__(self, name):
            return getattr(real, name)

    session_mod.time = _T()
    try:
        yield
    finally:
        session_mod.time = real


SCRIPTS = {
    "echo-sizes": Driver.script_echo_sizes,
    "rekey": Driver.script_rekey,
    "wait-bye": Driver.script_wait_bye,
    "ping-only": Driver.script_ping_only,
    "wrong-psk": Driver.script_wrong_psk,
    "hold": Driver.script_hold,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--psk-hex", required=True)
    p.add_argument("--device-id-hex", default=None, help="12 hex digits; random if omitted")
    p.add_argument("--script", choices=sorted(SCRIPTS), required=True)
    p.add_argument("--timeout", type=float, default=30.0, help="overall bound for the script")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="handshake timeout passed to connect()")
    p.add_argument("--recv-timeout", type=float, default=10.0, help="per-reply timeout in echo checks")
    p.add_argument("--seconds", type=float, default=5.0, help="duration for ping-only")
    p.add_argument("--keep-flood-guard", action="store_true",
                   help="ping-only: do not neutralise the reference's own PONG flood guard on the final recv")
    p.add_argument("--no-udp-rekey-fix", action="store_true",
                   help="run the reference's UDP transport as published (it keeps its replay baseline across REKEY)")
    p.add_argument("--before-rekey", type=int, default=75, help="rekey: echoes before the client's REKEY")
    args = p.parse_args(argv)
    if args.device_id_hex is not None and len(bytes.fromhex(args.device_id_hex)) != 6:
        p.error("--device-id-hex must be 12 hex digits")
    return args


async def amain(args) -> int:
    if not args.no_udp_rekey_fix:
        install_udp_rekey_fix()
    driver = Driver(args)
    task = asyncio.create_task(SCRIPTS[args.script](driver))
    done, _ = await asyncio.wait({task}, timeout=args.timeout)
    if not done:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        driver.close_quietly()
        out({"error": "ScriptTimeout", "message": f"script {args.script} exceeded {args.timeout}s"})
        return 2
    exc = task.exception()
    if exc is not None:
        driver.close_quietly()
        out({"error": type(exc).__name__, "message": str(exc)})
        return 1
    out(task.result())
    return 0


def main() -> None:
    args = parse_args()
    log(f"ref_client usmp={usmp.__version__} script={args.script} {args.protocol}://{args.host}:{args.port}")
    rc = asyncio.run(amain(args))
    sys.stdout.flush()
    sys.exit(rc)


if __name__ == "__main__":
    main()
