"""kvstore/tenants.py: the clients directory and tenants.toml are read strictly, and each key's
grant says which namespaces it may read or write."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.auth

from kvstore.tenants import AccessError, load_access


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    clients = tmp_path / "clients"
    clients.mkdir()
    for name in ("alice", "bob"):
        zmq.auth.create_certificates(clients, name)
        (clients / f"{name}.key_secret").unlink()
    return tmp_path


def _key(keys: Path, name: str) -> str:
    return zmq.auth.load_certificate(keys / "clients" / f"{name}.key")[0].decode()


def test_without_a_tenants_file_every_admitted_key_uses_every_namespace(keys: Path) -> None:
    access = load_access(keys)
    assert set(access.keys.values()) == {"alice.key", "bob.key"} and access.grants is None
    assert access.refusal(_key(keys, "alice"), b"anything", write=True) is None
    assert access.refusal("not-a-key", b"anything", write=False) is not None


def test_grants_follow_the_file(keys: Path) -> None:
    (keys / "tenants.toml").write_text('[tenants.a]\nkeys = ["alice.key"]\n'
                                       '[tenants.b]\nkeys = ["bob.key"]\nread = ["a"]\n')
    access = load_access(keys)
    alice, bob = _key(keys, "alice"), _key(keys, "bob")
    assert access.refusal(alice, b"a/x", write=True) is None
    assert "may not read" in (access.refusal(alice, b"b/x", write=False) or "")
    assert access.refusal(bob, b"a/x", write=False) is None
    assert "may not write" in (access.refusal(bob, b"a/x", write=True) or "")
    assert "names no tenant" in (access.refusal(bob, b"\x00\x01digest", write=False) or "")
    assert not access.is_admin(bob)


def test_a_tenant_may_have_a_listener_of_its_own(keys: Path) -> None:
    """`listen` gives a tenant its own address (kvstore/listeners.py); others have none."""
    (keys / "tenants.toml").write_text('[tenants.a]\nkeys = ["alice.key"]\n'
                                       'listen = "tcp://127.0.0.1:5601"\n'
                                       '[tenants.b]\nkeys = ["bob.key"]\n')
    assert load_access(keys).listeners == {"a": "tcp://127.0.0.1:5601"}


@pytest.mark.parametrize(("text", "needle"), [
    ("[tenants.a\n", "not valid TOML"),
    ('[tenants.a]\nkeys = ["carol.key"]\n', "'carol.key'"),
    ('[tenants.a]\nkeys = ["alice.key"]\nread = ["zz"]\n', "'zz'"),
    ('[tenants."a/b"]\nkeys = ["alice.key"]\n', "tenant 'a/b'"),
    ('[tenants.a]\nkeys = ["alice.key"]\nadmin = "yes"\n', "admin must be"),
    ('[tenants.a]\nkey = ["alice.key"]\n', "allowed keys"),
    ('[serve]\n', "[tenants.NAME]"),
    ('[tenants.a]\nkeys = ["alice.key"]\nlisten = "udp://x"\n', "listen must be"),
    ('[tenants.a]\nkeys = ["alice.key"]\nlisten = "tcp://h:1"\n'
     '[tenants.b]\nkeys = ["bob.key"]\nlisten = "tcp://h:1"\n', "another tenant's"),
])
def test_a_bad_tenants_file_is_named_with_what_is_wrong(keys: Path, text: str, needle: str) -> None:
    (keys / "tenants.toml").write_text(text)
    with pytest.raises(AccessError) as info:
        load_access(keys)
    assert "tenants.toml" in str(info.value) and needle in str(info.value), info.value


@pytest.mark.parametrize("text", ["garbage\n", 'public-key = "short"\n',
                                  'public-key = "' + "~" * 40 + '"\n'])
def test_a_malformed_client_key_is_named(keys: Path, text: str) -> None:
    (keys / "clients" / "broken.key").write_text(text)
    with pytest.raises(AccessError, match="broken.key"):
        load_access(keys)
