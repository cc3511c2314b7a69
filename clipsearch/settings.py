"""The one typed settings object: defaults < YAML file < environment (CLIPSEARCH_*).

Nested groups use a double underscore in the environment, e.g.
`CLIPSEARCH_ENCODER__MAX_BATCH_SIZE=16` or `CLIPSEARCH_INDEX__SHARDS=4`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_MODEL = "demo"
"""Model name that resolves to the bundled demo model directory."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderSettings(_Group):
    """The Ray Serve encoder deployment."""

    model: str = Field(DEMO_MODEL, description="Hub id, local directory, or 'demo' (bundled).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the model runs.")
    dtype: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        "fp32",
        description="Inference precision: fp32; bf16 (CPU or GPU); fp16 (GPU only); int8 = "
        "dynamic quantisation of the linear layers (CPU only).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads per replica; 0 = the machine's cores / replicas.",
    )
    concurrent_batches: int = Field(
        0,
        ge=0,
        le=64,
        description="Batches one replica runs at once; 0 = auto (CPU: min(2, torch threads), "
        "GPU: 1). A forward running alone gets every torch thread, concurrent ones share them, "
        "so a busy neighbour process slows one single-threaded forward instead of stalling a "
        "multi-threaded one at every OpenMP barrier.",
    )
    omp_spin_count: int = Field(
        3000,
        ge=0,
        le=10_000_000,
        description="How long the replica's idle OpenMP threads spin before they sleep, in "
        "libgomp spin rounds (about 100 per microsecond); 0 = sleep at once "
        "(OMP_WAIT_POLICY=PASSIVE). A short spin keeps a lone forward's threads awake between "
        "its parallel regions (fp32 ViT-B/32 image, 2 threads: ~8 ms faster than sleeping); "
        "on a host whose cores are busy with other processes, 0 wastes none of them.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Largest batch the model sees.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=1, description="How long a batch waits to fill before it runs."
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests one replica accepts at once. Must be >= max_batch_size, or "
        "batches can never fill (Ray Serve's default of 5 would cap them at 5).",
    )
    max_queued_requests: int = Field(
        1024,
        ge=1,
        description="Requests waiting for a free replica slot; past it a call fails fast "
        "with RESOURCE_EXHAUSTED instead of queueing without bound.",
    )
    replicas: int = Field(1, ge=1, description="Encoder replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica.")
    prompt_template: str = Field(
        "{}", description='Default template for text queries, e.g. "a photo of {}".'
    )
    long_text: Literal["truncate", "sliding_window", "reject"] = Field(
        "truncate", description="What to do with texts longer than the model's context."
    )
    sliding_window_stride: int = Field(
        0,
        ge=0,
        description="sliding_window: tokens between window starts; 0 = half the window. "
        "The last window always reaches the end of the text.",
    )
    multiscale_sizes: tuple[int, ...] = Field(
        (),
        description="Extra image resolutions (e.g. [336]) whose embeddings are averaged with "
        "the model-resolution one and re-normalised. Empty: off.",
    )
    reducing_gap: float = Field(
        0.0,
        ge=0,
        le=64,
        description="0: every image is preprocessed exactly as the checkpoint's processor "
        "does. N >= 1: a large image is first shrunk, by JPEG DCT scaling while decoding "
        "and then by box averaging, as far as its short side stays >= N x the model's "
        "resolution, and the processor resizes the rest of the way (Pillow's reducing_gap): "
        "a 12 MP JPEG takes ~1/3 of the exact path's CPU, its pixels within a few levels of "
        "the exact path's (bench/intake.py). Images under 2N x the resolution are unaffected.",
    )
    cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="Embedding cache capacity in bytes; 0 disables it."
    )

    @field_validator("reducing_gap")
    @classmethod
    def _gap_off_or_at_least_one(cls, gap: float) -> float:
        if 0 < gap < 1:
            raise ValueError("must be 0 (exact preprocessing) or >= 1")
        return gap


