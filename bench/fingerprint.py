"""Startup cost of the weights fingerprint (connectors/vllm_v1/fingerprint.py) on a 16 GiB
safetensors checkpoint: cold (page cache dropped, no cached fingerprint) and warm (a restart: the
fingerprint cache answers). Goals (issue 9): under 2 s cold, under 50 ms warm.

    python -m bench.fingerprint [--quick] [--size-gib 16] [--dir /var/tmp]

The checkpoint is written for real (no sparse files): Llama-7B-like tensors (32 layers of 9
tensors, embeddings, head) scaled to --size-gib, in shards of at most 4 GiB like Hugging Face's.
Before each cold run the checkpoint's pages leave the page cache: each file is fsynced and dropped
with posix_fadvise(DONTNEED), or with --drop-caches the whole cache (/proc/sys/vm/drop_caches, root). The files are deleted afterwards. --quick uses 256 MiB.
Writes bench/results/fingerprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from connectors.vllm_v1.fingerprint import BYTES_PER_SAMPLE, SAMPLE_BYTES, fingerprint

RESULTS = Path(__file__).parent / "results"
GOAL_COLD_S = 2.0  # issue 9: a replica's startup must not wait on reading its weights twice
GOAL_WARM_S = 0.050  # issue 9: a restart on the same host costs next to nothing
SHARD_BYTES = 4 * 2**30  # Hugging Face's default max_shard_size for large checkpoints
WRITE_CHUNK_BYTES = 64 * 2**20  # one random buffer written over and over: real, non-zero bytes
ROUNDS = 3  # cold runs (each after a page-cache drop) and warm runs are medians of this many
LAYERS = 32
# Llama-7B's per-layer tensors as multiples of hidden x hidden (q, k, v, o; gate, up, down).
LAYER_TENSORS = {"self_attn.q_proj": 1.0, "self_attn.k_proj": 1.0, "self_attn.v_proj": 1.0,
                 "self_attn.o_proj": 1.0, "mlp.gate_proj": 2.6875, "mlp.up_proj": 2.6875,
                 "mlp.down_proj": 2.6875}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fingerprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 256 MiB checkpoint (seconds)")
    parser.add_argument("--size-gib", type=float, default=16.0)
    parser.add_argument("--dir", default=None, help="where to write it (default: $TMPDIR)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the whole page cache (root) instead of the checkpoint's pages")
    args = parser.parse_args(argv)
    size = int((0.25 if args.quick else args.size_gib) * 2**30)
    command = " ".join(["python", "-m", "bench.fingerprint", *(argv if argv is not None else sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="kvstore-fingerprint-", dir=args.dir))
    try:
        free = shutil.disk_usage(work).free
        if free < size + 2**30:
            raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, need {size / 2**30 + 1:.1f}")
        start = time.monotonic()
        model = write_checkpoint(work / "model", size)
        write_s = time.monotonic() - start
        result = measure(model, work / "cache", args.drop_caches)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 16 GiB must not outlive the run
    from bench.machine import describe

    result.update(
        parameters={"size_bytes": size, "shard_bytes": SHARD_BYTES, "layers": LAYERS,
                    "sample_bytes": SAMPLE_BYTES, "bytes_per_sample": BYTES_PER_SAMPLE,
                    "rounds": ROUNDS, "write_s": round(write_s, 1), "dir": str(work.parent)},
        machine=describe(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=command)
    name = "fingerprint-quick.json" if args.quick else "fingerprint.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {RESULTS / name}")
    return 0


def measure(model: Path, cache: Path, system_wide: bool) -> dict[str, Any]:
    """Cold, page-cache-hot and warm fingerprint times of the checkpoint at model."""
    files = sorted(model.glob("*.safetensors"))
    cold, hot, warm = [], [], []
    drop = "none"
    for _ in range(ROUNDS):
        shutil.rmtree(cache, ignore_errors=True)
        drop = drop_page_cache(files, system_wide)
        cold.append(timed(model, cache))
        shutil.rmtree(cache, ignore_errors=True)
        hot.append(timed(model, cache))  # sampled pages still cached: the CPU cost alone
        warm.append(timed(model, cache))
    found = fingerprint(model, cache)
    assert found is not None and found.num_files_read == 0, "the warm path read a file"
    cold_s, warm_s = statistics.median(t for t, _ in cold), statistics.median(t for t, _ in warm)
    return {
        "checkpoint": {"files": len(files), "bytes": found.num_bytes,
                       "tensors": LAYERS * (len(LAYER_TENSORS) + 2) + 3},
        "page_cache_drop": drop,
        "cold_s": {"median": cold_s, "all": [t for t, _ in cold]},
        "cold_bytes_read": cold[0][1],
        "page_cache_hot_s": {"median": statistics.median(t for t, _ in hot)},
        "warm_s": {"median": warm_s, "all": [t for t, _ in warm]},
        "goals": {"cold_s": GOAL_COLD_S, "warm_s": GOAL_WARM_S},
        "ratio_to_goal": {"cold": cold_s / GOAL_COLD_S, "warm": warm_s / GOAL_WARM_S},
        "met": cold_s < GOAL_COLD_S and warm_s < GOAL_WARM_S,
    }


def timed(model: Path, cache: Path) -> tuple[float, int]:
    start = time.perf_counter()
    found = fingerprint(model, cache)
    elapsed = time.perf_counter() - start
    assert found is not None
    return elapsed, found.num_bytes_read


def drop_page_cache(files: list[Path], system_wide: bool) -> str:
    """Evict the checkpoint from the page cache: how it was done."""
    os.sync()
    if system_wide:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED) per file" + (" (drop_caches refused)" if system_wide else "")


def layout(size: int) -> list[tuple[str, int]]:
    """(name, bytes) of Llama-7B-like bf16 tensors summing to about size."""
    units = LAYERS * sum(LAYER_TENSORS.values()) + 2 * 8.0  # embed + head: 8 x hidden^2 each
    unit = max(4096, int(size / units) // 4096 * 4096)
    tensors = [("model.embed_tokens.weight", 8 * unit)]
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors += [(prefix + name + ".weight", int(k * unit) // 2 * 2)
                    for name, k in LAYER_TENSORS.items()]
        tensors += [(prefix + "input_layernorm.weight", 8192),
                    (prefix + "post_attention_layernorm.weight", 8192)]
    return tensors + [("model.norm.weight", 8192), ("lm_head.weight", 8 * unit)]


def write_checkpoint(directory: Path, size: int) -> Path:
    """Safetensors shards of at most SHARD_BYTES holding layout(size), random bytes."""
    directory.mkdir(parents=True)
    shards: list[list[tuple[str, int]]] = [[]]
    for name, nbytes in layout(size):
        if shards[-1] and sum(n for _, n in shards[-1]) + nbytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append((name, nbytes))
    buffer = os.urandom(WRITE_CHUNK_BYTES)
    for i, tensors in enumerate(shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, nbytes in tensors:
            header[name] = {"dtype": "BF16", "shape": [nbytes // 2],
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            left = offset
            while left:
                n = min(left, WRITE_CHUNK_BYTES)
                f.write(buffer[:n])
                left -= n
    return directory


def render(result: dict[str, Any]) -> str:
    """The section of bench/README.md (bench/report.py)."""
    return table(result)


def table(result: dict[str, Any]) -> str:
    ckpt = result["checkpoint"]
    rows = [
        f"checkpoint: {ckpt['bytes'] / 2**30:.2f} GiB in {ckpt['files']} files, "
        f"{ckpt['tensors']} tensors; page cache: {result['page_cache_drop']}; cold runs read "
        f"{result['cold_bytes_read'] / 2**20:.1f} MiB.",
        "",
        "| measurement | median | goal | ratio to goal |",
        "|---|---|---|---|",
        f"| cold (page cache dropped, no cached fingerprint) | {result['cold_s']['median']:.3f} s "
        f"| < {GOAL_COLD_S} s | {result['ratio_to_goal']['cold']:.3f} |",
        f"| warm (cached fingerprint) | {result['warm_s']['median'] * 1000:.2f} ms "
        f"| < {GOAL_WARM_S * 1000:.0f} ms | {result['ratio_to_goal']['warm']:.3f} |",
        f"| page cache hot, no cached fingerprint | "
        f"{result['page_cache_hot_s']['median']:.3f} s | information | |",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
