"""The connector keeps up with vLLM's KVConnectorBase_V1: no abstract method is left unimplemented,
and every public hook the installed base class defines is either overridden by KVStoreConnector
or listed in DEFAULTS_KEPT with why vLLM's default is right for kvstore. A vLLM that adds a hook
fails here until someone decides (and writes the reason down).

KVSTORE_VLLM_BASE_PY=/path/to/vllm/distributed/kv_transfer/kv_connector/v1/base.py checks another
vLLM's base class, parsed rather than imported, against the connector as installed: for a vLLM
that cannot be installed next to the CI's (docs/operating.md, "vLLM versions").
"""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

from connectors.vllm_v1.connector import KVStoreConnector

# Hooks of KVConnectorBase_V1 (vLLM 0.32 to 0.34) whose base-class default kvstore keeps, and why.
DEFAULTS_KEPT: dict[str, str] = {
    "role": "vLLM's accessor for the role passed to __init__",
    "bind_connector_metadata": "vLLM's metadata plumbing, read back through _get_connector_metadata",
    "clear_connector_metadata": "vLLM's metadata plumbing",
    "has_connector_metadata": "vLLM's metadata plumbing",
    "get_mem_pool_context": "copies are torch ops into whatever vLLM allocates: no custom pool",
    "set_host_xfer_buffer_ops": "for connectors staging through vLLM's host buffer (NIXL); kvstore "
                                "copies between the KV cache and pool slots itself",
    "finish_forward": "nothing runs during the forward: saves are made in wait_for_save",
    "reset_capture_state": "no state changes while CUDA graphs are captured (the per-layer hooks "
                           "do nothing)",
    "handle_preemptions": "saves finish inside wait_for_save: no save still reads a preempted "
                          "request's blocks",
    "get_transfer_results": "the default builds it from get_finished, which is overridden",
    "get_kv_connector_kv_cache_events": "the pool's KV events come from the scheduler half "
                                        "(take_events), which knows each block's tokens",
    "get_handshake_metadata": "P/D handshakes between vLLM instances; kvstore's peer is its daemon",
    "set_xfer_handshake_metadata": "P/D handshakes: not used",
    "set_xfer_handshake_metadata_pp_aware": "P/D handshakes: not used",
    "get_finished_count": "every worker reports every load finished: vLLM's default count is right",
    "bind_kv_cache_manager": "the base stores the manager; the scheduler half does not use it",
    "bind_gpu_block_pool": "the scheduler half never touches vLLM's block pool",
    "get_loaded_kv_cache_group_ids": "the default (the prefix-cacheable groups) is what a hash-"
                                     "addressed pool restores",
    "get_external_cache_hit_sources": "every external token comes from the host pool: "
                                      "_cache_hit_source = HOST",
    "on_new_request": "nothing to do before the first lookup (get_num_new_matched_tokens)",
    "register_finished_partial_tail": "only full blocks are pooled; a partial tail is never saved",
    "has_pending_block_frees": "request_finished never keeps blocks (saves are synchronous)",
    "has_pending_push_work": "no push-mode transfers",
    "get_required_kvcache_layout": "blocks move as opaque bytes of any layout; the namespace keeps "
                                   "different layouts apart",
    "requires_piecewise_for_cudagraph": "save_kv_layer and wait_for_layer_load do nothing, so "
                                        "graph replay skips nothing",
    "reset_cache": "the pool is shared by every replica of the namespace: one replica's prefix-"
                   "cache reset (vLLM sends one with each sleep) must not empty it for the others",
    "supports_divergent_local_hybrid_hits": "False: only full-attention blocks are pooled, no "
                                            "recurrent state",
    # vLLM 0.34
    "supports_lookahead_block_hashes": "False: a block's hash stays that of its own tokens, the "
                                       "key every replica uses (vLLM then hashes without lookahead)",
    "kv_cache_access": "IN_PROCESS is true: workers copy with torch in their own process and "
                       "register only the pool's host memory with CUDA, never the KV cache",
    "may_load_async": "the default (P/D remote prefill only): a pool load starts when a running "
                      "slot frees, as on 0.32",
}


