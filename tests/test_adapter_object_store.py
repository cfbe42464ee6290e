"""Adapter versions in S3-compatible object storage (adapters.s3), on a real moto server:
the registry uploads each version before it becomes current, and the vLLM resolver
plugin downloads, verifies and caches it for a replica without the adapter volume."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from serving.api.error_map import api_error
from serving.engines import vllm_launcher as launcher_module
from serving.engines.vllm_launcher import resolver_env, vllm_env
from tests.support.adapters import HF_DIR, make_adapter
from tests.support.s3_server import CREDENTIALS, REGION, S3Server, s3_server  # noqa: F401  (fixture)
from tuneserve.adapters.object_store import AdapterObjectStore, S3Location
from tuneserve.adapters.registry import AdapterRecord, AdapterRegistry
from tuneserve.config import AdaptersS3Config, Settings, VLLMLaunchConfig, load_settings
from tuneserve.errors import TuneserveError
from vllm_plugin import lora_resolver
from vllm_plugin.lora_resolver import AdapterVolume, ObjectStoreCache, make_resolver, parse_engine_name

TENANT = "acme"
BUCKET = "tuneserve-adapters"
PREFIX = "team/adapters"


@pytest.fixture(scope="module", autouse=True)
def aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """boto3's standard chain, as a deployment gives it: credentials in the environment
    (and no ~/.aws of whoever runs the tests)."""
    nowhere = tmp_path_factory.mktemp("no-aws") / "none"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**CREDENTIALS, "AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere)}.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> Any:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return client


def settings_for(data_dir: Path, endpoint_url: str, bucket: str = BUCKET) -> Settings:
    overrides = {
        "data_dir": str(data_dir), "model.hf_path": str(HF_DIR), "adapters.s3.bucket": bucket,
        "adapters.s3.prefix": PREFIX, "adapters.s3.endpoint_url": endpoint_url, "adapters.s3.region": REGION,
    }
    return load_settings(overrides=overrides, environ={})


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for seed, name in enumerate(("support", "tampered", "gone", "raced")):
        out[name] = tmp_path_factory.mktemp(f"peft-{name}") / "adapter"
        make_adapter(out[name], seed=400 + seed, r=8, target_modules=["q_proj", "v_proj"])
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, s3: Any, s3_server: S3Server, peft_dirs: dict[str, Path]) -> AdapterRegistry:
    registry = AdapterRegistry(settings_for(tmp_path_factory.mktemp("gateway-data"), s3_server.endpoint_url))
    for name, source in peft_dirs.items():
        registry.add(TENANT, name, source)
    return registry


def current(registry: AdapterRegistry, name: str) -> AdapterRecord:
    record = registry.get(TENANT, name)
    assert record is not None and record.uid is not None
    return record


def store_for(s3_server: S3Server) -> AdapterObjectStore:
    return AdapterObjectStore(S3Location(BUCKET, PREFIX, s3_server.endpoint_url, REGION))


def cache_for(s3_server: S3Server, cache_dir: Path, base: str | None = None) -> ObjectStoreCache:
    return ObjectStoreCache(store_for(s3_server), cache_dir, base)


def resolve(cache: ObjectStoreCache, name: str, volume: AdapterVolume | None = None) -> Any:
    return asyncio.run(make_resolver(volume, cache).resolve_lora("/any/base/path", name))


def version_key(record: AdapterRecord, filename: str) -> str:
    return f"{PREFIX}/{record.tenant}/{record.name}/v{record.version}/{filename}"


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_a_published_version_lands_in_the_bucket(registry: AdapterRegistry, s3: Any) -> None:
    record = current(registry, "support")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{TENANT}/support/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == sorted(version_key(record, f.name) for f in record.path.iterdir())
    assert version_key(record, "manifest.json") in keys and version_key(record, "adapter_model.safetensors") in keys
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=version_key(record, "manifest.json"))["Body"].read())
    weights = s3.get_object(Bucket=BUCKET, Key=version_key(record, "adapter_model.safetensors"))["Body"].read()
    assert manifest["uid"] == record.uid and manifest["version"] == record.version
    assert manifest["sha256"] == hashlib.sha256(weights).hexdigest() == record.sha256


def test_a_failed_upload_publishes_nothing(tmp_path: Path, s3_server: S3Server, s3: Any, peft_dirs: dict[str, Path]) -> None:
    good = AdapterRegistry(settings_for(tmp_path, s3_server.endpoint_url))
    first = good.add(TENANT, "flaky", peft_dirs["support"])
    broken = AdapterRegistry(settings_for(tmp_path, s3_server.endpoint_url, bucket="no-such-bucket"))
    with pytest.raises(TuneserveError, match="object store.*no-such-bucket") as refused:
        broken.add(TENANT, "flaky", peft_dirs["tampered"])
    # Through the API: a retryable 503 that names no bucket or server path.
    answer = api_error(refused.value)
    assert (answer.status_code, answer.code) == (503, "adapter_store_unavailable")
    assert 1 <= int(answer.headers["Retry-After"]) <= 60
    assert "no-such-bucket" not in str(answer) and str(tmp_path) not in str(answer)
    with pytest.raises(TuneserveError, match="object store"):
        broken.add(TENANT, "never", peft_dirs["tampered"])
    name_dir = good.root / TENANT / "flaky"
    assert sorted(p.name for p in name_dir.iterdir()) == ["current", "v1"]  # no v2, no temp dir
    assert (name_dir / "current").read_text().strip() == "v1"
    assert good.get(TENANT, "flaky") == first
    assert not (good.root / TENANT / "never").exists() and good.get(TENANT, "never") is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter-upload-")) == []


def test_a_replica_without_the_volume_downloads_verifies_and_caches(
    registry: AdapterRegistry, s3_server: S3Server, tmp_path: Path
) -> None:
    record = current(registry, "support")
    cache_dir = tmp_path / "cache"
    request = resolve(cache_for(s3_server, cache_dir, base=registry.settings.model.name), record.engine_name)
    assert request is not None and request.lora_name == record.engine_name
    cached = Path(request.lora_path)
    assert cached == (cache_dir / record.engine_name).resolve()
    assert sorted(p.name for p in cached.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert hashlib.sha256((cached / "adapter_model.safetensors").read_bytes()).hexdigest() == record.sha256
    assert leftovers(cache_dir) == [record.engine_name]  # no temp dirs
    # Another process on the same cache (a restarted vLLM) takes the verified copy.
    inode = cached.stat().st_ino
    again = resolve(cache_for(s3_server, cache_dir), record.engine_name)
    assert again is not None and Path(again.lora_path) == cached and cached.stat().st_ino == inode
    # An empty volume, as on a node that has none of the registry's files: the bucket serves.
    empty_volume = tmp_path / "empty-volume"
    empty_volume.mkdir()
    via_volume = resolve(cache_for(s3_server, tmp_path / "cache2"), record.engine_name, AdapterVolume(empty_volume))
    assert via_volume is not None and Path(via_volume.lora_path) == (tmp_path / "cache2" / record.engine_name).resolve()
    # The volume, where it has the version, is used as it is: no copy.
    on_volume = resolve(cache_for(s3_server, tmp_path / "cache3"), record.engine_name, AdapterVolume(registry.root))
    assert on_volume is not None and Path(on_volume.lora_path) == record.path.resolve()
    assert leftovers(tmp_path / "cache3") == []


def test_other_bases_and_names_are_refused(registry: AdapterRegistry, s3_server: S3Server, tmp_path: Path) -> None:
    record = current(registry, "support")
    assert resolve(cache_for(s3_server, tmp_path, base="another/base"), record.engine_name) is None
    other_uid = "0123456789ab" if record.uid != "0123456789ab" else "ba9876543210"
    for name in (f"{TENANT}--support--v{record.version}--{other_uid}", f"{TENANT}--support--v99--{record.uid}",
                 f"{TENANT}--nothing--v1--{record.uid}", f"../{record.engine_name}", "acme--support"):
        assert resolve(cache_for(s3_server, tmp_path), name) is None, name
    assert leftovers(tmp_path) == []


def test_tampered_objects_are_refused_and_not_cached(registry: AdapterRegistry, s3_server: S3Server, s3: Any, tmp_path: Path) -> None:
    record = current(registry, "tampered")
    weights_key = version_key(record, "adapter_model.safetensors")
    original = s3.get_object(Bucket=BUCKET, Key=weights_key)["Body"].read()
    data = bytearray(original)
    data[-1] ^= 0x01  # one bit of one weight
    s3.put_object(Bucket=BUCKET, Key=weights_key, Body=bytes(data))
    try:
        assert resolve(cache_for(s3_server, tmp_path), record.engine_name) is None
        assert leftovers(tmp_path) == []
    finally:
        s3.put_object(Bucket=BUCKET, Key=weights_key, Body=original)
    # A manifest rewritten to match the tampered weights still names another version.
    manifest_key = version_key(record, "manifest.json")
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    s3.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps({**manifest, "uid": "0" * 12}).encode())
    try:
        assert resolve(cache_for(s3_server, tmp_path), record.engine_name) is None
        assert leftovers(tmp_path) == []
    finally:
        s3.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps(manifest).encode())
    assert resolve(cache_for(s3_server, tmp_path), record.engine_name) is not None


def test_a_cached_copy_that_no_longer_verifies_is_replaced(registry: AdapterRegistry, s3_server: S3Server, tmp_path: Path) -> None:
    record = current(registry, "support")
    assert resolve(cache_for(s3_server, tmp_path), record.engine_name) is not None
    weights = tmp_path / record.engine_name / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    request = resolve(cache_for(s3_server, tmp_path), record.engine_name)
    assert request is not None
    assert hashlib.sha256(Path(request.lora_path, "adapter_model.safetensors").read_bytes()).hexdigest() == record.sha256


def test_a_removed_adapter_is_not_resolved_again(registry: AdapterRegistry, s3_server: S3Server, s3: Any, tmp_path: Path) -> None:
    record = current(registry, "gone")
    cache = cache_for(s3_server, tmp_path)
    assert resolve(cache, record.engine_name) is not None  # downloaded and cached
    registry.remove(TENANT, "gone")
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{TENANT}/gone/").get("KeyCount") == 0
    assert resolve(cache, record.engine_name) is None
    assert leftovers(tmp_path) == []  # the cached copy went with it
    assert resolve(cache_for(s3_server, tmp_path), record.engine_name) is None


def test_two_processes_racing_on_one_cache_share_one_verified_dir(
    registry: AdapterRegistry, s3_server: S3Server, tmp_path: Path
) -> None:
    record = current(registry, "raced")
    caches = [cache_for(s3_server, tmp_path) for _ in range(2)]
    start = threading.Barrier(2)
    found: list[Path | None] = [None, None]

    def run(i: int) -> None:
        start.wait()
        found[i] = caches[i].find(record.engine_name)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found[0] is not None and found[0] == found[1] == (tmp_path / record.engine_name).resolve()
    assert leftovers(tmp_path) == [record.engine_name]
    # The loser's path, taken for certain: its rename meets the winner's dir.
    parsed = parse_engine_name(record.engine_name)
    assert parsed is not None
    loser = cache_for(s3_server, tmp_path)
    assert loser._download(record.engine_name, parsed, tmp_path / record.engine_name) == found[0]
    assert leftovers(tmp_path) == [record.engine_name]
    assert hashlib.sha256((found[0] / "adapter_model.safetensors").read_bytes()).hexdigest() == record.sha256


def test_the_launcher_passes_the_bucket_and_the_names_agree(tmp_path: Path) -> None:
    names = ("S3_BUCKET_ENV", "S3_PREFIX_ENV", "S3_ENDPOINT_URL_ENV", "S3_REGION_ENV")
    assert [getattr(launcher_module, n) for n in names] == [getattr(lora_resolver, n) for n in names]
    s3 = AdaptersS3Config(bucket=BUCKET, prefix=PREFIX, endpoint_url="http://minio:9000", region=REGION)
    env = resolver_env(tmp_path, "base", {}, s3)
    assert (env[lora_resolver.S3_BUCKET_ENV], env[lora_resolver.S3_PREFIX_ENV]) == (BUCKET, PREFIX)
    assert (env[lora_resolver.S3_ENDPOINT_URL_ENV], env[lora_resolver.S3_REGION_ENV]) == ("http://minio:9000", REGION)
    launched = vllm_env(VLLMLaunchConfig(), tmp_path, "base", s3)
    assert launched[lora_resolver.S3_BUCKET_ENV] == BUCKET
    assert launched["AWS_ACCESS_KEY_ID"] == CREDENTIALS["AWS_ACCESS_KEY_ID"]  # the chain reaches vLLM
    assert lora_resolver.S3_BUCKET_ENV not in resolver_env(tmp_path, "base", {}, AdaptersS3Config())
    assert lora_resolver.S3_BUCKET_ENV not in resolver_env(tmp_path, "base", {})


def test_the_plugin_registers_with_only_the_bucket(
    registry: AdapterRegistry, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.resolvers.pop(lora_resolver.RESOLVER_NAME, None)
    monkeypatch.delenv(lora_resolver.ADAPTERS_DIR_ENV, raising=False)
    for name, value in {
        lora_resolver.S3_BUCKET_ENV: BUCKET, lora_resolver.S3_PREFIX_ENV: PREFIX,
        lora_resolver.S3_ENDPOINT_URL_ENV: s3_server.endpoint_url, lora_resolver.S3_REGION_ENV: REGION,
        lora_resolver.CACHE_DIR_ENV: str(tmp_path / "cache"),
    }.items():
        monkeypatch.setenv(name, value)
    try:
        lora_resolver.register()
        resolver = LoRAResolverRegistry.get_resolver(lora_resolver.RESOLVER_NAME)
        record = current(registry, "support")
        found = asyncio.run(resolver.resolve_lora("base", record.engine_name))
        assert found is not None and Path(found.lora_path) == (tmp_path / "cache" / record.engine_name).resolve()
    finally:
        LoRAResolverRegistry.resolvers.pop(lora_resolver.RESOLVER_NAME, None)


def test_a_new_cache_clears_what_a_killed_discard_left(s3_server: S3Server, tmp_path: Path) -> None:
    """A discard renames the version away, then deletes it: a kill in between leaves a
    `.trash-*` dir no one serves. The next process on the cache removes it; versions stay."""
    cache_dir = tmp_path / "cache"
    (cache_dir / ".trash-0123abcd" / "sub").mkdir(parents=True)
    (cache_dir / ".trash-0123abcd" / "sub" / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    kept = cache_dir / "acme--support--v1--0123456789ab"
    kept.mkdir()
    cache_for(s3_server, cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir()) == [kept.name]
