"""Adapter registry: a real PEFT LoRA of the prepared base, stored, versioned, removed;
every bad upload refused with its reason and nothing left on disk. No mocks."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.support.postgres_server import migrated_store
from tests.support.servers import DATA_DIR, ROOT
from tuneserve.adapters.registry import AdapterNotFound, AdapterRecord, AdapterRegistry, owner_of
from tuneserve.adapters.registry_index import FileIndex
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.config import Settings, load_settings
from tuneserve.tenants.store import TenantNotFound

HF_DIR = DATA_DIR / "models" / "smollm2-135m-instruct" / "hf"
PEFT_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real r=8 LoRA on q_proj/v_proj of the prepared base, as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(HF_DIR))
    # init_lora_weights=False: random B too, so the adapter is not a no-op.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    get_peft_model(model, config).save_pretrained(str(out))
    assert sorted(p.name for p in out.iterdir()) == PEFT_FILES
    return out


def settings_for(data_dir: Path, store_url: str | None = None, **adapters: Any) -> Settings:
    overrides = {"data_dir": str(data_dir), "model.hf_path": str(HF_DIR)}
    if store_url is not None:
        overrides["store.url"] = store_url
    overrides.update({f"adapters.{key}": value for key, value in adapters.items()})
    return load_settings(overrides=overrides, environ={})


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture(params=["files", "postgresql"])
def registry(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[AdapterRegistry]:
    """The registry with its index in files (the embedded default) and in PostgreSQL
    (several gateways): every behaviour below holds for both."""
    if request.param == "files":
        yield AdapterRegistry(settings_for(data_dir))
        return
    dsn = request.getfixturevalue("postgres_dsn")
    migrated_store(dsn).close()
    opened = AdapterRegistry(settings_for(data_dir, store_url=dsn))
    yield opened
    opened.close()


def index_in_files(registry: AdapterRegistry) -> bool:
    return isinstance(registry.index, FileIndex)


def listing(root: Path) -> list[tuple[str, int | None, int]]:
    """Every path under root with its size and mtime: any change shows."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
            entries.append((str(path.relative_to(root)), size, info.st_mtime_ns))
    return sorted(entries)


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def make_tar_gz(adapter: Path, out: Path, top: str | None = "adapter", extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for file in sorted(adapter.iterdir()):
            tar.add(file, arcname=f"{top}/{file.name}" if top else file.name)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def make_zip(adapter: Path, out: Path, top: str | None = "adapter", extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(adapter.iterdir()):
            archive.write(file, f"{top}/{file.name}" if top else file.name)
        for info, data in extra:
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return out


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


# ---------------------------------------------------------------- storing


def check_stored(record: AdapterRecord, registry: AdapterRegistry, peft_adapter: Path, version: int = 1) -> None:
    assert (record.tenant, record.name, record.version) == ("acme", "support", version)
    assert re.fullmatch(rf"acme--support--v{version}--[0-9a-f]{{12}}", record.engine_name)
    assert record.path == registry.root / "acme" / "support" / f"v{version}"
    assert sorted(p.name for p in record.path.iterdir()) == [
        "adapter.gguf", "adapter_config.json", "adapter_model.safetensors", "manifest.json"
    ]
    assert record.gguf_path == record.path / "adapter.gguf"
    assert record.gguf_path.read_bytes()[:4] == b"GGUF"
    weights = (peft_adapter / "adapter_model.safetensors").read_bytes()
    assert (record.path / "adapter_model.safetensors").read_bytes() == weights
    assert record.size_bytes == len(weights)
    import hashlib

    assert record.sha256 == hashlib.sha256(weights).hexdigest()
    assert (record.rank, record.alpha, record.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    manifest = json.loads((record.path / "manifest.json").read_text())
    assert manifest["base"] == "smollm2-135m-instruct"
    assert manifest["sha256"] == record.sha256 and manifest["version"] == version
    # The embedded default points at the current version with a file; PostgreSQL holds it.
    assert (record.path.parent / "current").exists() is index_in_files(registry)
    if index_in_files(registry):
        assert (record.path.parent / "current").read_text() == f"v{version}\n"
    assert registry.get("acme", "support") == record
    # Nothing but the adapter tree is left in the data dir: no temp dirs.
    assert [p.name for p in registry.data_dir.iterdir()] == ["adapters"]


def test_add_from_directory(registry: AdapterRegistry, peft_adapter: Path) -> None:
    record = registry.add("acme", "support", peft_adapter)
    check_stored(record, registry, peft_adapter)
    assert registry.list() == [record]


@pytest.mark.parametrize("top", ["adapter", None], ids=["top-dir", "files-at-root"])
@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_add_from_archive(registry: AdapterRegistry, peft_adapter: Path, tmp_path: Path, kind: str, top: str | None) -> None:
    make = make_tar_gz if kind == "tar.gz" else make_zip
    # The format is recognised by content: an HTTP upload is a temp file without a suffix.
    archive = make(peft_adapter, tmp_path / "upload", top=top)
    check_stored(registry.add("acme", "support", archive), registry, peft_adapter)


def test_new_version_becomes_current(registry: AdapterRegistry, peft_adapter: Path) -> None:
    first = registry.add("acme", "support", peft_adapter)
    second = registry.add("acme", "support", peft_adapter)
    check_stored(second, registry, peft_adapter, version=2)
    assert first.engine_name != second.engine_name
    assert first.path.is_dir()  # older versions stay until the adapter is removed
    assert registry.list("acme") == [second]


def test_list_get_remove(registry: AdapterRegistry, peft_adapter: Path) -> None:
    a = registry.add("acme", "support", peft_adapter)
    b = registry.add("acme", "billing", peft_adapter)
    c = registry.add("globex", "support", peft_adapter)
    assert registry.list() == [b, a, c]  # by tenant, then name
    assert registry.list("acme") == [b, a]
    assert registry.list("initech") == []
    assert registry.get("acme", "nope") is None and registry.get("initech", "support") is None

    registry.add("acme", "support", peft_adapter)  # v2: remove takes every version
    removed = registry.remove("acme", "support")
    assert removed.version == 2
    assert registry.get("acme", "support") is None
    assert not (registry.root / "acme" / "support").exists()
    assert not (registry.root / ".trash").exists()
    assert registry.list() == [b, c]
    with pytest.raises(AdapterNotFound):
        registry.remove("acme", "support")

    # A re-added name continues the numbering: engines never see an old engine_name again.
    again = registry.add("acme", "support", peft_adapter)
    assert again.version == 3 and again.engine_name.startswith("acme--support--v3--")


def test_remove_tenant_takes_every_adapter_and_counter(registry: AdapterRegistry, peft_adapter: Path) -> None:
    old = registry.add("acme", "support", peft_adapter)
    registry.add("acme", "billing", peft_adapter)
    registry.remove("acme", "billing")  # leaves a version counter behind
    kept = registry.add("globex", "support", peft_adapter)
    removed = registry.remove_tenant("acme")
    assert [r.name for r in removed.adapters] == ["support"]
    assert not (registry.root / "acme").exists() and registry.list() == [kept]
    # A tenant of the same name starts afresh: v1 again, yet never an old engine name.
    new = registry.add("acme", "support", peft_adapter)
    assert new.version == 1 and new.engine_name != old.engine_name
    assert registry.add("acme", "billing", peft_adapter).version == 1
    assert owner_of(new.engine_name) == ("acme", "support") and owner_of("vllm-base") is None


def test_remove_tenant_runs_the_table_change_first(registry: AdapterRegistry, peft_adapter: Path) -> None:
    registry.add("acme", "support", peft_adapter)

    def refuse() -> None:
        raise TenantNotFound("no tenant named 'acme'")

    with pytest.raises(TenantNotFound):
        registry.remove_tenant("acme", refuse)
    assert registry.get("acme", "support") is not None  # nothing removed


def test_upload_for_a_deleted_owner_stores_nothing(registry: AdapterRegistry, peft_adapter: Path) -> None:
    def owner_gone() -> None:
        raise TenantNotFound("no tenant named 'acme'")

    with pytest.raises(TenantNotFound):
        registry.add_version("acme", "support", peft_adapter, owner_gone)
    assert registry.get("acme", "support") is None
    # The index in PostgreSQL never needs the adapters dir made for its lock file.
    assert sorted(p.name for p in registry.data_dir.iterdir()) in (["adapters"], [])
    assert _names_in_root(registry) == []


def _names_in_root(registry: AdapterRegistry) -> list[str]:
    if not registry.root.exists():
        return []
    return sorted(p.name for p in registry.root.iterdir() if not p.name.startswith("."))


def test_concurrent_replacements_each_free_what_they_replaced(registry: AdapterRegistry, peft_adapter: Path) -> None:
    """Each upload learns, under the lock, which version it made unaddressable: no
    version in between is left loaded because two uploads both thought they replaced v1."""
    first = registry.add("acme", "support", peft_adapter)
    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(lambda _: registry.add_version("acme", "support", peft_adapter), range(4)))
    by_version = {a.record.version: a for a in added}
    assert sorted(by_version) == [2, 3, 4, 5]
    replaced = {v: a.replaced.version for v, a in by_version.items() if a.replaced is not None}
    assert replaced == {2: 1, 3: 2, 4: 3, 5: 4}
    assert by_version[2].replaced == first


def test_directory_of_symlinks_is_copied(registry: AdapterRegistry, peft_adapter: Path, tmp_path: Path) -> None:
    """An HF cache snapshot is a dir of symlinks to blobs: the files are copied."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in PEFT_FILES:
        (snapshot / name).symlink_to(peft_adapter / name)
    record = registry.add("acme", "support", snapshot)
    check_stored(record, registry, peft_adapter)
    assert not (record.path / "adapter_model.safetensors").is_symlink()


def test_a_job_publishes_from_its_stage(registry: AdapterRegistry, peft_adapter: Path, tmp_path: Path) -> None:
    """A combine job publishes from the dir it is still building, which holds its owner
    record: that one file is skipped, not refused."""
    from tuneserve.fsutil import staged_dir

    with staged_dir(tmp_path / "combined") as stage:
        for name in PEFT_FILES:
            shutil.copy(peft_adapter / name, stage / name)
        check_stored(registry.add("acme", "support", stage), registry, peft_adapter)


@pytest.mark.parametrize(
    "base",
    [
        "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct/",  # alias; trailing slash ignored
        str(HF_DIR) + "/",
        "symlink",  # another path to the same dir
    ],
)
def test_base_model_forms_accepted(data_dir: Path, peft_adapter: Path, tmp_path: Path, base: str) -> None:
    adapter = copy_adapter(peft_adapter, tmp_path / "adapter")
    if base == "symlink":
        (tmp_path / "base-link").symlink_to(HF_DIR)
        base = str(tmp_path / "base-link")
    edit_config(adapter, base_model_name_or_path=base)
    assert AdapterRegistry(settings_for(data_dir)).add("acme", "support", adapter).version == 1


@pytest.mark.parametrize("targets", ["all-linear", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", ["v_proj", "self_attn.q_proj"]])
def test_target_module_forms_accepted(registry: AdapterRegistry, peft_adapter: Path, tmp_path: Path, targets: Any) -> None:
    adapter = copy_adapter(peft_adapter, tmp_path / "adapter")
    edit_config(adapter, target_modules=targets)
    assert registry.add("acme", "support", adapter).target_modules == ["q_proj", "v_proj"]


def test_config_defaults_and_overrides() -> None:
    adapters = load_settings(environ={}).adapters
    assert (adapters.max_rank, adapters.max_bytes, adapters.max_files) == (64, 512 * 1024 * 1024, 64)
    assert adapters.base_aliases == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    env = {"TUNESERVE_ADAPTERS__BASE_ALIASES": "[a/b, c]", "TUNESERVE_ADAPTERS__MAX_RANK": "16"}
    adapters = load_settings(environ=env).adapters
    assert adapters.base_aliases == ["a/b", "c"] and adapters.max_rank == 16


# ---------------------------------------------------------------- rejections


def _save_tensors(path: Path, extra: dict[str, Any]) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.update(extra)
    save_file(tensors, str(path))


def _torch_save(path: Path) -> None:
    import torch

    torch.save({"lora_A": torch.zeros(2, 2)}, path)


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json :-("
    path.write_bytes(bytes(data))


def _gzip_bomb(adapter: Path, tmp: Path) -> Path:
    # 64 MiB of zeros in one member: ~64 KiB compressed, refused on its declared size.
    info = tarfile.TarInfo("adapter/tokenizer.json")
    info.size = 64 << 20

    class Zeros(io.RawIOBase):
        left = info.size

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    out = tmp / "bomb.tar.gz"
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.addfile(info, io.BufferedReader(Zeros()))
    return out


def _pax_bomb(adapter: Path, tmp: Path) -> Path:
    # A 32 MiB PAX header, which tarfile would read into memory whole: refused on the
    # size its header block declares.
    info = tarfile.TarInfo("adapter/README.md")
    info.pax_headers = {"comment": "x" * (32 << 20)}
    out = tmp / "pax.tar.gz"
    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tar:
        tar.addfile(info, io.BytesIO(b""))
    return out


def _zip_bomb(adapter: Path, tmp: Path) -> Path:
    out = tmp / "bomb.zip"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("adapter/tokenizer.json", "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    return out


def _add_lm_head(adapter: Path) -> None:
    import torch

    _save_tensors(adapter / "adapter_model.safetensors", {"base_model.model.lm_head.weight": torch.zeros(4, 4)})


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zip_symlink() -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo("adapter/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


# Each case: (id, how to build the upload from a copy of the good adapter dir, settings
# overrides, expected reason). The builder gets (adapter copy, tmp dir) and returns the
# path to upload.
Build = Callable[[Path, Path], Path]


def in_dir(change: Callable[[Path], Any]) -> Build:
    def build(adapter: Path, tmp: Path) -> Path:
        change(adapter)
        return adapter

    return build


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None]) -> Build:
    return lambda adapter, tmp: make_tar_gz(adapter, tmp / "upload.tar.gz", extra=list(members))


def zip_with(*members: tuple[zipfile.ZipInfo | str, bytes]) -> Build:
    infos = [(zipfile.ZipInfo(m) if isinstance(m, str) else m, data) for m, data in members]
    return lambda adapter, tmp: make_zip(adapter, tmp / "upload.zip", extra=infos)


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda adapter: (adapter / name).write_bytes(data)


def with_raw_key(value_json: str) -> Callable[[Path], None]:
    """Add a key to adapter_config.json as raw JSON text (json.dumps cannot write some)."""
    def change(adapter: Path) -> None:
        path = adapter / "adapter_config.json"
        path.write_text(path.read_text().rstrip().removesuffix("}") + f', "extra": {value_json}}}')

    return change


def tar_gz_of(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_of(*members: tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def _zip_name_not_utf8(adapter: Path, tmp: Path) -> Path:
    # Flagged UTF-8 (the name is not ASCII), then its bytes made invalid UTF-8.
    out = make_zip(adapter, tmp / "u.zip", extra=[(zipfile.ZipInfo("adapter/\u00e9.md"), b"x")])
    out.write_bytes(out.read_bytes().replace("\u00e9".encode(), b"\xff\xfe"))
    return out


# Catastrophic backtracking in `re` (and in the `regex` package) on every module name it
# does not match; fast on those it does (q_proj, v_proj).
CATASTROPHIC_TARGETS = r"(.|.?)+(q|v)_proj"
CATASTROPHIC_KEY = r"(.|.?)+x"
PICKLE_70KB = pickle.dumps(["x" * 70_000, {"lr": 1e-4}])  # past the old sniffer's window


REJECTIONS: list[tuple[str, Build, dict[str, Any], str]] = [
    ("missing-config", in_dir(lambda a: (a / "adapter_config.json").unlink()), {}, "missing_config"),
    ("config-not-json", in_dir(write("adapter_config.json", b"{peft_type: LORA")), {}, "invalid_config"),
    ("config-bad-type", in_dir(lambda a: edit_config(a, r="eight")), {}, "invalid_config"),
    ("wrong-peft-type", in_dir(lambda a: edit_config(a, peft_type="IA3")), {}, "not_lora"),
    ("wrong-base", in_dir(lambda a: edit_config(a, base_model_name_or_path="meta-llama/Llama-2-7b-hf")), {}, "base_mismatch"),
    ("no-base", in_dir(lambda a: edit_config(a, base_model_name_or_path=None)), {}, "base_mismatch"),
    ("rank-too-big", in_dir(lambda a: None), {"max_rank": 4}, "rank_too_large"),
    # The config claims r=4 but the tensors are rank 8: the tensors decide.
    ("tensor-rank-too-big", in_dir(lambda a: edit_config(a, r=4)), {"max_rank": 6}, "rank_too_large"),
    ("unknown-target", in_dir(lambda a: edit_config(a, target_modules=["q_proj", "v_proj", "w_proj"])), {}, "unknown_target_module"),
    ("regex-matches-nothing", in_dir(lambda a: edit_config(a, target_modules=r".*\.qkv")), {}, "unknown_target_module"),
    ("tensor-outside-targets", in_dir(lambda a: edit_config(a, target_modules=["q_proj"])), {}, "invalid_weights"),
    ("regex-not-a-regex", in_dir(lambda a: edit_config(a, target_modules="model.(q_proj")), {}, "invalid_config"),
    ("regex-too-long", in_dir(lambda a: edit_config(a, target_modules="q_proj|" * 100 + "v_proj")), {}, "invalid_config"),
    # Stopped at tenant_regex's budget, in a child process: never minutes in the gateway.
    ("regex-catastrophic", in_dir(lambda a: edit_config(a, target_modules=CATASTROPHIC_TARGETS)), {}, "invalid_config"),
    ("alpha-pattern-catastrophic", in_dir(lambda a: edit_config(a, alpha_pattern={CATASTROPHIC_KEY: 32})), {}, "invalid_config"),
    ("rank-pattern-catastrophic", in_dir(lambda a: edit_config(a, rank_pattern={CATASTROPHIC_KEY: 4})), {}, "invalid_config"),
    ("rank-pattern-counted-repeat", in_dir(lambda a: edit_config(a, rank_pattern={"(?:q{9}){9}_proj": 4})), {}, "invalid_config"),
    ("alpha-pattern-not-a-regex", in_dir(lambda a: edit_config(a, alpha_pattern={"q_proj(": 32})), {}, "invalid_config"),
    ("alpha-nan", in_dir(lambda a: edit_config(a, lora_alpha=float("nan"))), {}, "invalid_config"),
    ("alpha-pattern-infinite", in_dir(lambda a: edit_config(a, alpha_pattern={"q_proj": float("inf")})), {}, "invalid_config"),
    ("rank-pattern-not-a-regex", in_dir(lambda a: edit_config(a, rank_pattern={"[v_proj": 4})), {}, "invalid_config"),
    ("pattern-key-too-long", in_dir(lambda a: edit_config(a, alpha_pattern={"q_proj|" * 100: 32})), {}, "invalid_config"),
    ("pattern-key-with-newline", in_dir(lambda a: edit_config(a, alpha_pattern={"q_proj\n" + "x" * 500: "big"})), {}, "invalid_config"),
    ("config-nested-past-the-stack", in_dir(with_raw_key("[" * 100_000 + "]" * 100_000)), {}, "invalid_config"),
    ("config-nested-too-deep", in_dir(with_raw_key("[" * 40 + "]" * 40)), {}, "invalid_config"),
    ("config-too-large", in_dir(with_raw_key(json.dumps("x" * (300 << 10)))), {}, "invalid_config"),
    ("base-home-of-unknown-user", in_dir(lambda a: edit_config(a, base_model_name_or_path="~unknown-user-7f3a/SmolLM2")), {}, "base_mismatch"),
    ("base-with-nul-byte", in_dir(lambda a: edit_config(a, base_model_name_or_path=str(HF_DIR) + "\x00")), {}, "base_mismatch"),
    ("bin-file", in_dir(write("training_args.bin", pickle.dumps({"lr": 1e-4}))), {}, "pickle_file"),
    ("pt-file", in_dir(lambda a: _torch_save(a / "optimizer.pt")), {}, "pickle_file"),
    # Only an adapter's own files are accepted: anything else is refused by name, whatever it holds.
    ("pickle-renamed", in_dir(write("notes.txt", pickle.dumps({"lr": 1e-4}, protocol=0))), {}, "unexpected_file"),
    ("pickle-opening-with-a-70kB-string", in_dir(write("optimizer.state", PICKLE_70KB)), {}, "unexpected_file"),
    ("text-file-in-dir", in_dir(write("notes.txt", b"hello")), {}, "unexpected_file"),
    ("pickle-as-readme", in_dir(write("README.md", PICKLE_70KB)), {}, "unexpected_file"),
    ("zip-as-readme", in_dir(write("README.md", zip_of(("x.txt", b"x")))), {}, "unexpected_file"),
    ("nested-tar-gz", tar_with(tar_member("adapter/extra.tar.gz", data=tar_gz_of(("x.txt", b"x")))), {}, "unexpected_file"),
    ("nested-zip", zip_with(("adapter/weights.zip", zip_of(("x.txt", b"x")))), {}, "unexpected_file"),
    ("nested-dir-tar", tar_with(tar_member("adapter/checkpoint-10/adapter_config.json", data=b"{}")), {}, "unexpected_file"),
    ("nested-dir-zip", zip_with(("adapter/checkpoint-10/", b"")), {}, "unexpected_file"),
    ("second-top-dir", tar_with(tar_member("other/README.md", data=b"hi")), {}, "unexpected_file"),
    ("files-at-top-and-in-dir", zip_with(("README.md", b"hi")), {}, "unexpected_file"),
    ("dir-beside-files", lambda a, t: make_zip(a, t / "u.zip", top=None, extra=[(zipfile.ZipInfo("adapter/"), b"")]), {}, "unexpected_file"),
    # The weights are checked to be safetensors, not trusted by name.
    ("torch-save-as-safetensors", in_dir(lambda a: _torch_save(a / "adapter_model.safetensors")), {}, "invalid_weights"),
    ("safetensors-header-not-an-object", in_dir(write("adapter_model.safetensors", struct.pack("<Q", 2) + b"[]")), {}, "invalid_weights"),
    ("safetensors-header-past-the-end", in_dir(write("adapter_model.safetensors", struct.pack("<Q", 1 << 40) + b"{}")), {}, "invalid_weights"),
    ("no-weights", in_dir(lambda a: (a / "adapter_model.safetensors").unlink()), {}, "missing_weights"),
    ("corrupt-header", in_dir(lambda a: _corrupt_header(a / "adapter_model.safetensors")), {}, "invalid_weights"),
    ("truncated-weights", in_dir(lambda a: os.truncate(a / "adapter_model.safetensors", 4096)), {}, "invalid_weights"),
    ("non-lora-tensor", in_dir(_add_lm_head), {}, "invalid_weights"),
    # No engine applies DoRA's magnitudes: refused as DoRA (merge it), not left to the converter.
    ("dora-config", in_dir(lambda a: edit_config(a, use_dora=True)), {}, "dora_not_servable"),
    # Passes validation, but the GGUF converter refuses it: nothing may be stored either.
    ("alpha-zero-not-convertible", in_dir(lambda a: edit_config(a, lora_alpha=0)), {}, "conversion_failed"),
    ("too-many-files-dir", in_dir(lambda a: None), {"max_files": 2}, "too_many_files"),
    ("too-many-files-zip", lambda a, t: make_zip(a, t / "u.zip", top=None, extra=[(zipfile.ZipInfo(f"j{i}"), b"x") for i in range(5)]), {"max_files": 4}, "too_many_files"),
    ("too-many-files-tar", lambda a, t: make_tar_gz(a, t / "u.tgz", extra=[tar_member("adapter/", tarfile.DIRTYPE) for _ in range(500)]), {"max_files": 64}, "too_many_files"),
    ("too-large-dir", in_dir(lambda a: None), {"max_bytes": 100_000}, "too_large"),
    ("archive-file-too-large-tar", lambda a, t: make_tar_gz(a, t / "u.tgz"), {"max_bytes": 1_000_000}, "too_large"),
    ("archive-file-too-large-zip", lambda a, t: make_zip(a, t / "u.zip"), {"max_bytes": 1_000_000}, "too_large"),
    # Compressible padding after the real files: refused on the running unpacked total.
    ("too-large-tar", lambda a, t: make_tar_gz(a, t / "u.tgz", extra=[tar_member("adapter/tokenizer.json", data=b" " * (3 << 20))]), {"max_bytes": 4 << 20}, "too_large"),
    ("too-large-zip", lambda a, t: make_zip(a, t / "u.zip", extra=[(zipfile.ZipInfo("adapter/tokenizer.json"), b" " * (3 << 20))]), {"max_bytes": 4 << 20}, "too_large"),
    ("gzip-bomb", _gzip_bomb, {"max_bytes": 4 << 20}, "too_large"),
    ("zip-bomb", _zip_bomb, {"max_bytes": 4 << 20}, "too_large"),
    # Refused on its declared size, before tarfile reads it: even within max_bytes, it is
    # more than one header may make the gateway hold in memory.
    ("pax-header-bomb", _pax_bomb, {"max_bytes": 64 << 20}, "invalid_archive"),
    ("tar-dotdot", tar_with(tar_member("adapter/../../../../evil", data=b"x")), {}, "unsafe_archive"),
    ("zip-dotdot", zip_with(("../../../../evil", b"x")), {}, "unsafe_archive"),
    ("tar-absolute", tar_with(tar_member("/tmp/evil", data=b"x")), {}, "unsafe_archive"),
    ("zip-absolute", zip_with(("/tmp/evil", b"x")), {}, "unsafe_archive"),
    ("tar-symlink", tar_with(tar_member("adapter/link", tarfile.SYMTYPE, linkname="/etc/passwd")), {}, "unsafe_archive"),
    ("zip-symlink", zip_with(_zip_symlink()), {}, "unsafe_archive"),
    ("tar-hardlink", tar_with(tar_member("adapter/link", tarfile.LNKTYPE, linkname="adapter/README.md")), {}, "unsafe_archive"),
    ("tar-fifo", tar_with(tar_member("adapter/fifo", tarfile.FIFOTYPE)), {}, "unsafe_archive"),
    ("tar-char-device", tar_with(tar_member("adapter/null", tarfile.CHRTYPE)), {}, "unsafe_archive"),
    ("tar-duplicate", tar_with(tar_member("adapter/adapter_config.json", data=b"{}")), {}, "unsafe_archive"),
    ("not-an-archive", lambda a, t: write_file(t / "x.zip", b"hello world"), {}, "invalid_archive"),
    ("zip-name-not-utf8", _zip_name_not_utf8, {}, "invalid_archive"),
    ("truncated-tar-gz", lambda a, t: write_file(t / "x.tgz", make_tar_gz(a, t / "f.tgz").read_bytes()[:5000]), {}, "invalid_archive"),
    ("missing-path", lambda a, t: t / "does-not-exist", {}, "invalid_source"),
    ("fifo-in-dir", in_dir(lambda a: os.mkfifo(a / "fifo")), {}, "invalid_source"),
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory, peft_adapter: Path) -> Path:
    """A data dir that already holds acme/support v1, which rejections must not touch."""
    data = tmp_path_factory.mktemp("populated") / "data"
    data.mkdir()
    AdapterRegistry(settings_for(data)).add("acme", "support", peft_adapter)
    return data


@pytest.mark.parametrize(("build", "limits", "reason"), [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS])
def test_rejection_leaves_data_dir_unchanged(
    populated: Path, peft_adapter: Path, tmp_path: Path, build: Build, limits: dict[str, Any], reason: str
) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(populated, data_dir)
    registry = AdapterRegistry(settings_for(data_dir, **limits))
    source = build(copy_adapter(peft_adapter, tmp_path / "adapter"), tmp_path)
    before = listing(data_dir)
    started = time.monotonic()
    with pytest.raises(AdapterRejected) as info:
        registry.add("acme", "support", source)
    assert time.monotonic() - started < 10  # bombs are stopped, not unpacked
    assert info.value.reason == reason, info.value
    assert listing(data_dir) == before
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()
    assert registry.get("acme", "support").version == 1  # type: ignore[union-attr]
    # One line that says what to fix, and names the reason, but no server path.
    assert "\n" not in str(info.value) and f"({reason})" in str(info.value)
    assert str(data_dir) not in str(info.value) and ".adapter-upload-" not in str(info.value)


# Member names the filesystem would refuse, or that are odd: each rejection names the
# member as the tenant wrote it and reveals no path of the server.
ODD_NAMES = [
    "adapter/" + "x" * 300,  # a component longer than NAME_MAX
    "x" * 300 + "/adapter_config.json",  # ... as the top-level dir
    "a/" * 2500 + "README.md",  # a 5000-byte path
    "adapter/README.md\n",
    "adapter/README.md/adapter_config.json",  # under a file of the upload
    "adapter_config.json/README.md",  # a second top-level dir named like a file
    "adapter/ ",
    "adapter/\udcff\udcfe.md",  # bytes that are not UTF-8 (tar keeps them, surrogate-escaped)
]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("name", ODD_NAMES, ids=[f"odd{i}" for i in range(len(ODD_NAMES))])
def test_odd_member_names_reveal_no_server_path(
    registry: AdapterRegistry, data_dir: Path, peft_adapter: Path, tmp_path: Path, kind: str, name: str
) -> None:
    if kind == "zip" and "\udcff" in name:
        pytest.skip("zip names are UTF-8 or cp437: no lone surrogates")
    if kind == "tar.gz":
        upload = make_tar_gz(peft_adapter, tmp_path / "upload", extra=[tar_member(name, data=b"x")])
    else:
        upload = make_zip(peft_adapter, tmp_path / "upload", extra=[(zipfile.ZipInfo(name), b"x")])
    with pytest.raises(AdapterRejected) as info:
        registry.add("acme", "support", upload)
    message = str(info.value)
    assert info.value.reason in {"unexpected_file", "invalid_archive", "unsafe_archive"}, message
    assert repr(name)[:40] in message  # the member, as written (repr: escapes, one line)
    for server_detail in (str(data_dir), str(tmp_path), "/tmp", ".adapter-upload-", "Errno"):
        assert server_detail not in message
    assert "\n" not in message and len(message) < 1000
    assert registry.get("acme", "support") is None
    assert listing(data_dir) == []


def test_an_adapters_own_extra_files_are_accepted_but_not_stored(
    registry: AdapterRegistry, peft_adapter: Path, tmp_path: Path
) -> None:
    """Tokenizer files saved beside the adapter and macOS Finder's __MACOSX metadata
    (skipped, never extracted) do not stop an upload."""
    extra = [
        (zipfile.ZipInfo("adapter/tokenizer_config.json"), b"{}"),
        (zipfile.ZipInfo("adapter/special_tokens_map.json"), b"{}"),
        (zipfile.ZipInfo("adapter/chat_template.jinja"), b"{{ messages }}"),
        (zipfile.ZipInfo("__MACOSX/adapter/._README.md"), b"\x00\x05\x16\x07\x00\x02"),
    ]
    archive = make_zip(peft_adapter, tmp_path / "upload", extra=extra)
    check_stored(registry.add("acme", "support", archive), registry, peft_adapter)


def test_rejection_on_a_fresh_data_dir_leaves_nothing(data_dir: Path, peft_adapter: Path, tmp_path: Path) -> None:
    adapter = copy_adapter(peft_adapter, tmp_path / "adapter")
    edit_config(adapter, peft_type="IA3")
    with pytest.raises(AdapterRejected, match=r"\(not_lora\)"):
        AdapterRegistry(settings_for(data_dir)).add("acme", "support", adapter)
    assert listing(data_dir) == []


def test_an_upload_clears_what_a_killed_upload_left(registry: AdapterRegistry, peft_adapter: Path, data_dir: Path) -> None:
    killed = data_dir / ".adapter-upload-killed"
    (killed / "upload").mkdir(parents=True)
    (killed / "upload" / "adapter_model.safetensors").write_bytes(b"half")
    day_old = time.time() - 24 * 3600
    os.utime(killed, (day_old, day_old))
    live = data_dir / ".adapter-upload-live"  # another process's upload, still going
    live.mkdir()
    registry.add("acme", "support", peft_adapter)
    assert not killed.exists() and live.exists()
    assert not any(p.name.startswith(".adapter-upload-") and p != live for p in data_dir.iterdir())


@pytest.mark.parametrize("tenant", ["Acme", "../acme", "a" * 65, "-x", "a--b", "", "a/b", ".hidden", "acme\n"])
def test_bad_names(registry: AdapterRegistry, peft_adapter: Path, data_dir: Path, tenant: str) -> None:
    registry.add("acme", "support", peft_adapter)
    before = listing(data_dir)
    for call in (
        lambda: registry.add(tenant, "support", peft_adapter),
        lambda: registry.add("acme", tenant, peft_adapter),  # the same rules for adapter names
        lambda: registry.remove(tenant, "support"),
        lambda: registry.remove("acme", tenant),
    ):
        with pytest.raises(AdapterRejected) as info:
            call()
        assert info.value.reason == "invalid_name"
    # Lookups (a request's `model`) find nothing rather than fail; "../acme" finds no path.
    assert registry.get(tenant, "support") is None and registry.get("acme", tenant) is None
    assert registry.list(tenant) == []
    assert listing(data_dir) == before


@pytest.mark.parametrize("name", ["none", "admin", "base"])
def test_label_values_are_reserved_for_new_adapters(registry: AdapterRegistry, peft_adapter: Path, name: str) -> None:
    """An adapter called "base" would share the base model's metrics series."""
    with pytest.raises(AdapterRejected, match="reserved") as info:
        registry.add("acme", name, peft_adapter)
    assert info.value.reason == "invalid_name" and registry.get("acme", name) is None


def test_longest_name_is_accepted(registry: AdapterRegistry, peft_adapter: Path) -> None:
    name = "a" + "b.c_d-" * 10 + "x" * 3
    assert len(name) == 64
    assert registry.add("acme", name, peft_adapter).name == name


# ---------------------------------------------------------------- CLI


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update({"TUNESERVE_DATA_DIR": str(data_dir), "TUNESERVE_MODEL__HF_PATH": str(HF_DIR)})
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "tuneserve.cli.main", "adapters", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )


def test_cli_add_list_remove(data_dir: Path, peft_adapter: Path, tmp_path: Path) -> None:
    archive = make_tar_gz(peft_adapter, tmp_path / "adapter.tar.gz")
    added = run_cli("add", "acme", "support", str(archive), data_dir=data_dir)
    assert added.returncode == 0, added.stderr
    record = json.loads(added.stdout)
    assert record["engine_name"].startswith("acme--support--v1--") and record["rank"] == 8
    assert Path(record["gguf_path"]).is_file()

    listed = run_cli("list", "acme", data_dir=data_dir)
    assert listed.returncode == 0, listed.stderr
    assert [r["engine_name"] for r in json.loads(listed.stdout)] == [record["engine_name"]]

    removed = run_cli("remove", "acme", "support", data_dir=data_dir)
    assert removed.returncode == 0 and json.loads(removed.stdout)["version"] == 1
    assert json.loads(run_cli("list", data_dir=data_dir).stdout) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["add", "acme", "support", "{bad}"], "(not_lora)"),
        (["add", "Acme", "support", "{bad}"], "(invalid_name)"),
        (["remove", "acme", "nope"], "has no adapter 'nope'"),
    ],
)
def test_cli_errors_exit_2_with_one_line(data_dir: Path, peft_adapter: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    bad = copy_adapter(peft_adapter, tmp_path / "bad")
    edit_config(bad, peft_type="IA3")
    result = run_cli(*[a.replace("{bad}", str(bad)) for a in args], data_dir=data_dir)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("tuneserve adapters: error: ") and expected in lines[0]
    # Nothing stored; only the audit log says what was refused.
    assert [entry[0] for entry in listing(data_dir)] == ["audit.log"]
    audit = [json.loads(line) for line in (data_dir / "audit.log").read_text().splitlines()]
    assert [(a["action"], a["result"]) for a in audit] == [("adapter." + ("add" if args[0] == "add" else "delete"), "refused")]
    assert expected.strip("()") in audit[0]["error"]


# -- several machines on one PostgreSQL: the index is shared, the files need not be


@pytest.fixture()
def two_machines(postgres_dsn: str, tmp_path: Path) -> Iterator[tuple[AdapterRegistry, AdapterRegistry]]:
    """Two registries as two gateways on two machines see them: one database, no shared disk."""
    migrated_store(postgres_dsn).close()
    machines = []
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
        machines.append(AdapterRegistry(settings_for(tmp_path / host, store_url=postgres_dsn)))
    yield machines[0], machines[1]
    for machine in machines:
        machine.close()


async def test_what_one_machine_publishes_the_other_finds_at_once(
    two_machines: tuple[AdapterRegistry, AdapterRegistry], peft_adapter: Path
) -> None:
    a, b = two_machines
    first = a.add("acme", "support", peft_adapter)
    assert b.get("acme", "support") == first.model_copy(update={"path": b.root / "acme" / "support" / "v1",
                                                                 "gguf_path": b.root / "acme" / "support" / "v1" / "adapter.gguf"})
    try:
        assert (await b.aget("acme", "support")) == b.get("acme", "support")  # the gateway's async lookup
    finally:
        await b.aclose()  # its async pool belongs to this test's event loop
    assert [r.engine_name for r in b.list()] == [first.engine_name]

    second = b.add("acme", "support", peft_adapter)  # numbered after what the other machine stored
    assert second.version == 2 and a.get("acme", "support").engine_name == second.engine_name  # type: ignore[union-attr]

    a.remove("acme", "support")  # a never held v2's files: removing still works
    assert b.get("acme", "support") is None
    try:
        assert await b.aget("acme", "support") is None
    finally:
        await b.aclose()
    assert b.add("acme", "support", peft_adapter).version == 3  # numbers stay used across machines

    # Neither machine wrote the file index: no pointer files, no lock file.
    for machine in (a, b):
        names = {p.name for p in machine.root.rglob("*")}
        assert not names & {"current", ".removed.json", ".lock"}, names


def test_concurrent_publishes_on_two_machines_never_share_a_version(
    two_machines: tuple[AdapterRegistry, AdapterRegistry], peft_adapter: Path
) -> None:
    """The advisory lock, not a file lock, serialises writers of one tenant across
    machines: each version number is taken once, and each upload frees what it replaced."""
    a, b = two_machines
    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(lambda i: (a, b)[i % 2].add_version("acme", "support", peft_adapter), range(6)))
    by_version = {x.record.version: x for x in added}
    assert sorted(by_version) == [1, 2, 3, 4, 5, 6]
    replaced = {v: x.replaced.version for v, x in by_version.items() if x.replaced is not None}
    assert replaced == {2: 1, 3: 2, 4: 3, 5: 4, 6: 5}
    assert a.get("acme", "support").version == 6  # type: ignore[union-attr]


