"""A second client process for the integration tests: puts or reads blocks listed in a manifest.

    python -m tests.integration.peer put ADDRESS shm|tcp DIR
    python -m tests.integration.peer get ADDRESS shm|tcp DIR OUT

DIR/manifest.json is {"ns": name, "blocks": [[hash_hex, parent_hex | null, file, nbytes], ...]}.
`put` stores the files as one chain; `get` looks them up, reads them with get() into
OUT/get-<i>.bin and with get_into() into numpy arrays saved as OUT/into-<i>.bin. Both print a
JSON summary on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from kvstore.client import Client
from kvstore.keys import Namespace


def _manifest(directory: Path) -> tuple[Namespace, list[tuple[bytes, bytes | None, Path, int]]]:
    doc = json.loads((directory / "manifest.json").read_text())
    rows = [(bytes.fromhex(h), None if p is None else bytes.fromhex(p), directory / f, n)
            for h, p, f, n in doc["blocks"]]
    return Namespace(doc["ns"].encode()), rows


def put(client: Client, directory: Path) -> dict[str, object]:
    ns, rows = _manifest(directory)
    result = client.put(ns, [(h, p, f.read_bytes()) for h, p, f, _ in rows])
    return {"num_stored": result.num_stored, "num_present": result.num_present,
            "num_full": result.num_full, "is_local": client.is_local}


def get(client: Client, directory: Path, out: Path) -> dict[str, object]:
    ns, rows = _manifest(directory)
    hashes = [h for h, _, _, _ in rows]
    num_hits = client.lookup(ns, hashes).num_hits
    for i, data in enumerate(client.get(ns, hashes)):
        (out / f"get-{i}.bin").write_bytes(data)
    # float16 matrices a little larger than each block, as a connector's KV tensors would be.
    dests = [np.full((n // 256 + 1, 128), np.nan, dtype=np.float16) for _, _, _, n in rows]
    num_into = client.get_into(ns, hashes, dests)
    for i, (dest, (_, _, _, n)) in enumerate(zip(dests[:num_into], rows)):
        (out / f"into-{i}.bin").write_bytes(dest.tobytes()[:n])
    return {"num_hits": num_hits, "num_into": num_into, "is_local": client.is_local}


def main(argv: list[str]) -> int:
    command, address, mode, directory = argv[:4]
    with Client(address, timeout_s=10.0, use_shm=(mode == "shm")) as client:
        if command == "put":
            summary = put(client, Path(directory))
        else:
            summary = get(client, Path(directory), Path(argv[4]))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
