"""kvstore as LMCache's shared remote tier: a remote-storage plugin that keeps LMCache's chunks in
the kvstore daemon. Load it with remote_storage_plugins: ["kvstore"] and the extra_config keys
remote_storage_plugin.kvstore.module_path = "connectors.lmcache.connector" and
remote_storage_plugin.kvstore.class_name = "KVStoreAdapter" (docs/lmcache.md)."""
