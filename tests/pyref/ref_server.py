#!/usr/bin/env python3
"""Reference-SDK (usmp==1.2.2) USMP server for interop tests.

    ref_server.py --host 127.0.0.1 --port 0 --protocol tcp|udp \
        (--psk-hex HEX | --registry-json '{"001122334455": "hexkey", "": "hexkey"}') \
        [--mode echo|rekey-echo|bye-after-echo|push-bye] [--max-connections N] [--max-per-ip N] \
        [--session-timeout S] [--handshake-timeout S] [--disable-lockout] [--no-udp-rekey-fix]

Prints exactly one line ``READY <port>`` on stdout once the listener is bound (with
``--port 0`` the real, kernel-chosen port is printed), then nothing else on stdout.
Diagnostics (``recv <len>`` per received message, session start/end, SDK logs) go to
stderr.  SIGTERM / SIGINT stop the server cleanly (exit code 0).

Modes: echo (send every received message back), rekey-echo (like echo, but on
b"REKEY-NOW" call session.rekey() and reply b"REKEYED"), bye-after-echo (echo one
message, then session.bye()), push-bye (no reading: send b"push-0", b"push-1",
b"push-2", then session.bye()).  Any session error just ends that session.

Registry JSON: device_id hex (12 hex digits) -> PSK hex.  The device_id key ""
is the reference's wildcard entry b"" (used for any unregistered device).

``--no-udp-rekey-fix``: by default this server patches a defect of the reference
UDP transport (its transport-level replay baseline ``_last_rx_seq`` is not reset on
REKEY, so after a rekey following 65+ received frames every new frame is ACKed and
then silently dropped).  Pass the flag to run the reference unpatched.
"""

import signal
import sys

# Exit cleanly on SIGTERM even if it arrives while the interpreter is still
# importing (the asyncio handlers installed later replace this one).
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

import argparse  # noqa: E402
import asyncio
import json
import logging  # noqa: E402

import usmp
from usmp import USMPServer
from usmp import _handshake
from usmp.transport.udp import UDPStream


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def install_udp_rekey_fix() -> None:
    """Reset the UDP transport's replay baseline whenever keys change (REKEY) and when
    a REKEY datagram passes through (so frames racing the session's REKEY processing
    are not dropped)."""
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--psk-hex")
    g.add_argument("--registry-json")
    p.add_argument("--mode", choices=("echo", "rekey-echo", "bye-after-echo", "push-bye"), default="echo")
    p.add_argument("--max-connections", type=int, default=100000)
    p.add_argument("--max-per-ip", type=int, default=100000)
    p.add_argument("--session-timeout", type=float, default=60.0)
    p.add_argument("--handshake-timeout", type=float, default=10.0)
    p.add_argument(
        "--disable-lockout",
        action="store_true",
        help="never record failed handshakes (the reference locks an IP out after 5 failures)",
    )
    p.add_argument("--no-udp-rekey-fix", action="store_true")
    p.add_argument(
        "--no-cookie-rate-limit",
        action="store_true",
        help="UDP: lift the reference's per-IP cookie token bucket (10 burst, 5/s)",
    )
    p.add_argument("--log-level", default="WARNING", help="level for the SDK's own logging (stderr)")
    return p.parse_args(argv)


def build_psk(args):
    if args.psk_hex is not None:
        return bytes.fromhex(args.psk_hex)
    reg = json.loads(args.registry_json)
    if not isinstance(reg, dict):
        raise SystemExit("--registry-json must be a JSON object")
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in reg.items()}


def make_handler(mode: str):
    async def handler(session) -> None:
        log(f"session start device={session.device_id} session={session.session_id}")
        ended = "returned"
        try:
            if mode == "push-bye":
                # Server-initiated downlink: three messages, then BYE (for `hold`).
                for i in range(3):
                    await session.send(f"push-{i}".encode())
                await session.bye()
                log("sent bye")
                ended = "bye"
                return
            while True:
                data = await session.recv()
                log(f"recv {len(data)}")
                if mode == "rekey-echo" and data == b"REKEY-NOW":
                    await session.rekey()
                    log("rekeyed")
                    await session.send(b"REKEYED")
                    continue
                await session.send(data)
                if mode == "bye-after-echo":
                    await session.bye()
                    log("sent bye")
                    ended = "bye"
                    return
        except asyncio.CancelledError:
            ended = "cancelled"
            raise
        except BaseException as e:  # noqa: BLE001 - any error just ends the session
            ended = type(e).__name__
            return
        finally:
            log(f"session end session={session.session_id} by={ended}")

    return handler


def bound_port(server: USMPServer, protocol: str):
    lst = server._listener
    if lst is None:
        return None
    if protocol == "tcp":
        srv = getattr(lst, "_srv", None)
        if srv is None or not srv.sockets:
            return None
        return srv.sockets[0].getsockname()[1]
    tr = getattr(lst, "_transport", None)
    if tr is None:
        return None
    sockname = tr.get_extra_info("sockname")
    return sockname[1] if sockname else None


async def amain(args) -> int:
    if not args.no_udp_rekey_fix:
        install_udp_rekey_fix()
    if args.disable_lockout:
        _handshake.record_failed_handshake = lambda _key: None

    server = USMPServer(
        host=args.host,
        port=args.port,
        psk=build_psk(args),
        handshake_timeout=args.handshake_timeout,
        session_timeout=args.session_timeout,
        protocol=args.protocol,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_per_ip,
    )
    server.on_session(make_handler(args.mode))
    if args.no_cookie_rate_limit:
        server._allow_udp_cookie = lambda _ip: True

    # A stop request that arrives before serve() has installed its own signal
    # handlers (or after it removed them) is handled here.
    loop = asyncio.get_running_loop()
    stop_early = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_early.set)

    serve_task = asyncio.create_task(server.serve())
    # serve() installs its SIGTERM/SIGINT handlers synchronously right after the
    # listener is bound and only then creates _shutdown_event, so once the event
    # exists both the socket and the signal handlers are in place.
    port = None
    while not serve_task.done() and not stop_early.is_set():
        if server._shutdown_event is not None:
            port = bound_port(server, args.protocol)
            if port is not None:
                break
        await asyncio.sleep(0.01)
    if serve_task.done():
        exc = serve_task.exception()
        log(f"server failed to start: {exc!r}")
        return 1
    if stop_early.is_set():
        server.stop()
        await serve_task
        return 0

    print(f"READY {port}", flush=True)
    log(f"listening {args.protocol} {args.host}:{port} mode={args.mode} usmp={usmp.__version__}")

    await serve_task  # returns after SIGTERM/SIGINT (handled by serve())
    log("stopped")
    return 0


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        rc = asyncio.run(amain(args))
    except KeyboardInterrupt:
        rc = 0
    sys.exit(rc)


if __name__ == "__main__":
    main()