def test_a_tenant_removed_on_one_machine_is_gone_on_the_other(
    two_machines: tuple[AdapterRegistry, AdapterRegistry], peft_adapter: Path
) -> None:
    a, b = two_machines
    old = a.add("acme", "support", peft_adapter)
    a.add("acme", "support", peft_adapter)  # an older version stays stored, so it stays on disk
    kept = a.add("globex", "support", peft_adapter)
    assert a.sweep_local() == []  # everything on a's disk is stored
    removed = b.remove_tenant("acme")
    assert [r.version for r in removed.adapters] == [2]
    assert [r.engine_name for r in a.list()] == [kept.engine_name]
    # a's disk still holds the removed tenant's weights until its sweep (the gateway's
    # reconciler runs it every adapters.reconcile_interval_s); other tenants' stay.
    assert sorted(p.name for p in a.sweep_local()) == ["v1", "v2"]
    assert not (a.root / "acme").exists() and kept.path.is_dir()
    new = a.add("acme", "support", peft_adapter)
    assert new.version == 1 and new.engine_name != old.engine_name


def test_the_cli_shares_the_index_and_writes_the_audit_trail_to_the_database(
    postgres_dsn: str, tmp_path: Path, peft_adapter: Path
) -> None:
    from tuneserve.audit import DatabaseAuditLog

    store = migrated_store(postgres_dsn)
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path / "cli"), "TUNESERVE_MODEL__HF_PATH": str(HF_DIR),
           "TUNESERVE_STORE__URL": postgres_dsn}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ROOT / ".venv/bin/tuneserve"), "adapters", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    added = cli("add", "acme", "support", str(peft_adapter))
    assert added.returncode == 0, added.stderr
    gateway_side = AdapterRegistry(settings_for(tmp_path / "gateway", store_url=postgres_dsn), store)
    assert gateway_side.get("acme", "support").engine_name == json.loads(added.stdout)["engine_name"]  # type: ignore[union-attr]
    assert cli("remove", "acme", "nope").returncode == 2
    trail = DatabaseAuditLog(store).entries()
    assert [(e["action"], e["target"], e["result"]) for e in trail] == [
        ("adapter.add", "acme/support", "ok"), ("adapter.delete", "acme/nope", "refused")
    ]
    assert trail[0]["version"] == 1 and trail[0]["source"] == "cli" and trail[0]["actor"].startswith("cli:")
    assert not (tmp_path / "cli" / "audit.log").exists()
    store.close()
