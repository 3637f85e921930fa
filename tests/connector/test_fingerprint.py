"""The weights fingerprint: content decides it (not paths, times or inodes), an in-place rewrite
of the same shapes changes it, and a warm start reads no tensor bytes. Real files, no vLLM."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from bench.models import TEST_MODEL, TinyLlama, make_model
from connectors.vllm_v1.fingerprint import SAMPLE_BYTES, fingerprint, sample_budget, tensor_samples
from connectors.vllm_v1.identity import local_model_path, long_rope, weights_identity

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two random-weight checkpoints of the same shape and config (seeds 0 and 1)."""
    base = tmp_path_factory.mktemp("weights")
    return (make_model(base / "w1", TEST_MODEL),
            make_model(base / "w2", TinyLlama(seed=1)))


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tensor_span(file: Path, name: str) -> tuple[int, int]:
    """Absolute (start, end) of one tensor's bytes in a safetensors file."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def test_same_bytes_at_other_paths_and_times_agree(checkpoints: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    """Two hosts (two copies, other paths, other mtimes and inodes) get the same digest."""
    w1 = checkpoints[0]
    other = copy_of(w1, tmp_path / "elsewhere" / "model")
    os.utime(other / "model.safetensors", (1_000_000, 1_000_000))
    a = fingerprint(w1, tmp_path / "cache-a")
    b = fingerprint(other, tmp_path / "cache-b")
    assert a is not None and b is not None
    assert a.digest == b.digest
    assert a.num_bytes == (w1 / "model.safetensors").stat().st_size


def test_weights_replaced_in_place_change_the_digest(checkpoints: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """Copying other weights of the same shapes over the same file (same path and inode, header
    byte for byte the same) changes the digest, also with the old digest cached."""
    w1, w2 = checkpoints
    model = copy_of(w1, tmp_path / "current")
    cache = tmp_path / "cache"
    before = fingerprint(model, cache)
    inode = (model / "model.safetensors").stat().st_ino
    shutil.copyfile(w2 / "model.safetensors", model / "model.safetensors")
    assert (model / "model.safetensors").stat().st_ino == inode
    after = fingerprint(model, cache)
    assert before is not None and after is not None
    assert after.digest != before.digest and after.num_files_read == 1


def test_one_small_tensor_changed_changes_the_digest(checkpoints: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """A fine-tune that touches a single tensor (here a 256-byte norm weight) is seen: every
    tensor is sampled."""
    model = copy_of(checkpoints[0], tmp_path / "current")
    file = model / "model.safetensors"
    before = fingerprint(model)
    start, end = tensor_span(file, "model.layers.1.input_layernorm.weight")
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(struct.pack(f"<{(end - start) // 4}f", *[1.5] * ((end - start) // 4)))
    after = fingerprint(model)
    assert before is not None and after is not None and after.digest != before.digest


def test_warm_start_reads_no_tensor_bytes(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    """The second fingerprint of unchanged files comes from the cache: the process reads a few
    hundred bytes of cache, not the checkpoint (counted by the kernel, /proc/self/io)."""
    model = copy_of(checkpoints[0], tmp_path / "current")
    cache = tmp_path / "cache"
    cold = fingerprint(model, cache)
    before = _bytes_read_by_this_process()
    warm = fingerprint(model, cache)
    read = _bytes_read_by_this_process() - before
    assert cold is not None and warm is not None and warm.digest == cold.digest
    assert cold.num_bytes_read > 50_000 and warm.num_bytes_read == 0
    assert read < 16_384, f"a warm start read {read} bytes"


def test_an_unusable_cache_only_costs_a_read(checkpoints: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    """A corrupt cache file or an unwritable cache directory is no error."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fingerprints.json").write_text("{not json")
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    a = fingerprint(checkpoints[0], cache)
    b = fingerprint(checkpoints[0], blocked / "cache")
    assert a is not None and b is not None and a.digest == b.digest


def test_other_weight_formats_are_sampled(tmp_path: Path) -> None:
    """A .bin checkpoint changed in place at the same size changes the digest."""
    model = tmp_path / "model"
    model.mkdir()
    data = bytearray(os.urandom(1 << 20))
    (model / "pytorch_model.bin").write_bytes(data)
    before = fingerprint(model)
    data[len(data) // 2: len(data) // 2 + 8192] = bytes(8192)
    (model / "pytorch_model.bin").write_bytes(data)
    after = fingerprint(model)
    assert before is not None and after is not None and after.digest != before.digest
    (tmp_path / "no-weights").mkdir()
    assert fingerprint(tmp_path / "no-weights") is None  # the caller falls back to the name


def test_samples_cover_every_tensor_within_the_budget() -> None:
    """Each tensor gets at least one page; a 16 GiB file reads about 4096 pages (16 MiB), also
    with many small tensors (a big MoE checkpoint)."""
    mib = 2**20
    few = [(i * 512 * mib, (i + 1) * 512 * mib) for i in range(32)]  # 16 GiB in 32 tensors
    many = [(i * mib, (i + 1) * mib) for i in range(20_000)]
    for spans in (few, many):
        ranges = tensor_samples(spans)
        budget = sample_budget(spans[-1][1] - spans[0][0], len(spans))
        assert all(any(s <= off < e for off, _ in ranges) for s, e in spans[:: len(spans) // 16])
        assert sum(length for _, length in ranges) <= (budget + len(spans)) * SAMPLE_BYTES
    assert 4096 - 32 <= len(tensor_samples(few)) <= 4096 + 32  # the budget is used


def test_a_hub_id_resolves_to_its_local_snapshot(checkpoints: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """A hub name found in the local Hugging Face cache is fingerprinted from its snapshot; one
    that is not falls back to name and revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(checkpoints[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = local_model_path("org/tiny", None, str(tmp_path / "hub"))
    assert found == repo / "snapshots" / commit
    assert local_model_path("org/absent", None, str(tmp_path / "hub")) is None
    assert weights_identity("org/absent", "v2", None, "auto") == {
        "model": "org/absent", "revision": "v2"}


def test_long_rope_depends_on_max_model_len_only_past_the_original_context() -> None:
    """Phi-3 LongRoPE switches factors above the original context; other RoPE ignores it."""
    phi = {"rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]},
           "original_max_position_embeddings": 4096}
    assert long_rope(phi, 2048) is False and long_rope(phi, 8192) is True
    assert long_rope({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 8192) is None


def _bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_bench_checkpoint_is_real_safetensors(tmp_path: Path) -> None:
    """bench/fingerprint.py's checkpoint (smoke, 8 MiB): safetensors reads it and the
    measurement runs (its warm path asserts that no file was read)."""
    from safetensors import safe_open

    from bench.fingerprint import measure, write_checkpoint

    model = write_checkpoint(tmp_path / "model", 8 * 2**20)
    with safe_open(str(next(model.glob("*.safetensors"))), "pt") as f:
        assert len(list(f.keys())) > 100
    result = measure(model, tmp_path / "cache", system_wide=False)
    assert result["checkpoint"]["bytes"] >= 8 * 2**20 and result["cold_bytes_read"] > 0
