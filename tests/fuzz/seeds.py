#!/usr/bin/env python3
"""Write the reference package's seed inputs into tests/fuzz/corpus/<target>/ (ref-* files).

Run with a Python that has ``usmp==1.2.2`` (the test venv):

    target/pyref-venv/bin/python tests/fuzz/seeds.py

Every frame comes from the package itself: the known-answer generators of
``tests/pyref/gen_vectors.py`` (which drive the package's encode_frame / encrypt,
its real client_handshake / server_handshake, USMPSession.send / rekey, UDPStream
and the UDPListener cookie path with fixed randomness), wrapped in the input
formats of ``usmp::fuzzing`` (see src/fuzzing/*.rs). A name starting with ``ok-``
promises an outcome that tests/fuzz_replay.rs checks. Output is deterministic.
"""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "pyref"))

import gen_vectors as gv  # noqa: E402  (asserts the package version and its flows)
from usmp._frame import encode_frame  # noqa: E402
from usmp.types import PacketType  # noqa: E402

CORPUS = os.path.join(HERE, "corpus")
TARGETS = ("deframe", "handshake", "session", "udp_path")


def x(s):
    return bytes.fromhex(s)


def raw(data):
    """A raw-bytes op (op 0) of the handshake and session targets."""
    assert len(data) < 512
    return b"\x00" + struct.pack("<H", len(data)) + data


def udp_raw(data, slot=0):
    """A raw datagram op (op 0) of the udp_path target, from device slot `slot`."""
    assert len(data) < 600
    return b"\x00" + bytes([slot]) + struct.pack("<H", len(data)) + data


def session_head(mode, sid, c2s, s2c, tx_seq=0, rx_seq=0):
    """Session target header with keys from the input (mode bit 2)."""
    return bytes([mode | 4]) + sid + c2s + s2c + struct.pack("<II", tx_seq, rx_seq)


