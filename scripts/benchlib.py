"""Shared by scripts/bench_mount.py and scripts/bench_handoff.py (imported, not run)."""

import os
import re
import socket
import sys
import urllib.request

# One request in moto_server's log: method, path, HTTP status.
MOTO_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[0-9.]+" (\d+)')


def proc_cpu_s(pid):
    """CPU seconds (user + system) of a process so far; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cmd_freeport(_a):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_mkbucket(a):
    req = urllib.request.Request(f"{a.endpoint.rstrip('/')}/{a.name}", method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 200:
            sys.exit(f"creating bucket {a.name}: HTTP {r.status}")


def write_report(lines, path):
    """The report (Markdown lines) on stdout, and to path if one is given."""
    text = "\n".join(lines).rstrip() + "\n"
    sys.stdout.write(text)
    if path:
        with open(path, "w") as f:
            f.write(text)


def add_store_commands(sub):
    """The subcommands `freeport` and `mkbucket ENDPOINT NAME` (for moto_server)."""
    q = sub.add_parser("freeport")
    q.set_defaults(fn=cmd_freeport)
    q = sub.add_parser("mkbucket")
    q.add_argument("endpoint")
    q.add_argument("name")
    q.set_defaults(fn=cmd_mkbucket)