class IndexSettings(_Group):
    """The Faiss shard actors."""

    shards: int = Field(2, ge=1, le=256, description="Number of shard actors.")
    factory: str = Field(
        "Flat",
        description="Faiss index factory string, inner-product metric: Flat, IVF{n},Flat, "
        "HNSW{M}, IVF{n},PQ{m}, IVF{n},PQ{m}x4fs, IVF{n},RaBitQ, IVF{n},SQ8. A shard starts "
        "exact and switches to this type in the background once it can be trained.",
    )
    nlist_scope: Literal["shard", "collection"] = Field(
        "shard",
        description="What n in IVF{n} counts: `shard` = the lists of each shard's index (every "
        "shard builds IVF{n}); `collection` = lists over all shards (each builds "
        "IVF{n / shards}, so a list holds as many vectors as in one unsharded index). Either "
        "way each shard tunes its own nprobe / re-rank depth to target_recall.",
    )
    train_min_vectors: int = Field(
        0,
        ge=0,
        description="Vectors a modality index must hold before the configured ANN type is "
        "trained; 0 = automatic (enough for the type's centroids / codebooks).",
    )
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@k the search-parameter tuner aims for."
    )
    tune_k: int = Field(10, ge=1, le=1000, description="k at which the tuner measures recall.")
    hnsw_ef_construction: int = Field(
        128,
        ge=0,
        le=4096,
        description="HNSW candidate list while linking new vectors; 0 = Faiss's default (40). "
        "Higher builds slower and a better graph: at 1M clustered 512-d vectors, 40 tops out "
        "at recall@10 0.875 whatever efSearch, 128 reaches 0.979 (build 2.5x longer).",
    )
    snapshot_every: int = Field(
        10_000, ge=1, description="Log records after which a shard writes a new snapshot."
    )
    search_channel: bool = Field(
        True,
        description="A gateway on the same node as a shard sends it searches over a private "
        "Unix socket (Linux; same user only) instead of a Ray actor call: about 1.5 ms less "
        "per search. Writes and everything else still go through Ray; off = Ray calls only.",
    )
    build_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="Threads a background rebuild (training, filling, tuning) gives Faiss; "
        "0 = the CPUs this process may use minus one, at least 1, leaving a core to the "
        "searches that go on meanwhile. Searches always run single-threaded: one query gains "
        "nothing from a thread team, and a team stalls at every barrier while one of its "
        "threads is descheduled (measured on 2 busy cores: p90 8 ms vs 0.3 ms per search).",
    )
    use_gpu: bool = Field(
        False, description="Move exact and IVF indexes to the GPU (needs faiss-gpu and a GPU)."
    )
    actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each shard actor requests, e.g. "
        '{"clipsearch_index": 1}: pins shards to the nodes that declare them (on Kubernetes '
        "the index worker group, which mounts the shard volume). Empty: any node.",
    )


class LimitSettings(_Group):
    """Request limits enforced at the gateway (documented in the protos)."""

    max_top_k: int = Field(1000, ge=1)
    max_text_bytes: int = Field(4096, ge=1)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(25_000_000, ge=1)
    max_id_bytes: int = Field(256, ge=1)
    max_metadata_entries: int = Field(32, ge=0)
    max_metadata_key_bytes: int = Field(64, ge=1)
    max_metadata_value_bytes: int = Field(256, ge=0)
    max_filter_entries: int = Field(16, ge=0)
    max_upsert_documents: int = Field(256, ge=1)
    max_ids_per_call: int = Field(1024, ge=1)
    max_encode_items: int = Field(64, ge=1)
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class AuthSettings(_Group):
    """Bearer tokens in the `authorization` metadata, each with roles: `read` (Search, Get,
    EncodeText, EncodeImage), `write` (Upsert, Delete), `admin` (AdminService). Health and
    reflection stay open. Tokens are kept only as sha256 digests and compared in constant time.
    """

    enabled: bool | None = Field(
        None,
        description="Require a token; None = on exactly when tokens are configured. Auth may "
        "be off only on a loopback host unless gateway.allow_insecure is set.",
    )
    tokens_file: Path | None = Field(
        None,
        description="File of `<sha256 hex of token> <roles, comma-separated> [name]` lines "
        "(`python -m gateway.auth new --roles read` prints a token and its line).",
    )
    tokens: SecretStr = Field(
        SecretStr(""),
        description="Plain tokens, e.g. from a secret in the environment: "
        "`read,write=TOKEN;admin=TOKEN2` (hashed at start, never logged).",
    )