def main():
    doc = {
        "frames": gv.gen_frames(),
        "decode_errors": gv.gen_decode_errors(),
        "records": gv.gen_records(),
        "handshake": gv.gen_handshake(),
        "rekey_flow": gv.gen_rekey_flow(),
        "fragments": gv.gen_fragments(),
        "utack": gv.gen_utack(),
        "udp_cookie": gv.gen_udp_cookie(),
    }
    seeds = {t: {} for t in TARGETS}

    # ── deframe: streams of reference frames, split in various ways ──────────────
    by_type = {}
    for f in doc["frames"]:
        by_type.setdefault(f["type"], []).append(x(f["encoded"]))
    for i, (t, frames) in enumerate(sorted(by_type.items())):
        mode, chunks = i % 8, bytes([(i * 37) % 256, 11])[: i % 3]
        seeds["deframe"][f"ok-ref-frames-type{t:02x}"] = bytes([mode, len(chunks)]) + chunks + b"".join(frames)
    records = [x(r["frame"]) for r in doc["records"]]
    for i in range(0, len(records), 12):
        seeds["deframe"][f"ok-ref-records-{i // 12}"] = bytes([i % 8, 1, 30]) + b"".join(records[i : i + 12])
    for f in doc["fragments"]:
        if "frames" in f:
            n = len(x(f["message"]))
            name = f"ok-ref-fragments-{n}-{f['start_seq']}"
            seeds["deframe"][name] = bytes([1, 1, 199]) + b"".join(x(fr) for fr in f["frames"])
    for c in doc["decode_errors"]:
        seeds["deframe"][f"ref-decode-{c['name']}"] = bytes([0, 0]) + x(c["input"])
    ck = doc["udp_cookie"]
    seeds["deframe"]["ok-ref-cookie-flight"] = bytes([2, 0]) + x(ck["hello"]) + x(ck["hello_retry"])

    # ── handshake: the reference transcripts, with the reference server's randomness ──
    for i, v in enumerate(doc["handshake"]):
        head = x(v["server_priv"]) + x(v["nonce"]) + x(v["session_id"])
        hello, hello_ck = x(v["hello"]), x(v["hello_cookie"]["frame"])
        ack = x(v["hello_ack"])
        hs = seeds["handshake"]
        hs[f"ok-ref-transcript{i}"] = head + raw(hello) + raw(ack) + b"\x06\x40\x00"
        hs[f"ok-ref-transcript{i}-cookie"] = head + raw(hello_ck) + raw(ack)
        hs[f"ref-transcript{i}-hello-twice"] = head + raw(hello) + raw(hello) + raw(ack)
        hs[f"ref-transcript{i}-server-frames"] = head + raw(x(v["challenge"])) + raw(x(v["session_ok"]))
        hs[f"ref-transcript{i}-ack-first"] = head + raw(ack) + raw(hello) + raw(x(v["hello_retry"])) + raw(ack)

    # ── session: reference frames opened by our session (keys from the input) ──────
    ss = seeds["session"]
    for f in doc["fragments"]:
        if "frames" not in f:
            continue
        n, start = len(x(f["message"])), f["start_seq"]
        frames = b"".join(raw(x(fr)) for fr in f["frames"])
        key, sid = x(f["key"]), x(f["session_id"])
        for mode, tag in ((0, "tcp"), (1, "udp")):
            ss[f"ok-ref-fragments-{n}-{start}-{tag}"] = session_head(mode, sid, key, bytes(32), 0, start) + frames
        if n == 1808:
            # The same frames received by a client session (s2c direction).
            ss[f"ok-ref-fragments-{n}-{start}-client"] = session_head(2, sid, bytes(32), key, 0, start) + frames
    rk = doc["rekey_flow"]
    frames = b"".join(raw(x(fr)) for fr in rk["frames"])
    for mode, tag in ((0, "tcp"), (1, "udp")):
        head = session_head(mode, x(rk["session_id"]), x(rk["tx_key"]), x(rk["rx_key"]), 0, rk["start_seq"])
        ss[f"ok-ref-rekey-flow-{tag}"] = head + frames + b"\x05\x05\x00"
    by_type = {}
    for r in doc["records"]:
        by_type.setdefault((r["key"], r["session_id"], r["type"]), []).append(x(r["frame"]))
    for i, ((key, sid, t), frames) in enumerate(sorted(by_type.items())):
        ok = "ok-" if t == 5 else ""
        body = b"".join(raw(fr) for fr in frames[:12])
        ss[f"{ok}ref-records-{i}-type{t:02x}-udp"] = session_head(1, x(sid), x(key), bytes(32)) + body

    # ── udp_path: reference datagrams from device slots ─────────────────────────
    us = seeds["udp_path"]
    us["ref-cookie-hello"] = b"\x00\x00" + udp_raw(x(ck["hello"])) + udp_raw(x(ck["hello"]), 1) + b"\x07\x00\x10\x27"
    for i, v in enumerate(doc["handshake"]):
        flight = [x(v["hello"]), x(v["hello_cookie"]["frame"]), x(v["hello_ack"])]
        us[f"ref-transcript{i}"] = b"\x00\x00" + b"".join(udp_raw(d, i) for d in flight)
    us["ref-utacks"] = b"\x00\x00" + b"".join(udp_raw(x(u["utack"]), 2) for u in doc["utack"])
    data = [x(r["frame"]) for r in doc["records"] if r["type"] == 5][:10]
    us["ref-records"] = b"\x00\x00" + b"".join(udp_raw(d, 3) for d in data)
    hello = encode_frame(PacketType.HELLO, bytes(6) + bytes(range(32)), 0)
    us["ref-zero-device"] = b"\x00\x00" + udp_raw(hello) + b"\x02\x00" + udp_raw(hello + b"\x00")

    total = 0
    for t in TARGETS:
        d = os.path.join(CORPUS, t)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):
            if "ref-" in name:
                os.remove(os.path.join(d, name))
        for name, data in sorted(seeds[t].items()):
            with open(os.path.join(d, name + ".bin"), "wb") as fh:
                fh.write(data)
            total += len(data)
        print(f"{t}: {len(seeds[t])} reference seeds")
    print(f"{total} bytes")


if __name__ == "__main__":
    main()
