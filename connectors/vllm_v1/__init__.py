"""kvstore's vLLM V1 connector. Load it with kv_connector="KVStoreConnector" and
kv_connector_module_path="connectors.vllm_v1.connector"."""
