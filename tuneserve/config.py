"""tuneserve configuration: one YAML file, ``TUNESERVE_*`` env overrides, CLI flags.

Precedence (lowest first): model defaults < YAML file < environment < CLI flags.
Environment keys nest with a double underscore: ``TUNESERVE_ENGINES__VLLM__URL``
sets ``engines.vllm.url``. Values from env and flags are parsed as YAML scalars,
so ``true``, ``8000`` and ``[a, b]`` get their natural types before validation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from tuneserve.errors import ConfigError

ENV_PREFIX = "TUNESERVE_"
ENV_CONFIG_FILE = "TUNESERVE_CONFIG"
DEFAULT_MODEL_ID = "smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MetricsConfig(_Section):
    """How /metrics is protected, and how many tenant/adapter label values it may carry.

    Its labels name tenants and their adapters, so an open /metrics would tell anyone
    who reaches the port which adapters exist, which the API never does. Serving it is
    refused with auth enabled unless a token or a separate port protects it (see
    serving/metrics_access.py).
    """

    enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port, on a second listener that serves nothing "
        "else; server.port then answers 404 for /metrics. Default: on server.port.",
    )
    host: str | None = Field(
        None, description="Address of the metrics listener (with port). Default: server.host."
    )
    # SecretStr: neither a printed Settings nor a dump of it shows the token.
    token: SecretStr | None = Field(
        None,
        repr=False,
        description="Bearer token /metrics requires: at least 16 ASCII characters, no "
        "spaces. Prefer token_file, which keeps it out of the environment.",
    )
    token_file: Path | None = Field(
        None,
        description="File holding the bearer token (e.g. a mounted Secret; surrounding "
        "whitespace is ignored). Read at start-up and again whenever the file changes.",
    )
    max_tenant_labels: int = Field(
        50,
        ge=1,
        description="Tenants that get their own `tenant` label value, first come first "
        "served; requests of later ones are labelled tenant `_other`.",
    )
    max_adapter_labels: int = Field(
        200,
        ge=1,
        description="Tenant/adapter pairs that get their own `adapter` label value, first "
        "come first served; requests for later ones are labelled adapter `_other`.",
    )

    @field_validator("token")
    @classmethod
    def _long_token(cls, token: SecretStr | None) -> SecretStr | None:
        # Checked here rather than with min_length, whose message on a SecretStr speaks of "items".
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return token

    @model_validator(mode="after")
    def _one_token_source(self) -> "MetricsConfig":
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        return self


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted; bigger bodies get 413."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Upper bound on one request's total generation time."
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time a client has to send its whole request body, from when the "
        "gateway starts reading it; slower gets 408 and the connection is closed.",
    )
    max_pending_bodies: int = Field(
        64,
        ge=1,
        description="Requests whose bodies are still arriving (adapter uploads included), all "
        "clients together; past it, new requests get 503 `server_busy`, before auth.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log verbosity."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _metrics_port_differs(self) -> "ServerConfig":
        # Requests are told apart by the local port they arrived on, whatever the host.
        if self.metrics.port == self.port:
            raise ValueError("metrics.port must differ from port")
        return self


class ModelConfig(_Section):
    name: str = Field(
        DEFAULT_MODEL_ID,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="Model id clients send in `model` and see in /v1/models.",
    )
    hf_path: Path | None = Field(
        None,
        description="HF model dir (vLLM, training, chat template). "
        "Default: <data_dir>/models/<name>/hf.",
    )
    gguf_path: Path | None = Field(
        None,
        description="GGUF file for llama.cpp. Default: <data_dir>/models/<name>/model.gguf.",
    )
    max_model_len: int = Field(
        2048, ge=64, description="Context length (prompt + completion) on every engine."
    )


class LlamaCppConfig(_Section):
    enabled: bool = Field(True, description="Serve with the embedded llama.cpp engine (CPU).")
    workers: int = Field(
        1, ge=1, le=64, description="Number of llama.cpp model instances, one thread each."
    )
    n_threads: int | None = Field(
        None, ge=1, description="CPU threads per instance. Default: all cores / workers."
    )
    n_batch: int = Field(512, ge=8, description="Prompt-processing batch size.")
    queue_size: int = Field(
        64, ge=1, description="Requests waiting for a worker; beyond this clients get 429."
    )
    max_loras: int = Field(
        8, ge=1, description="GGUF LoRA adapters each llama.cpp instance keeps loaded (LRU)."
    )
    extra_buffer_types: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama.cpp's extra buffer types (weight repacking; AMX on Intel) for every "
        "GGUF load: serving, prepare, export, the quality gate. auto: off on hosts with AMX, "
        "whose Q8_0 matmul segfaults (llama.cpp #20824), on elsewhere.",
    )


class CircuitBreakerConfig(_Section):
    failure_threshold: int = Field(
        3, ge=1, description="Consecutive failures that open the circuit."
    )
    reset_timeout_s: float = Field(
        5.0, gt=0, description="Time an open circuit waits before letting a trial request through."
    )


class VLLMLaunchConfig(_Section):
    enabled: bool = Field(
        False, description="Start and supervise a vLLM server process (else connect to `url`)."
    )
    port: int = Field(8100, ge=1, le=65535, description="Port of the launched vLLM server.")
    python: str | None = Field(
        None, description="Python interpreter with vLLM installed. Default: the gateway's own."
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE for CPU builds (GiB)."
    )
    gpu_memory_utilization: float = Field(
        0.1,
        gt=0,
        le=1,
        description="vLLM --gpu-memory-utilization (on CPU builds: fraction of RAM).",
    )
    dtype: str = Field(
        "auto",
        description="vLLM --dtype. Use float32 for the tiny default model on CPU: "
        "vLLM downcasts it to bf16, where its greedy answers degrade.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="Extra vLLM arguments, e.g. [--enforce-eager] to skip the minutes-long "
        "torch.compile warm-up on CPU.",
    )
    startup_timeout_s: float = Field(
        300.0, gt=0, description="How long to wait for a launched vLLM to become healthy."
    )
    restart_backoff_s: float = Field(
        2.0, ge=0, description="Pause before restarting a vLLM process that exited."
    )


class VLLMConfig(_Section):
    enabled: bool = Field(False, description="Route to a vLLM server first (primary engine).")
    url: str = Field(
        "http://127.0.0.1:8100",
        pattern=r"^https?://",
        description="Base URL of the vLLM OpenAI server (without /v1); ignored when launch.enabled.",
    )
    api_key: str | None = Field(None, description="Bearer key for the vLLM server, if it has one.")
    served_model_name: str | None = Field(
        None, description="Model name vLLM serves. Default: model.name."
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="TCP connect timeout to vLLM.")
    first_byte_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time to wait for vLLM's first byte before falling back to llama.cpp.",
    )
    response_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Time to wait for vLLM's whole answer to a non-streamed request "
        "before falling back to llama.cpp.",
    )
    always_stream: bool = Field(
        False,
        description="Stream from vLLM even when the client does not, so TTFT and "
        "inter-token latency are measured for every request. Off: a non-streamed request "
        "is fetched whole, which costs vLLM less CPU per request.",
    )
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between vLLM health probes.")
    max_connections: int = Field(256, ge=1, description="HTTP connection pool size to vLLM.")
    enable_lora: bool = Field(
        True, description="Serve tenants' LoRA adapters on vLLM (launched with --enable-lora)."
    )
    max_loras: int = Field(4, ge=1, description="vLLM --max-loras: adapters in one batch.")
    max_cpu_loras: int = Field(
        8,
        ge=1,
        description="vLLM --max-cpu-loras, and how many adapters the gateway keeps "
        "registered in vLLM (least recently used idle ones are unloaded).",
    )
    max_lora_rank: int = Field(
        64,
        ge=1,
        description="vLLM --max-lora-rank. vLLM pads every adapter to it: set it to your "
        "adapters' largest rank.",
    )
    breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    launch: VLLMLaunchConfig = Field(default_factory=VLLMLaunchConfig)
    replicas: list[str] = Field(
        default_factory=list,
        description="Base URLs of several vLLM replicas serving the same model (scale-out); "
        "when set, url is ignored. Adapter requests go to a replica chosen by rendezvous "
        "hashing on the adapter's versioned name, bounded by load.",
    )
    discovery: str | None = Field(
        None,
        pattern=r"^dns://[^/:]+:[0-9]+$",
        description="Find the replicas from DNS: dns://HOST:PORT (a Kubernetes headless "
        "Service), every A/AAAA record a replica at http://ADDRESS:PORT; re-resolved every "
        "discovery_interval_s. Overrides url and replicas.",
    )
    discovery_interval_s: float = Field(
        10.0, gt=0, description="Seconds between DNS look-ups of the replicas (discovery)."
    )
    load_bound: float = Field(
        0.5,
        ge=0,
        description="Bounded-load epsilon: an adapter's replica is skipped for the next one in "
        "hash order while its running+waiting requests exceed (1+epsilon) x the mean.",
    )
    adapter_loading: Literal["gateway", "resolver"] = Field(
        "gateway",
        description="How adapters reach vLLM. gateway: this gateway loads them through "
        "/v1/load_lora_adapter and unloads its least recently used (one gateway, one vLLM). "
        "resolver: each vLLM replica loads a versioned name itself through tuneserve's LoRA "
        "resolver plugin from the shared adapter store; gateways never unload (scale-out).",
    )

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> "VLLMConfig":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be at least max_loras (vLLM refuses otherwise)")
        return self

    @model_validator(mode="after")
    def _launch_is_one_replica(self) -> "VLLMConfig":
        if self.launch.enabled and (self.replicas or self.discovery):
            raise ValueError("launch.enabled starts one local vLLM: it cannot be combined with replicas or discovery")
        return self


class EnginesConfig(_Section):
    llamacpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)

    @model_validator(mode="after")
    def _at_least_one(self) -> "EnginesConfig":
        if not (self.llamacpp.enabled or self.vllm.enabled):
            raise ValueError("enable at least one engine (engines.llamacpp or engines.vllm)")
        return self


class AuthConfig(_Section):
    enabled: bool = Field(
        False,
        description="Require an API key (a tenant's, or the admin key) on every request. "
        "When false (dev mode) every request is accepted as admin acting for tenant 'default'.",
    )
    # repr=False keeps the key out of a logged or printed Settings. A short key is
    # rejected here, at start-up, rather than trusted.
    admin_key: str | None = Field(
        None,
        min_length=16,
        repr=False,
        description="Admin API key, at least 16 characters (e.g. the output of "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`). "
        "Default: none, only tenants' keys work.",
    )


class TenantLimits(_Section):
    requests_per_minute: float | None = Field(
        None, gt=0, description="Requests a tenant may start per minute (null: unlimited)."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Prompt + completion tokens per minute (null: unlimited)."
    )
    concurrent_requests: int | None = Field(
        None, ge=1, description="Requests a tenant may have in flight (null: unlimited)."
    )


class RedisLimitsConfig(_Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        pattern=r"^rediss?://",
        repr=False,
        description="Redis holding the limits shared by every gateway (limits.backend redis).",
    )
    key_prefix: str = Field("tuneserve:limits:", description="Prefix of every Redis key.")
    timeout_s: float = Field(
        0.25, gt=0, description="Longest wait for Redis on a request before on_unreachable applies."
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="A concurrency slot's lease, renewed while its request runs: a crashed "
        "gateway's slots come back after this long.",
    )
    on_unreachable: Literal["fail_closed", "local_share"] = Field(
        "fail_closed",
        description="When Redis cannot be reached: fail_closed answers 503; local_share "
        "applies each limit divided by gateways in this process.",
    )
    gateways: int = Field(
        1,
        ge=1,
        description="How many gateways share the limits: under local_share each admits "
        "limit/gateways on its own (concurrency rounded down, at least 1).",
    )


class LimitsConfig(_Section):
    backend: Literal["local", "redis"] = Field(
        "local",
        description="local: limits counted in this process (one gateway). redis: counted in "
        "Redis, held across every gateway.",
    )
    redis: RedisLimitsConfig = Field(default_factory=RedisLimitsConfig)
    default: TenantLimits = Field(default_factory=TenantLimits)
    per_tenant: dict[str, TenantLimits] = Field(
        default_factory=dict,
        description="Overrides by tenant name, e.g. {acme: {requests_per_minute: 600}}.",
    )


class AdaptersS3Config(_Section):
    """Where published adapter versions are also stored, for vLLM replicas without the
    adapter volume. Credentials come from boto3's own chain (AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, a profile, an IAM role), never from this file."""

    bucket: str | None = Field(
        None,
        min_length=3,
        max_length=63,
        description="S3 bucket every published version is uploaded to before it becomes "
        "current (s3://BUCKET/PREFIX/<tenant>/<name>/v<N>/); unset: no object storage.",
    )
    prefix: str = Field(
        "adapters", pattern=r"^[A-Za-z0-9._/-]*$", description="Key prefix of the versions in the bucket."
    )
    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="An S3-compatible server (MinIO, Ceph, ...); unset: AWS S3.",
    )
    region: str | None = Field(None, description="The bucket's region; unset: boto3's default.")