class TlsSettings(_Group):
    """TLS on the gateway port; a client CA turns on mutual TLS."""

    cert_file: Path | None = Field(None, description="Server certificate chain (PEM).")
    key_file: Path | None = Field(None, description="Server private key (PEM).")
    client_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) clients must present a certificate from (mTLS)."
    )


class AdmissionSettings(_Group):
    """Calls in flight at once per method class; past the bound a call fails at once with
    RESOURCE_EXHAUSTED instead of queueing (0 = unbounded)."""

    read: int = Field(256, ge=0, description="Search, Get, EncodeText, EncodeImage.")
    write: int = Field(64, ge=0, description="Upsert, Delete.")
    admin: int = Field(16, ge=0, description="AdminService.")


class ObservabilitySettings(_Group):
    """Metrics, logs and tracing."""

    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics over HTTP; None = off, 0 = any."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")
    json_logs: bool = Field(False, description="One JSON object per log line.")
    otlp_endpoint: str = Field(
        "", description="OpenTelemetry OTLP endpoint for traces; empty = tracing off."
    )


class GatewaySettings(_Group):
    """The gRPC gateway."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(50051, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    default_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for calls whose client set none."
    )
    grace_s: float = Field(5.0, ge=0, description="How long shutdown waits for in-flight calls.")
    health_interval_s: float = Field(
        5.0, gt=0, description="How often health re-runs its canary encode and searches."
    )
    health_timeout_s: float = Field(
        2.0, gt=0, description="A canary slower than this counts as a failed canary."
    )
    health_failures: int = Field(
        3,
        ge=1,
        description="Failed canaries in a row (the encoder, or one shard) before the services "
        "needing it turn NOT_SERVING: a check re-probes a failing part at once, each try "
        "taking at least health_timeout_s, so one slow canary on a busy machine flips "
        "nothing while a stuck or dead part shows within about health_interval_s + "
        "health_failures x health_timeout_s. The first canary that answers turns it back "
        "to SERVING. 1 = the first failure counts.",
    )
    allow_insecure: bool = Field(
        False,
        description="Allow binding a non-loopback host with neither auth nor TLS (refused "
        "otherwise).",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="A second, plaintext port on `host` serving only grpc.health.v1, for "
        "Kubernetes' gRPC probe (which cannot speak TLS or send a token). None = off, 0 = a "
        "free port. It answers health checks and nothing else.",
    )
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    admission: AdmissionSettings = AdmissionSettings()
    observability: ObservabilitySettings = ObservabilitySettings()


class Settings(BaseSettings):
    """Everything clipsearch can be told, with its default."""

    model_config = SettingsConfigDict(
        env_prefix="CLIPSEARCH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    ray_address: str = Field(
        "local",
        description="Ray runtime: 'local' starts an embedded one for this process; 'auto' "
        "joins the cluster of the Ray node on this machine (a gateway pod on Kubernetes, see "
        "k8s/README.md); 'HOST:PORT' joins that head. On a cluster the first gateway creates "
        "the encoder app and the shard actors (detached: they outlive it) and later gateways "
        "attach to them by name; stopping a gateway leaves them running.",
    )
    data_dir: Path = Field(
        Path("clipsearch-data"),
        description="Where state is kept: one folder per shard with its write-ahead log.",
    )
    demo_corpus: int = Field(
        600, ge=0, description="Generated demo documents loaded at start when the index is empty."
    )
    encoder: EncoderSettings = EncoderSettings()
    index: IndexSettings = IndexSettings()
    limits: LimitSettings = LimitSettings()
    gateway: GatewaySettings = GatewaySettings()


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from an optional YAML file, the environment and explicit overrides.

    Precedence (highest first): overrides, environment, YAML file, defaults.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path.name}: the top level must be a mapping")
        file_values = loaded
    env = Settings()
    merged = _deep_merge(file_values, env.model_dump(exclude_unset=True))
    return Settings.model_validate(_deep_merge(merged, overrides))


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
