"""The connector's `tenant` setting: the daemon's tenants file binds keys to the namespaces whose
names start with "<tenant>/" (kvstore/tenants.py), so the connector puts its tenant there."""

from __future__ import annotations

import pytest

from bench.models import TEST_MODEL, make_model
from connectors.vllm_v1.config import ConnectorConfig, make_namespace
from kvstore.client import DEFAULT_ADDRESS
from kvstore.ipc import default_address
from kvstore.keys import tenant_of

pytestmark = pytest.mark.timeout(120)


def test_tenant_prefixes_the_namespace_name_and_keeps_the_digest(tmp_path) -> None:
    """tenant "team-a" names b"team-a/<digest>"; without a tenant the name is the bare digest."""
    from vllm.engine.arg_utils import EngineArgs

    model = str(make_model(tmp_path / "m", TEST_MODEL))
    vllm_config = EngineArgs(model=model, dtype="float32", block_size=32, skip_tokenizer_init=True,
                             max_model_len=512, enforce_eager=True).create_engine_config()
    bare = make_namespace(vllm_config, ConnectorConfig())
    ns = make_namespace(vllm_config, ConnectorConfig.from_extra({"tenant": "team-a"}))
    assert ns.name == b"team-a/" + bare.name and tenant_of(ns.name) == "team-a"
    assert tenant_of(bare.name) is None


@pytest.mark.parametrize("tenant", ["a/b", "-x", "x" * 33, "é"])
def test_a_tenant_that_cannot_prefix_a_name_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        ConnectorConfig.from_extra({"tenant": tenant})


def test_default_address_is_the_default_daemon_of_this_uid() -> None:
    """With no address the connector reaches `kvstore serve` started with no address."""
    assert ConnectorConfig().address == DEFAULT_ADDRESS == default_address("kvstore")


def test_lmcache_plugin_takes_the_same_tenant_setting() -> None:
    """LMCache's plugin names its tenant the same way; a bad one is refused when read."""
    from connectors.lmcache.config import PluginConfig

    prefix = "remote_storage_plugin.kvstore."
    assert PluginConfig.from_extra({prefix + "tenant": "team-a"}, "kvstore").tenant == "team-a"
    assert PluginConfig().address == DEFAULT_ADDRESS
    with pytest.raises(ValueError, match="tenant"):
        PluginConfig.from_extra({prefix + "tenant": "team/a"}, "kvstore")