class AdaptersConfig(_Section):
    max_rank: int = Field(
        64,
        ge=1,
        description="Largest LoRA rank an adapter may have (at most engines.vllm.max_lora_rank "
        "when vLLM serves adapters).",
    )
    max_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="Largest adapter, in bytes unpacked; archives are checked while extracting.",
    )
    max_files: int = Field(
        64, ge=1, description="Most files and directories an adapter upload may contain."
    )
    max_concurrent_uploads: int = Field(
        2,
        ge=1,
        description="Adapter uploads a gateway validates and converts at once (each holds "
        "about one float32 copy of its weights); uploads that have arrived wait for a place.",
    )
    max_concurrent_uploads_per_tenant: int = Field(
        1,
        ge=1,
        description="Adapter uploads one tenant (or the admin) may have in progress at once, "
        "arriving or processed; more get 429 `too_many_uploads` before their body is read.",
    )
    upload_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Time a client has to send a whole adapter upload (server.body_timeout_s "
        "is for generation requests); slower gets 408 and the connection is closed.",
    )
    reconcile_interval_s: float = Field(
        10.0,
        gt=0,
        description="How often a gateway unloads from its engines the adapters the registry "
        "no longer serves (removed or replaced from the CLI, or their tenant deleted).",
    )
    base_aliases: list[str] = Field(
        default_factory=lambda: ["HuggingFaceTB/SmolLM2-135M-Instruct"],
        description="Other names of the served base model accepted in an adapter's "
        "base_model_name_or_path (besides model.name and the model's HF path).",
    )
    s3: AdaptersS3Config = Field(default_factory=AdaptersS3Config)


