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

Registered by the `tuneserve_lora_resolver` entry point of `vllm.general_plugins`; a
no-op unless TUNESERVE_ADAPTERS_DIR is set, so other vLLM users of the environment get
nothing. TUNESERVE_ADAPTERS_BASE (optional): the model.name adapters must have been
validated against (the manifest's `base`), so a replica of another base refuses them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneserve.names import is_valid_name

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

# A child of "vllm", so the lines land in vLLM's own log format and level.
log = logging.getLogger("vllm.plugins.tuneserve_lora_resolver")

ADAPTERS_DIR_ENV = "TUNESERVE_ADAPTERS_DIR"
BASE_ENV = "TUNESERVE_ADAPTERS_BASE"
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
        if self.base is not None and manifest.get("base") != self.base:
            log.warning("refusing adapter %s: validated against %r, not %r", engine_name, manifest.get("base"), self.base)
            return False
        if actual_sha != expected_sha:
            log.error("refusing adapter %s: weights' sha256 %s, manifest says %s", engine_name, actual_sha, expected_sha)
            return False
        return True


def make_resolver(volume: AdapterVolume) -> LoRAResolver:
    # vLLM imported here, not at the top: register() runs in every vLLM process, and
    # the module must import without vLLM for the gateway and the tests.
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class TuneserveLoRAResolver(LoRAResolver):
        def __init__(self) -> None:
            self.volume = volume

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            # Hashing ~10 MB of weights must not stall vLLM's API event loop.
            version_dir = await asyncio.to_thread(self.volume.find, lora_name)
            if version_dir is None:
                return None
            return LoRARequest(
                lora_name=lora_name,
                lora_int_id=stable_lora_id(lora_name),
                lora_path=str(version_dir),
                base_model_name=base_model_name,
            )

    return TuneserveLoRAResolver()


def register() -> None:
    """vLLM's `vllm.general_plugins` hook; runs in every vLLM process, maybe twice."""
    root = os.environ.get(ADAPTERS_DIR_ENV)
    if not root:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    path = Path(root)
    if not path.is_dir():
        # Loud at start-up, not a 404 for every adapter later.
        raise ValueError(f"{ADAPTERS_DIR_ENV}={root} is not a directory (the shared adapter volume)")
    volume = AdapterVolume(path, os.environ.get(BASE_ENV) or None)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_resolver(volume))
    log.info("tuneserve: resolving adapters by engine name from %s", volume.root)
