"""Helpers shared by the bench scripts (imported from the scripts' own directory)."""
import os
import re
import socket
import subprocess
import urllib.request

PAGE = os.sysconf("SC_PAGE_SIZE")
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    """A port number free for both TCP and UDP (the gateway binds both)."""
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
            u.close()


def metrics(mport):
    """The gateway's Prometheus metrics as {series: value}; {} when unreachable."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    m = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    return m


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid):
    """CPU time of every thread of the process, in seconds, with nanosecond resolution
    (/proc/PID/task/*/schedstat; /proc/PID/stat's utime+stime only counts 10 ms ticks).
    Threads that already exited are covered by the process's stat totals."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    dead = (int(fields[13]) + int(fields[14])) / CLK  # cutime+cstime: reaped children
    return total / 1e9 + dead


def handshake_floor_ns(root):
    """The criterion estimate of the bare X25519+HKDF+HMAC+AES-key floor, this run."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "proto", "--", "--noplot", "handshake_server/bare_ring_floor"],
        cwd=root, capture_output=True, text=True, check=True).stdout
    m = re.search(r"bare_ring_floor\s+time:\s+\[[^\]]*?([\d.]+) (ns|µs|us|ms) ([\d.]+) (ns|µs|us|ms)", out)
    if not m:
        raise RuntimeError("cannot parse criterion output:\n" + out)
    scale = {"ns": 1, "µs": 1e3, "us": 1e3, "ms": 1e6}[m.group(4)]
    return float(m.group(3)) * scale
