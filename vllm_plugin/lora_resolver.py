"""A vLLM LoRA resolver: every replica loads any registered adapter by its engine name.

With gateways loading adapters through `/v1/load_lora_adapter`, each gateway keeps its
own LRU of what it registered and unloads its least recently used idle one: with two
gateways on one vLLM, one unloads what the other serves. With this resolver nobody
registers or unloads: a request for a name vLLM does not know makes vLLM ask its
resolvers (vllm/entrypoints/serve/engine/serving.py `_check_model`, with
VLLM_ALLOW_RUNTIME_LORA_UPDATING), this one finds the version on the shared adapter
volume, and vLLM's worker keeps `--max-cpu-loras` of them, re-reading an evicted one
from its path on its next request.

Names are `<tenant>--<name>--v<N>--<uid>` (AdapterRecord.engine_name): a name is
accepted only if it is exactly the engine name of a version dir under
TUNESERVE_ADAPTERS_DIR (`<tenant>/<name>/v<N>/`, see tuneserve/adapters/registry.py),
whose manifest carries that uid and the sha256 of its weights. Anything else (another
shape, a path, an unknown or removed version, a uid or checksum that does not match)
is None, which vLLM answers with a 404. Version dirs are immutable once published, so
one verification per name and process is enough; only the dir's presence is checked
again (a removed adapter is never resolved again, e.g. after a restart).

Without the volume (a replica on another node, no RWX volume), or for a version not on
it, the version comes from the registry's object store (adapters.s3, see
tuneserve/adapters/object_store.py) when TUNESERVE_ADAPTERS_S3_BUCKET is set: its files
are downloaded into a private temp dir of the local cache (TUNESERVE_ADAPTERS_CACHE_DIR),
checked exactly as on the volume, and renamed into place as `<cache>/<engine name>/`. Two
vLLM processes on one cache may both download; the first rename wins and the other
discards its copy. A cached version is re-checked against the bucket on each look-up
(one HEAD request), so a removed adapter is not resolved again; with the bucket
unreachable, a cached and verified copy is still used, as the volume's would be.

Registered by the `tuneserve_lora_resolver` entry point of `vllm.general_plugins`; a
no-op unless TUNESERVE_ADAPTERS_DIR or TUNESERVE_ADAPTERS_S3_BUCKET is set, so other vLLM
users of the environment get nothing. TUNESERVE_ADAPTERS_BASE (optional): the model.name
adapters must have been validated against (the manifest's `base`), so a replica of
another base refuses them. TUNESERVE_ADAPTERS_S3_PREFIX, _ENDPOINT_URL and _REGION are
adapters.s3's other keys; credentials come from boto3's chain (AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from tuneserve.names import is_valid_name

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    from tuneserve.adapters.object_store import AdapterObjectStore

# A child of "vllm", so the lines land in vLLM's own log format and level.
log = logging.getLogger("vllm.plugins.tuneserve_lora_resolver")

ADAPTERS_DIR_ENV = "TUNESERVE_ADAPTERS_DIR"
BASE_ENV = "TUNESERVE_ADAPTERS_BASE"
S3_BUCKET_ENV = "TUNESERVE_ADAPTERS_S3_BUCKET"
S3_PREFIX_ENV = "TUNESERVE_ADAPTERS_S3_PREFIX"
S3_ENDPOINT_URL_ENV = "TUNESERVE_ADAPTERS_S3_ENDPOINT_URL"
S3_REGION_ENV = "TUNESERVE_ADAPTERS_S3_REGION"
CACHE_DIR_ENV = "TUNESERVE_ADAPTERS_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "tuneserve-adapter-cache"
RESOLVER_NAME = "tuneserve"
PLUGIN_NAME = "tuneserve_lora_resolver"  # the entry point's name, for VLLM_PLUGINS

# The registry's layout (tuneserve/adapters/registry.py, peft_format.py). Spelled out
# here rather than imported: the registry pulls the GGUF converter and the gateway's
# config into every vLLM process, for three file names.
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

_VERSION = re.compile(r"v([1-9][0-9]{0,8})")
_UID = re.compile(r"[0-9a-f]{12}")
_HASH_CHUNK = 1 << 20
_DOWNLOAD_PREFIX = ".download-"
_TRASH_PREFIX = ".trash-"


@dataclass(frozen=True)
class EngineName:
    tenant: str
    name: str
    version: int
    uid: str | None

    def relative_dir(self) -> Path:
        return Path(self.tenant, self.name, f"v{self.version}")


def parse_engine_name(engine_name: str) -> EngineName | None:
    """The parts of a versioned engine name, or None for anything else.

    Strict: every part is checked for shape, so no name can address a path outside
    `<tenant>/<name>/v<N>` (names never contain '/', nor are '.' or '..')."""
    parts = engine_name.split("--")
    if len(parts) not in (3, 4):
        return None
    tenant, name, version = parts[:3]
    uid = parts[3] if len(parts) == 4 else None
    match = _VERSION.fullmatch(version)
    if not (is_valid_name(tenant) and is_valid_name(name) and match):
        return None
    if uid is not None and not _UID.fullmatch(uid):
        return None
    return EngineName(tenant, name, int(match[1]), uid)


def stable_lora_id(engine_name: str) -> int:
    """A positive id that is the same for a name in every process (vLLM's resolving
    path assigns its own; a direct user of the resolver gets a stable one)."""
    return int.from_bytes(hashlib.sha256(engine_name.encode()).digest()[:4], "big") % (2**31 - 1) + 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterVolume:
    """Finds and verifies versions on the shared adapter volume (read-only here)."""

    def __init__(self, root: Path, base: str | None = None) -> None:
        self.root = root.resolve()
        self.base = base
        self._verified: dict[str, Path] = {}

    def find(self, engine_name: str) -> Path | None:
        """The verified version dir `engine_name` names, or None. Blocking (hashes the
        weights on a name's first look-up): call it off the event loop."""
        cached = self._verified.get(engine_name)
        if cached is not None:
            if (cached / MANIFEST_FILE).is_file():
                return cached
            del self._verified[engine_name]  # removed since: never again
            log.info("adapter %s was removed from the volume", engine_name)
            return None
        parsed = parse_engine_name(engine_name)
        if parsed is None:
            return None
        version_dir = self._version_dir(parsed)
        if version_dir is None or not self._verify(engine_name, parsed, version_dir):
            return None
        self._verified[engine_name] = version_dir
        return version_dir

    def _version_dir(self, parsed: EngineName) -> Path | None:
        candidate = self.root / parsed.relative_dir()
        try:
            # A symlink on the volume must not lead outside it either.
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.root) or not real.is_dir():
            log.warning("refusing %s: it leads outside %s", candidate, self.root)
            return None
        return real

    def _verify(self, engine_name: str, parsed: EngineName, version_dir: Path) -> bool:
        return verify_version_dir(engine_name, parsed, version_dir, self.base)


