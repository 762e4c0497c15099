"""Run pipeline work in this process and print, as JSON, the TCP sockets it listens on after each piece of work.

    python listeners.py OUT_DIR        -> {"validate": [...], "generate": [...], "train": [...]}

Each entry is [address, port] of a LISTEN socket owned by this process (matched through /proc/self/fd to
/proc/net/tcp and tcp6). Sockets are listed after the work because the ones that matter outlive it.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

LISTEN = "0A"


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # /proc prints each 32-bit word little-endian
    return str(ipaddress.IPv6Address(words))


def listening_sockets() -> list[list]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                host, port = fields[1].split(":")
                found.append([_address(host), int(port, 16)])
    return found


def main(out: Path) -> None:
    from faults_lib import make_tokenizer, sample, write_json

    report = {}
    tokenizer = make_tokenizer(out / "tokenizer.model")
    data = write_json(out / "data.json", [sample("a", None), sample("b", None)])
    from pipeline.validate import main as validate

    validate(["--data", str(data), "--tokenizer", str(tokenizer.model_file), "--workers", "2"])
    report["validate"] = listening_sockets()

    from data_gen.driver import generate
    from datagen_fixtures import photo_records, write_jsonl

    generate(write_jsonl(out / "captions.jsonl", photo_records(2)), out / "gen.json", backend="offline",
             types=["conversation"], progress=False)
    report["generate"] = listening_sockets()

    import fault_task

    fault_task.train(out / "train", max_steps=1)
    report["train"] = listening_sockets()
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
