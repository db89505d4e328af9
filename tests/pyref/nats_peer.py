#!/usr/bin/env python3
"""Peers for the NATS bridge tests.

    nats_peer.py send --port N --protocol tcp|udp --psk-hex HEX --device-id-hex ID
                      --count N [--tag T] [--host H]
        A reference-SDK (usmp==1.2.2) device: connects and sends messages b"T-<i>" for i in
        0..N, printing {"acked": i} once each send() returned (over UDP: once the gateway's
        UTACK arrived), then {"sent": N}. On an error: {"error": cls, "message": ...}, exit 1.

    nats_peer.py mqtt-sub --port N --topic usmp/up/# --count N [--timeout S]
        An MQTT client (paho-mqtt) reading through nats-server's MQTT listener: prints
        {"ready": true} once subscribed, then {"topic": t, "payload": hex} per message,
        and exits after --count messages or --timeout seconds.
"""

import argparse
import asyncio
import json
import sys
import threading
import time


def out(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def send(args) -> int:
    import usmp

    c = usmp.USMPClient(
        args.host,
        args.port,
        psk=bytes.fromhex(args.psk_hex),
        protocol=args.protocol,
        device_id=bytes.fromhex(args.device_id_hex),
    )
    try:
        await c.connect()
        for i in range(args.count):
            await c.send(f"{args.tag}-{i}".encode())
            out({"acked": i})
        out({"sent": args.count})
        await c.disconnect()
        return 0
    except Exception as e:  # noqa: BLE001 - the test reads the class name
        out({"error": type(e).__name__, "message": str(e)})
        return 1


def mqtt_sub(args) -> int:
    import paho.mqtt.client as mqtt

    got = []
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties=None):
        client.subscribe(args.topic, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties=None):
        out({"ready": True})

    def on_message(client, userdata, msg):
        got.append(msg)
        out({"topic": msg.topic, "payload": msg.payload.hex()})
        if len(got) >= args.count:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"usmp-test-{time.time_ns()}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    done.wait(args.timeout)
    client.loop_stop()
    client.disconnect()
    out({"received": len(got)})
    return 0 if len(got) >= args.count else 1


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--protocol", choices=("tcp", "udp"), default="tcp")
    s.add_argument("--psk-hex", required=True)
    s.add_argument("--device-id-hex", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--tag", default="m")
    m = sub.add_parser("mqtt-sub")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--topic", default="usmp/up/#")
    m.add_argument("--count", type=int, required=True)
    m.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    if args.cmd == "send":
        sys.exit(asyncio.run(send(args)))
    sys.exit(mqtt_sub(args))


if __name__ == "__main__":
    main()