def verify_version_dir(engine_name: str, parsed: EngineName, version_dir: Path, base: str | None) -> bool:
    """Whether `version_dir` holds the version `engine_name` names: its manifest's
    owner, version and uid, its base (if `base`), and its weights' sha256."""
    try:
        manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
        expected_sha = manifest["sha256"]
        if not (version_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(CONFIG_FILE)
        actual_sha = _sha256(version_dir / WEIGHTS_FILE)
    except FileNotFoundError:  # removed while we read, or never complete
        return False
    except (OSError, ValueError, KeyError) as exc:
        log.warning("refusing adapter %s: unreadable manifest or weights (%s)", engine_name, exc)
        return False
    identity = (manifest.get("tenant"), manifest.get("name"), manifest.get("version"), manifest.get("uid"))
    if identity != (parsed.tenant, parsed.name, parsed.version, parsed.uid):
        # The uid is a version's identity: a tenant deleted and created again reuses
        # names and version numbers, never uids.
        log.warning("refusing adapter %s: its manifest names %s", engine_name, identity)
        return False
    if base is not None and manifest.get("base") != base:
        log.warning("refusing adapter %s: validated against %r, not %r", engine_name, manifest.get("base"), base)
        return False
    if actual_sha != expected_sha:
        log.error("refusing adapter %s: weights' sha256 %s, manifest says %s", engine_name, actual_sha, expected_sha)
        return False
    return True


class ObjectStoreCache:
    """Versions downloaded from the object store into a local cache dir, verified.

    `<root>/<engine name>/` holds a verified copy; downloads land in a private temp dir
    beside it first, so no reader (another vLLM process on this cache) sees half of one."""

    def __init__(self, store: AdapterObjectStore, root: Path, base: str | None = None) -> None:
        self.store = store
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.base = base
        self._verified: dict[str, Path] = {}
        # What a process killed in the middle of a discard left (renamed away, never
        # served again). Another process may be removing its own at this moment: both
        # removals tolerate the other.
        for leftover in self.root.glob(f"{_TRASH_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def find(self, engine_name: str) -> Path | None:
        """The verified cached dir of `engine_name`, downloaded first if needed; None if
        the bucket has no such version or what it holds does not verify. Blocking."""
        from tuneserve.adapters.object_store import ObjectStoreError

        parsed = parse_engine_name(engine_name)
        if parsed is None:
            return None
        final = self.root / engine_name  # a checked engine name: one path component
        try:
            stored = self.store.has_version(parsed.tenant, parsed.name, parsed.version)
        except ObjectStoreError as exc:
            stored = None
            log.warning("cannot ask the object store about adapter %s: %s", engine_name, exc)
        if stored is False:
            self._verified.pop(engine_name, None)
            if final.exists():
                log.info("adapter %s was removed from the object store", engine_name)
                self._discard(final)
            return None
        if engine_name in self._verified and final.is_dir():
            return final
        if final.is_dir():  # downloaded by another process, or before a restart
            if verify_version_dir(engine_name, parsed, final, self.base):
                self._verified[engine_name] = final
                return final
            log.warning("discarding the cached copy of %s: it no longer verifies", engine_name)
            self._discard(final)
        if stored is None:
            return None
        try:
            return self._download(engine_name, parsed, final)
        except ObjectStoreError as exc:
            log.warning("cannot download adapter %s: %s", engine_name, exc)
            return None

    def _download(self, engine_name: str, parsed: EngineName, final: Path) -> Path | None:
        from tuneserve.fsutil import OWNER_FILE, owned_temp_dir

        work = owned_temp_dir(self.root, _DOWNLOAD_PREFIX)  # also clears dead processes' leftovers
        try:
            # The manifest first: the version's last upload, and what says whose it is.
            for filename in (MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE):
                if not self.store.download_file(parsed.tenant, parsed.name, parsed.version, filename, work / filename):
                    log.warning("adapter %s: %s is missing from the object store", engine_name, filename)
                    return None
            if not verify_version_dir(engine_name, parsed, work, self.base):
                return None
            (work / OWNER_FILE).unlink(missing_ok=True)
            try:
                os.rename(work, final)
            except OSError:
                # Another process renamed its copy first (a non-empty target): use that.
                if not (final.is_dir() and verify_version_dir(engine_name, parsed, final, self.base)):
                    return None
            self._verified[engine_name] = final
            log.info("adapter %s downloaded from the object store to %s", engine_name, final)
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _discard(self, directory: Path) -> None:
        trash = self.root / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(directory, trash)  # one rename: other readers see all or nothing
        except OSError:
            return  # another process discarded it first
        shutil.rmtree(trash, ignore_errors=True)


class AdapterSources:
    """The volume first (no copy needed), then the object store's cache."""

    def __init__(self, volume: AdapterVolume | None, cache: ObjectStoreCache | None = None) -> None:
        self.volume = volume
        self.cache = cache

    def find(self, engine_name: str) -> Path | None:
        if self.volume is not None:
            found = self.volume.find(engine_name)
            if found is not None:
                return found
        return self.cache.find(engine_name) if self.cache is not None else None


def make_resolver(volume: AdapterVolume | None, cache: ObjectStoreCache | None = None) -> LoRAResolver:
    # vLLM imported here, not at the top: register() runs in every vLLM process, and
    # the module must import without vLLM for the gateway and the tests.
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    sources = AdapterSources(volume, cache)

    class TuneserveLoRAResolver(LoRAResolver):
        def __init__(self) -> None:
            self.sources = sources

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            # Hashing ~10 MB of weights, or downloading them, must not stall vLLM's API
            # event loop.
            version_dir = await asyncio.to_thread(self.sources.find, lora_name)
            if version_dir is None:
                return None
            return LoRARequest(
                lora_name=lora_name,
                lora_int_id=stable_lora_id(lora_name),
                lora_path=str(version_dir),
                base_model_name=base_model_name,
            )

    return TuneserveLoRAResolver()


def object_store_cache_from_env(environ: Mapping[str, str], base: str | None) -> ObjectStoreCache | None:
    """The object store's cache the S3 variables describe; None without a bucket."""
    bucket = environ.get(S3_BUCKET_ENV)
    if not bucket:
        return None
    from tuneserve.adapters.object_store import AdapterObjectStore, S3Location

    location = S3Location(
        bucket,
        environ.get(S3_PREFIX_ENV, ""),
        environ.get(S3_ENDPOINT_URL_ENV) or None,
        environ.get(S3_REGION_ENV) or None,
    )
    cache_dir = Path(environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)
    return ObjectStoreCache(AdapterObjectStore(location), cache_dir, base)


def register() -> None:
    """vLLM's `vllm.general_plugins` hook; runs in every vLLM process, maybe twice."""
    root = os.environ.get(ADAPTERS_DIR_ENV)
    if not root and not os.environ.get(S3_BUCKET_ENV):
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    base = os.environ.get(BASE_ENV) or None
    volume = None
    if root:
        path = Path(root)
        if not path.is_dir():
            # Loud at start-up, not a 404 for every adapter later.
            raise ValueError(f"{ADAPTERS_DIR_ENV}={root} is not a directory (the shared adapter volume)")
        volume = AdapterVolume(path, base)
    cache = object_store_cache_from_env(os.environ, base)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver(volume, cache))
    where = [str(volume.root)] if volume else []
    if cache is not None:
        where.append(f"{cache.store.location.url(cache.store.location.prefix)} (cached in {cache.root})")
    log.info("tuneserve: resolving adapters by engine name from %s", " and ".join(where))
