"""Service settings, read from ``GRAFT_*`` environment variables with embedded defaults.

The defaults run the whole service on one machine with nothing installed beside
it: a SQLite registry and a blob folder under ``./var``, and the device picked
automatically (CUDA when present, else CPU).
"""

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.monitoring import DEFAULT_WINDOW
from service.engine.runtimes import RUNTIMES, Precision
from service.webhooks.addresses import parse_networks

MIN_ADMIN_KEY_CHARS = 32  # 'openssl rand -hex 32' gives 64
MIN_KEY_DISTINCT_CHARS = 8  # refuses 'aaaa...' and short patterns repeated to length


class WeakKeyError(Exception):
    """A configured key is guessable. Not a ValueError: pydantic would echo the key in its message."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root folder for blobs, feature cache and the SQLite registry.")
    registry_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/registry.db.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    default_backbone: str = Field(
        "mobilenet_v2",
        description="The backbone of a training job or label audit that names none; one of GRAFT_BACKBONES.",
    )
    backbones: list[str] = Field(
        ["mobilenet_v2", "efficientnet_lite2"], description="Backbones to load, e.g. '[\"mobilenet_v2\"]'."
    )
    weights_dir: Path | None = Field(None, description="Extra folder with pinned checkpoints (a Bento's model).")
    trunk_runtime: str = Field(
        "auto",
        description="What runs the frozen trunks: 'auto' measures every runtime within tolerance of torch at "
        "start-up and keeps the fastest; a name from the runtime registry keeps that one (refused at start-up "
        "if it cannot serve).",
    )
    trunk_precision: Precision | None = Field(
        None,
        description="What the trunks compute in; unset: fp32 on a CPU, bf16 (else fp16) on CUDA. Reduced precision "
        "changes the features (heads are trained on the same ones); int8 is calibrated on photos graft ships.",
    )
    trunk_cache_dir: Path | None = Field(
        None, description="Where exported trunk graphs are kept between starts; unset: ~/.cache/graft/trunks."
    )

    # Upload limits: every one of them is checked before anything is stored.
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="Decompression-bomb guard (width x height).")
    max_images_per_dataset: int = Field(50_000, gt=0)
    max_upload_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        description="Largest dataset upload: the HTTP body as sent, and the images' total bytes (a zip's entries "
        "uncompressed; a gRPC stream's images).",
    )

    # Serving.
    max_batch_size: int | None = Field(
        None, gt=0, description="Images per serving batch; unset: the device's (8 on CPU, 32 on a GPU)."
    )
    trunk_workers: int | None = Field(
        None, gt=0, description="Batches run at once per backbone; unset: one per torch thread on CPU, 1 on GPU."
    )
    max_latency_ms: float = Field(2.0, ge=0, description="Longest wait for a batch to fill after its first image.")
    max_queue_images: int = Field(
        1024,
        gt=0,
        description="Images one worker works on at once, all backbones together: counted from admission (after the "
        "tenant's rate quota) until answered (decoding, queued or in a batch). A prediction that would pass it is "
        "refused with 'resource exhausted' (HTTP 429 before its body is read; gRPC RESOURCE_EXHAUSTED). Also each "
        "backbone's batcher queue limit.",
    )
    head_cache_bytes: int = Field(1 << 30, gt=0, description="Memory for loaded heads (LRU).")
    max_images_per_request: int = Field(64, gt=0, description="Images in one prediction request.")
    max_heads_per_request: int = Field(16, gt=0, description="Head references in one prediction request.")
    max_export_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Largest model file (ONNX or pt2) one export may build: the backbone up to the heads' deepest "
        "split point plus every head's weights, checked before anything is loaded (the build holds a few times it).",
    )
    max_waiting_exports: int = Field(
        3,
        ge=0,
        description="Model exports (ONNX or pt2) that wait their turn on one replica behind the one running: exports "
        "run one at a time, each taking seconds of every core. More are refused with 'resource exhausted' and a "
        "retry hint; one tenant holds at most one running and one waiting.",
    )

    # gRPC door.
    grpc_port: int = Field(50051, ge=0, le=65535, description="Port of the gRPC server (0: any free port).")
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest gRPC message either way.")
    grpc_tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the gRPC port: set with GRAFT_GRPC_TLS_KEY_FILE, the port speaks TLS "
        "only (clients use grpcs://); unset: plaintext, for TLS ended at a load balancer or a private network.",
    )
    grpc_tls_key_file: Path | None = Field(None, description="PEM private key of GRAFT_GRPC_TLS_CERT_FILE.")

    # A worker's thread pools, one per kind of work, so that no kind can take the threads another needs.
    store_threads: int = Field(
        8,
        gt=0,
        description="Registry and storage calls one worker runs at once, off its event loop (the batcher's): "
        "reads and writes of datasets, heads, jobs and idempotency keys, and the blob collector.",
    )
    upload_threads: int = Field(
        4,
        gt=0,
        description="Dataset images one worker validates and stores at once, all uploads of both doors together; "
        "a streaming upload takes a thread only while one of its images is stored, never while its client is slow.",
    )

    # Training.
    feature_batch_size: int = Field(
        16, gt=0, description="Images per trunk pass when extracting features (serving may cut in between)."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="CPU threads for torch on a CPU device; default: the cores this process may run on."
    )
    max_concurrent_jobs: int = Field(1, ge=1, description="Training jobs run at once per worker; the rest wait queued.")

    # Batch predictions (service/batch): heads x a stored dataset, run in the background below online predictions.
    max_concurrent_batch_predictions: int = Field(
        1, ge=1, description="Batch prediction jobs run at once per worker; the rest wait queued."
    )
    batch_chunk_images: int = Field(
        256,
        gt=0,
        description="Images per checkpoint of a batch prediction: a job resumed on another replica redoes at most "
        "this many; a cancel takes effect at the next one.",
    )
    max_batch_prediction_images: int = Field(
        100_000, gt=0, description="Most images (dataset examples) one batch prediction job may predict."
    )
    max_batch_prediction_heads: int = Field(8, gt=0, description="Most head references one batch prediction may name.")
    quota_batch_predictions: int = Field(
        20, gt=0, description="Batch predictions kept per tenant, in any state (finished ones hold their results)."
    )
    batch_results_ttl_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="How long a finished batch prediction and its results are kept before they are deleted.",
    )

    # Bounds on what one request can make the server hold or do (docs/architecture.md, decision 8, "No tenant can hurt
    # another"): each is checked before the work, from sizes and counts, never after buffering.
    max_classes: int = Field(1000, ge=2, description="Most classes a dataset (and so a head) may have.")
    max_label_updates: int = Field(
        1000, gt=0, description="Most examples one label call (PATCH or :batchUpdate) may change; bigger: import."
    )
    max_label_import_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="Largest CSV of file,label rows one label import (:importLabels) may send; it is parsed whole.",
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest multipart prediction body (POST /v1/predict:upload): its parser streams, part by part.",
    )
    max_json_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        description="Largest JSON request body (POST /v1/predict with base64 images, jobs, aliases, admin calls). "
        "JSON is parsed and validated in one piece on the worker's event loop, a few ms per MB during which no "
        "other call moves: larger prediction batches go as multipart (/v1/predict:upload) or over gRPC.",
    )
    max_inflight_upload_bytes: int = Field(
        1024 * 1024 * 1024, gt=0, description="Bytes all uploads in progress may hold at once, across tenants."
    )
    upload_timeout_s: float = Field(600.0, gt=0, description="An upload (HTTP body or gRPC stream) must end within.")
    max_audit_seconds: float = Field(
        300.0,
        gt=0,
        description="Wall-clock limit of one label audit (feature extraction included: what it computed stays "
        "cached, so asking again goes on from there); past it the audit fails with 'deadline exceeded' and frees "
        "the replica's audit slot. An audit also stops when its caller goes away.",
    )
    max_concurrent_audits: int = Field(
        1,
        ge=1,
        description="Label audits one worker runs at once, all tenants together (each may extract features with the "
        "trunk and fit k probes); one more is refused with 'resource exhausted' (429) and a retry hint.",
    )
    max_watches_per_tenant: int = Field(
        16,
        gt=0,
        description="Job watches (HTTP :watch event streams and gRPC WatchJob, together) one tenant may have open on "
        "one replica; more are refused with 'resource exhausted' (429) until one ends.",
    )

    # Replica roles: one image, run as serving replicas and training replicas that share the registry and data.
    role: Literal["both", "serve", "train"] = Field(
        "both",
        description="What this replica does. 'both': serves predictions and runs training jobs (the default: one "
        "replica, or replicas all alike). 'serve': serves predictions and the whole API (jobs too are created, "
        "listed, watched and cancelled), but never claims a training job, so training never competes with serving "
        "for its cores. 'train': claims and runs training jobs and answers the API except predictions: it is "
        "never ready (/readyz 503, gRPC health NOT_SERVING) and refuses predictions with 'unavailable'. Jobs run "
        "only where a 'both' or 'train' replica is up.",
    )

    # Jobs across replicas: claimed from the database under a lease.
    job_lease_s: float = Field(30.0, gt=0, description="A running job's lease; its replica renews it every third.")
    max_job_attempts: int = Field(3, ge=1, description="Runs of one job (after replica deaths) before it fails.")
    max_job_seconds: float = Field(3600.0, gt=0, description="Wall-clock limit of one job run.")
    max_job_work: int = Field(50_000_000, gt=0, description="Bound on epochs x training images x trials of one job.")
    max_job_memory_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Bound on the trunk features one job holds in the replica's memory: images x values per image at "
        "its split point (a fine-tune's block maps are 6 to 15 times the pooled vectors) x 4 bytes x 3 copies. "
        "Checked when the job is created and again when a replica starts it; the default suits a 4-8 GiB replica.",
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM: time to finish in-flight work.")

    # Per-tenant quotas, enforced over both doors.
    quota_stored_bytes: int = Field(2 * 1024**3, gt=0, description="Dataset images + head weights per tenant.")
    quota_feature_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="Cached trunk features per tenant; over it, its least recently used features are evicted.",
    )
    quota_datasets: int = Field(100, gt=0, description="Datasets per tenant.")
    quota_heads: int = Field(100, gt=0, description="Head names per tenant.")
    quota_head_versions: int = Field(1000, gt=0, description="Stored head versions per tenant, all heads.")
    quota_queued_jobs: int = Field(20, gt=0, description="Queued + running jobs per tenant.")
    quota_predict_images_per_s: float = Field(200.0, gt=0, description="Sustained prediction rate per tenant.")
    quota_predict_burst: int = Field(400, gt=0, description="Images a tenant may predict in one burst.")

    # Storage housekeeping.
    blob_grace_s: float = Field(
        3600.0, gt=0, description="Unreferenced blobs younger than this are kept (uploads in flight)."
    )
    gc_interval_s: float = Field(600.0, gt=0, description="How often a replica collects orphaned blobs.")

    # Tenancy.
    auth: Literal["keys", "open"] = Field(
        "keys",
        description="'keys': every call needs an API key; 'open': no keys, every caller is tenant "
        "'default' (local development only).",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Bearer key for the admin endpoints (tenants, API keys); unset disables them. At least "
        f"{MIN_ADMIN_KEY_CHARS} characters, not a repeated pattern: generate it with 'openssl rand -hex 32'.",
    )
    metrics_key: SecretStr | None = Field(
        None,
        description="Bearer key that Prometheus sends to read /metrics; unset: /metrics answers only in open mode. "
        "Kept apart from the admin key so that the scraper cannot manage tenants.",
    )
    auth_failures_burst: int = Field(
        20, gt=0, description="Failed authentications a client address may make at once (then 429 + Retry-After)."
    )
    auth_failures_per_minute: float = Field(
        10.0, gt=0, description="Failed authentications a client address may make per minute, sustained."
    )
    admin_calls_per_minute: float = Field(
        120.0, gt=0, description="Admin calls one client address may make per minute (burst: the same number)."
    )
    key_recheck_s: float = Field(60.0, gt=0, description="Open streams re-check their API key this often.")

    # Idempotency keys of creating calls (HTTP Idempotency-Key header, gRPC idempotency-key metadata).
    idempotency_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="How long a creating call's idempotency key is remembered: a repeat within it "
        "answers the resource the first call created.",
    )
    idempotency_keys_per_tenant: int = Field(
        10_000, gt=0, description="Idempotency keys remembered per tenant; past it the oldest are forgotten first."
    )

    # What serving observes (service/monitoring.py): shadow comparisons, prediction ids for feedback, monitoring.
    monitor_flush_s: float = Field(
        2.0,
        gt=0,
        description="How often a replica adds what it observed (comparisons, prediction records, monitoring "
        "counts) to the registry database; reading :compare, :monitor or sending feedback flushes first.",
    )
    prediction_ttl_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long a prediction id can be given feedback (its true label) after the prediction.",
    )
    max_prediction_records: int = Field(
        100_000,
        gt=0,
        description="Prediction records (for feedback) kept per tenant; past it the oldest are dropped first.",
    )
    monitor_max_pending: int = Field(
        100_000,
        gt=0,
        description="Observations (images compared or recorded) one replica holds between two flushes, all tenants "
        "together; past it the rest of that interval goes unrecorded (its predictions are still answered).",
    )

    monitoring: bool = Field(
        True,
        description="Monitor every head version served: each image's OOD score against the version's training "
        "features and, per window of GRAFT_MONITOR_WINDOW images, label counts, confidences and a drift test "
        "(GET .../versions/{version}:monitor). Off: no embeddings are kept and no windows written.",
    )
    monitor_window: int = Field(
        DEFAULT_WINDOW,
        ge=2,
        le=10_000,
        description="Images per monitoring window of one head version on one replica; a full window is closed, "
        "drift-tested and written to the registry.",
    )
    monitor_windows_kept: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Closed monitoring windows kept per head version (all replicas'), the newest.",
    )
    monitor_max_versions: int = Field(
        64,
        ge=1,
        description="Head versions one replica keeps a monitoring window open for (least recently served beyond "
        "it: its open window is dropped), and closed windows it holds until the next flush. Each window holds up "
        "to GRAFT_MONITOR_WINDOW embeddings, GRAFT_MONITOR_WINDOW x D x 4 bytes (512 KB at 100 x 1280), so the "
        "memory bound is 2 x this x that (64 MB by default).",
    )

    # Webhooks (service/webhooks, docs/webhooks.md): signed POSTs of a tenant's events to its endpoints.
    webhook_allowed_networks: str = Field(
        "",
        description="Networks (CIDRs, comma-separated, e.g. '10.1.2.0/24,127.0.0.1/32') webhooks may be sent to "
        "beyond the public internet. Empty: loopback, private (RFC 1918, fc00::/7), link-local (169.254.169.254 "
        "included), multicast, unspecified and reserved addresses, IPv4-mapped or not, are refused, at "
        "registration and at every delivery.",
    )
    max_webhooks_per_tenant: int = Field(10, gt=0, description="Webhook endpoints one tenant may register.")
    webhook_timeout_s: float = Field(
        5.0, gt=0, le=60, description="One delivery's time to connect, send and get its response status."
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=50, description="Tries of one delivery (the first included) before it is marked failed."
    )
    webhook_backoff_s: float = Field(
        10.0, gt=0, description="Wait before a delivery's first retry; each later one waits twice the one before."
    )
    webhook_max_backoff_s: float = Field(3600.0, gt=0, description="The longest wait between two tries.")
    webhook_poll_s: float = Field(1.0, gt=0, description="How often a replica looks for deliveries due.")
    webhook_lease_s: float = Field(
        60.0, gt=0, description="How long a replica holds a delivery it claimed; past it another replica may send it."
    )
    webhook_senders: int = Field(4, ge=1, le=64, description="Deliveries one replica sends at once.")
    webhook_deliveries_kept: int = Field(
        1000,
        gt=0,
        description="Deliveries (the log, pending ones included) kept per endpoint, the newest; older ones are "
        "dropped as new events come.",
    )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)
        return value

    @field_validator("trunk_runtime")
    @classmethod
    def _a_registered_runtime(cls, value: str) -> str:
        if value != "auto" and value not in RUNTIMES:
            raise ValueError(f"GRAFT_TRUNK_RUNTIME must be 'auto' or one of {sorted(RUNTIMES)}, got {value!r}")
        return value

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _strong_enough(cls, key: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Refuse to start with a key someone could guess: too short, or one character pattern repeated."""
        if key is None:
            return None
        secret = key.get_secret_value()
        setting = f"GRAFT_{(info.field_name or '').upper()}"
        if len(secret) < MIN_ADMIN_KEY_CHARS or len(set(secret)) < MIN_KEY_DISTINCT_CHARS:
            raise WeakKeyError(
                f"{setting} is too weak to guard this service ({len(secret)} characters, {len(set(secret))} "
                f"distinct; it needs at least {MIN_ADMIN_KEY_CHARS} and {MIN_KEY_DISTINCT_CHARS}): generate one "
                "with 'openssl rand -hex 32'"
            )
        return key

    @model_validator(mode="after")
    def _default_backbone_loaded(self) -> "Settings":
        """Refuse to start with a default that every request naming no backbone would fail on. A replica that
        loads none (an API-only test) has no default to check: it refuses every request that needs a backbone."""
        if self.backbones and self.default_backbone not in self.backbones:
            raise ValueError(
                f"GRAFT_DEFAULT_BACKBONE '{self.default_backbone}' is not one of the loaded backbones "
                f"(GRAFT_BACKBONES): {', '.join(self.backbones)}"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise ValueError("set both GRAFT_GRPC_TLS_CERT_FILE and GRAFT_GRPC_TLS_KEY_FILE, or neither")
        return self

    @cached_property
    def resolved_registry_url(self) -> str:
        """The SQLAlchemy URL; a plain ``postgresql://`` URL gets the installed driver (psycopg 3)."""
        if not self.registry_url:
            return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"
        scheme, sep, rest = self.registry_url.partition("://")
        return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else self.registry_url

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def feature_dir(self) -> Path:
        return self.data_dir / "features"