class StoreConfig(_Section):
    url: str | None = Field(
        None,
        pattern=r"^(sqlite:///|postgres(ql)?://)",
        repr=False,
        description="Database of tenants, their key hashes and jobs. Default: SQLite at "
        "<data_dir>/tuneserve.db (one machine; sqlite:///PATH for another file). "
        "postgresql://USER@HOST/DB for several gateways: run `tuneserve db migrate` first, "
        "the gateway refuses a schema that is not its own.",
    )
    url_file: Path | None = Field(
        None,
        description="File holding store.url (a mounted Secret), read at start-up; set it or "
        "store.url, not both.",
    )
    pool_min_size: int = Field(
        1, ge=0, description="PostgreSQL connections kept open per pool (the gateway has two: sync, async)."
    )
    pool_max_size: int = Field(10, ge=1, description="Most PostgreSQL connections per pool.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Wait for a PostgreSQL connection.")


class Settings(_Section):
    data_dir: Path = Field(
        Path("data"), description="Where prepared models, adapters and state live."
    )
    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _adapters_fit_vllm(self) -> "Settings":
        # Caught here, not at an adapter's first request: vLLM refuses to load an
        # adapter above its --max-lora-rank, and the registry would have accepted it.
        vllm = self.engines.vllm
        if vllm.enabled and vllm.enable_lora and self.adapters.max_rank > vllm.max_lora_rank:
            raise ValueError(
                f"adapters.max_rank ({self.adapters.max_rank}) is above "
                f"engines.vllm.max_lora_rank ({vllm.max_lora_rank}): vLLM could not load "
                "every adapter the registry accepts; raise engines.vllm.max_lora_rank "
                "or lower adapters.max_rank"
            )
        return self

    # Paths derived from data_dir keep one place to change the layout.
    def model_dir(self) -> Path:
        return self.data_dir / "models" / self.model.name.replace("/", "--")

    def resolved_hf_path(self) -> Path:
        return self.model.hf_path or self.model_dir() / "hf"

    def resolved_gguf_path(self) -> Path:
        return self.model.gguf_path or self.model_dir() / "model.gguf"

    def vllm_url(self) -> str:
        """A launched vLLM listens locally on launch.port; otherwise engines.vllm.url."""
        vllm = self.engines.vllm
        return f"http://127.0.0.1:{vllm.launch.port}" if vllm.launch.enabled else vllm.url

    def vllm_model_name(self) -> str:
        return self.engines.vllm.served_model_name or self.model.name


