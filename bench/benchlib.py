"""Helpers shared by the bench scripts (imported from the scripts' own directory)."""
import os
import socket
import urllib.request

PAGE = os.sysconf("SC_PAGE_SIZE")


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
