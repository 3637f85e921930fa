"""Plugin settings (LMCache's extra_config under remote_storage_plugin.<name>.*) and the kvstore
namespace of LMCache's chunks. No I/O, and no lmcache import: plain values in, plain values out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from connectors.common import checked_setting
from kvstore.client import DEFAULT_ADDRESS
from kvstore.keys import with_tenant

# Keys LMCache itself reads under the same prefix to find the plugin class.
_LMCACHE_OWN_KEYS = frozenset({"module_path", "class_name"})


@dataclass(slots=True, frozen=True)
class PluginConfig:
    address: str = DEFAULT_ADDRESS  # the default daemon of this uid on this host (ipc)
    timeout_ms: int = 1000  # one daemon call; a dead daemon costs at most this per pause
    retry_interval_ms: int = 1000  # after a failure, skip the daemon this long (doubling to 32x)
    lease_ms: int = 30_000  # how long a pinned lookup keeps its hits from eviction
    epoch: int = 0  # bump to retire every chunk stored under the previous epoch
    namespace: str = ""  # extra operator-chosen identity (e.g. a weights revision)
    use_shm: bool = True  # use the daemon's shared segment when on its host
    curve_keys: str | None = None  # client keys from `kvstore keygen`
    tenant: str = ""  # the daemon's tenant (DIR/tenants.toml) whose namespaces these chunks use

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None, plugin_name: str) -> PluginConfig:
        """Read remote_storage_plugin.<plugin_name>.* from extra_config; reject unknown keys."""
        prefix = f"remote_storage_plugin.{plugin_name}."
        ours = {k[len(prefix):]: v for k, v in (extra or {}).items() if k.startswith(prefix)}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(ours) - known - _LMCACHE_OWN_KEYS)
        if unknown:
            raise ValueError(f"unknown kvstore plugin settings {[prefix + k for k in unknown]}; "
                             f"known: {sorted(prefix + k for k in known)}")
        values = {k: checked_setting(prefix + k, v, getattr(cls(), k))
                  for k, v in ours.items() if k in known}
        with_tenant(values.get("tenant", ""), b"")  # a bad tenant: ValueError saying what is allowed
        return cls(**values)



def chunk_identity(lmcache_version: str, config: Any, metadata: Any,
                   settings: PluginConfig) -> dict[str, Any]:
    """Everything that changes a stored chunk's bytes but not its LMCache key.

    Read from LMCacheMetadata's fields (not its layer groups), so LMCache's scheduler and worker
    roles, which see those groups at different times, agree. "connector" keeps LMCache chunks
    apart from the vLLM connector's blocks, whose identity never carries that field.
    """
    return {
        "connector": "lmcache",
        "lmcache_version": lmcache_version,
        "model_name": metadata.model_name,
        "world_size": metadata.world_size,
        "chunk_size": metadata.chunk_size,
        "kv_shape": list(metadata.kv_shape),
        "kv_dtype": str(metadata.kv_dtype),
        "use_mla": bool(metadata.use_mla),
        "use_layerwise": bool(config.use_layerwise),
        "remote_serde": config.remote_serde,
        "namespace": settings.namespace,
    }