# ---------------------------------------------------------------- loading


def iter_fields(
    model: type[BaseModel] = Settings, prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, FieldInfo) for every leaf option, in declaration order."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, key + ".")
        else:
            yield key, info


def env_name(dotted_key: str) -> str:
    return ENV_PREFIX + dotted_key.replace(".", "__").upper()


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{part}' must be a mapping")
        node = child
    node[parts[-1]] = value


def parse_scalar(raw: str) -> Any:
    """Env and flag values are YAML scalars; fall back to the raw string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    known = {env_name(key): key for key, _ in iter_fields()}
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE:
            continue
        key = known.get(name)
        if key is None:
            raise ConfigError(
                f"unknown environment variable {name}: no config key "
                f"'{name[len(ENV_PREFIX):].lower().replace('__', '.')}'"
            )
        _set_dotted(tree, key, parse_scalar(raw))
    return tree


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: Path, what: str = "config file", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); errors name file:line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping of keys")
    return data


def layered_tree(
    config_file: Path | str | None, overrides: Mapping[str, Any] | None, env: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The YAML file, then env (already a tree), then dotted-key flags, each overriding the last."""
    tree: dict[str, Any] = read_yaml_mapping(Path(config_file)) if config_file else {}
    tree = _deep_merge(tree, dict(env or {}))
    flag_tree: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        _set_dotted(flag_tree, key, value)
    return _deep_merge(tree, flag_tree)


def first_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first error of `exc` as (dotted key, message): what a one-line error names."""
    err = exc.errors()[0]
    return ".".join(str(p) for p in err["loc"]), err["msg"]


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {err['msg']}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build validated Settings; raise ConfigError naming each bad key."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_CONFIG_FILE):
        config_file = environ[ENV_CONFIG_FILE]
    tree = layered_tree(config_file, overrides, _env_overrides(environ))
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(config_file or "config"))) from exc