def _base_hooks_installed() -> dict[str, list[str] | None]:
    """Public hook name -> positional parameter names (None for a property), from the class."""
    hooks: dict[str, list[str] | None] = {}
    for name, value in vars(KVConnectorBase_V1).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            hooks[name] = None
        elif isinstance(value, (classmethod, staticmethod)) or inspect.isfunction(value):
            hooks[name] = _params(getattr(KVConnectorBase_V1, name))
    return hooks


def _base_hooks_parsed(path: Path) -> tuple[dict[str, list[str] | None], set[str]]:
    """The same from a base.py's source, and which of them are abstract."""
    tree = ast.parse(path.read_text())
    cls = next(node for node in tree.body
               if isinstance(node, ast.ClassDef) and node.name == "KVConnectorBase_V1")
    hooks: dict[str, list[str] | None] = {}
    abstract: set[str] = set()
    for node in cls.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        decorators = {ast.unparse(d) for d in node.decorator_list}
        if "property" in decorators:
            hooks[node.name] = None
        else:
            args = [a.arg for a in node.args.posonlyargs + node.args.args]
            hooks[node.name] = args[1:] if args[:1] in (["self"], ["cls"]) else args
        if "abstractmethod" in decorators:
            abstract.add(node.name)
    return hooks, abstract


def _params(func: object) -> list[str]:
    """Positional parameter names of a bound or unbound hook, without self/cls."""
    params = [p for p in inspect.signature(func).parameters.values()  # type: ignore[arg-type]
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    return names[1:] if names[:1] == ["self"] else names


def _base() -> tuple[str, dict[str, list[str] | None], set[str]]:
    """Which base class is checked, its hooks and its abstract methods."""
    path = os.environ.get("KVSTORE_VLLM_BASE_PY")
    if path:
        hooks, abstract = _base_hooks_parsed(Path(path))
        return path, hooks, abstract
    return "installed vLLM", _base_hooks_installed(), set(KVConnectorBase_V1.__abstractmethods__)


def _overridden() -> set[str]:
    return {name for name in vars(KVStoreConnector) if not name.startswith("_")}


def test_no_abstract_method_is_left() -> None:
    where, _hooks, abstract = _base()
    assert not KVStoreConnector.__abstractmethods__, "KVStoreConnector cannot be instantiated"
    missing = sorted(abstract - _overridden())
    assert not missing, f"{where}: abstract hooks the connector does not implement: {missing}"


def test_every_hook_is_overridden_or_decided() -> None:
    """A new hook fails until it is handled or its default is kept on purpose (DEFAULTS_KEPT)."""
    where, hooks, _abstract = _base()
    undecided = sorted(set(hooks) - _overridden() - set(DEFAULTS_KEPT))
    assert not undecided, (f"{where}: KVConnectorBase_V1 hooks neither overridden by "
                           f"KVStoreConnector nor in DEFAULTS_KEPT: {undecided}")


def test_decisions_do_not_contradict_overrides() -> None:
    """A hook the connector now overrides leaves DEFAULTS_KEPT, so the list stays true."""
    assert not sorted(set(DEFAULTS_KEPT) & _overridden())


def test_overrides_take_the_base_parameters() -> None:
    """vLLM calls hooks positionally: an override must take the base's parameters in order (a
    hook whose signature vLLM changed fails here, not at the first request)."""
    where, hooks, _abstract = _base()
    for name in sorted(_overridden() & set(hooks)):
        ours = inspect.getattr_static(KVStoreConnector, name)
        expected = hooks[name]
        if expected is None:
            assert isinstance(ours, property), f"{where}: {name} is a property in vLLM"
            continue
        assert _params(getattr(KVStoreConnector, name)) == expected, (
            f"{where}: KVStoreConnector.{name} takes {_params(getattr(KVStoreConnector, name))},"
            f" vLLM passes {expected}")

