"""The daemon's configuration: typed dataclasses, validated at load with errors that name the key's path.

`load_config(path)` reads YAML; unknown keys, wrong types and bad values fail at start with e.g.
``config error at batcher.max_batch_size: expected int, got 'x'``. Deep code receives these objects.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from inspectd.allocator import CHOICES as ALLOCATORS
from inspectd.detectors.compiled import MODES
from inspectd.streams.redis_keys import validate_line


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key's path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"config error at {path or '<root>'}: {message}")
        self.path = path


class _FieldError(ConfigError):
    """A check of a dataclass found at more than one path (a list item, one of `models:`, a product file or API
    body) names the key relative to the dataclass; `build` puts the dataclass's own path in front."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.message = message


@dataclass
class ModelConfig:
    name: str = "default"  # how products refer to this model (`model:` in a product file)
    arch: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e31"
    device: str = "auto"
    precision: str = "auto"
    quick_gelu: str = "auto"
    threads: int = 0  # torch's CPU threads, process-wide; 0 = leave as is (torch's default: one per core)
    cache_dir: str | None = None
    window_chunk_tokens: int = 0  # token rows a window-pass chunk, and on CPU a fused block's group of whole
    #                               sequences, holds; 0 = auto: 2048 on CPU (cache-sized), large on GPU
    cpu_kernels: str = "auto"  # auto: oneDNN fused blocks on CPU when the tower allows; onednn; torch
    cpu_gemm: str = "auto"  # the fused blocks' linears: auto (oneDNN with AVX-512, MKL on AVX2-only CPUs); onednn; blas
    resize: str = "exact"  # frames to model inputs: exact (open_clip's bicubic, as eval) | fast (JPEGs decoded
    #                        smaller, large frames 1080p 2.3x, 4K 5.1x faster; see preprocess.FAST_REDUCING_GAP)
    compile: str | bool = "off"  # torch.compile of the image tower: off | default | reduce-overhead (CUDA graphs on
    #                       a GPU) | max-autotune | max-autotune-no-cudagraphs; compiled at start-up for every batch
    #                       size. YAML reads a bare `off` as false (and `on` as true): both are taken, as off / default

    def __post_init__(self) -> None:
        _at_least("threads", self.threads, 0, " (0 = leave torch's default)", _FieldError)
        _choice("precision", self.precision, ("auto", "fp32", "fp16", "bf16"), _FieldError)
        _choice("resize", self.resize, ("exact", "fast"), _FieldError)
        _choice("cpu_kernels", self.cpu_kernels, ("auto", "onednn", "torch"), _FieldError)
        _choice("cpu_gemm", self.cpu_gemm, ("auto", "onednn", "blas"), _FieldError)
        _choice("quick_gelu", self.quick_gelu, ("auto", "true", "false"), _FieldError)
        if isinstance(self.compile, bool):
            self.compile = "default" if self.compile else "off"
        _choice("compile", self.compile, MODES, _FieldError)
        if self.cpu_gemm != "auto" and (self.cpu_kernels == "torch" or self.compile != "off"):
            runs = "cpu_kernels: torch" if self.cpu_kernels == "torch" else f"compile: {self.compile}"
            raise _FieldError("cpu_gemm", f"{self.cpu_gemm!r} picks the fused blocks' GEMMs, which {runs} "
                                          "does not run (use auto)")
        if self.compile != "off" and self.cpu_kernels == "onednn":
            raise _FieldError("compile", f"{self.compile!r} replaces the oneDNN fused blocks: it cannot run "
                                         "with model.cpu_kernels: onednn (use auto)")


@dataclass
class RedisConfig:
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False  # Redis Cluster: url names any one node; one reader per line (per hash slot)
    prefix: str = "inspect"
    lines: list[str] = field(default_factory=lambda: ["line-1"])  # input streams: <prefix>:{<line>}:frames
    group: str = "inspectd"
    consumer: str | None = None  # default <hostname>-<pid>
    block_ms: int = 500
    claim_idle_ms: int = 60000
    max_deliveries: int = 5  # a frame redelivered more often (it keeps crashing consumers) is dead-lettered
    results_maxlen: int = 100000
    control_stream: str | None = None  # fleet-wide product commands, e.g. "inspect:control" (opt-in)
    keep_acked_s: float = 600.0  # input retention: entries acked by every group are trimmed (XTRIM MINID) once
    #                              older than this; -1 = never trim (the producer's MAXLEN must bound the stream)
    idle_consumer_s: float = 3600.0  # consumers of our group idle this long with nothing pending are removed
    maintenance_interval_s: float = 30.0  # how often trimming and consumer clean-up run

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigError("redis.prefix", f"{self.prefix!r} must not contain braces (the line is the hash tag)")
        for index, line in enumerate(self.lines):
            _line(f"redis.lines[{index}]", line)
        _at_least("redis.block_ms", self.block_ms, 0, " (0 = reads do not block)")
        _positive("redis.claim_idle_ms", self.claim_idle_ms)
        _at_least("redis.max_deliveries", self.max_deliveries, 0, " (0 = never dead-letter redelivered frames)")
        _positive("redis.results_maxlen", self.results_maxlen)
        _positive("redis.maintenance_interval_s", self.maintenance_interval_s)


@dataclass
class CameraSourceConfig:
    name: str
    uri: str
    product: str
    line: str = "camera"
    policy: str = "latest"
    queue_size: int = 8
    loop: bool = False
    reconnect: bool = True
    max_fps: float | None = None
    open_timeout_s: float = 5.0  # a camera that does not answer costs only itself this long per attempt
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5  # reconnect backoff: doubles per failed attempt up to backoff_max_s
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:  # what streams.camera.CameraConfig would refuse when the daemon opens it
        _line("line", self.line, _FieldError)
        _choice("policy", self.policy, ("latest", "queue"), _FieldError)
        _positive("queue_size", self.queue_size, _FieldError)
        _positive("backoff_initial_s", self.backoff_initial_s, _FieldError)
        if not self.backoff_max_s >= self.backoff_initial_s:
            raise _FieldError("backoff_max_s", f"must be >= backoff_initial_s ({self.backoff_initial_s}), "
                                               f"got {self.backoff_max_s}")
        if self.max_fps is not None:
            _at_least("max_fps", self.max_fps, 0, " (0 or null = not paced)", _FieldError)


@dataclass
class FolderSourceConfig:
    path: str
    product: str | None = None  # default: the sub-folder name
    line: str = "folder"
    after: str = "move"  # "move" to done/ | "record" in a ledger
    ledger: str | None = None  # with after=record: where processed files are recorded
    poll_interval_s: float = 0.5
    settle_s: float = 1.0  # a file is scored once unchanged (size, mtime) for this long: never half-written
    notify: bool = True  # change notification (inotify via watchfiles): idle cost flat however many files stay
    rescan_s: float = 60.0  # full walk this often anyway (catches what a notification missed)

    def __post_init__(self) -> None:
        _line("line", self.line, _FieldError)
        _choice("after", self.after, ("move", "record"), _FieldError)
        _positive("poll_interval_s", self.poll_interval_s, _FieldError)
        _at_least("settle_s", self.settle_s, 0, error=_FieldError)


@dataclass
class SourcesConfig:
    redis: bool = True
    cameras: list[CameraSourceConfig] = field(default_factory=list)
    folders: list[FolderSourceConfig] = field(default_factory=list)
    camera_stale_s: float = 10.0  # /readyz: a camera without a frame for this long makes the daemon not ready


@dataclass
class SinksConfig:
    redis: bool = True
    jsonl: str | None = None  # path of a JSONL results file
    jsonl_masks_dir: str | None = None
    publish_stall_s: float = 60.0  # liveness fails when publishing keeps failing this long (watchdog restarts)
    mask_bits: int = 8  # mask PNG bit depth: 8 (pixel = map / mask_scale x 255) or 16 (x 65535: fine steps)

    def __post_init__(self) -> None:
        if isinstance(self.mask_bits, bool) or self.mask_bits not in (8, 16):
            raise ConfigError("sinks.mask_bits", f"must be 8 or 16, got {self.mask_bits!r}")
        _positive("sinks.publish_stall_s", self.publish_stall_s)


@dataclass
class BatcherConfig:
    max_batch_size: int = 8
    max_delay_ms: float = 20.0
    queue_size: int = 64  # frames waiting for a batch: the backpressure bound

    def __post_init__(self) -> None:
        _positive("batcher.max_batch_size", self.max_batch_size)
        _positive("batcher.queue_size", self.queue_size)
        if self.max_delay_ms < 0:
            raise ConfigError("batcher.max_delay_ms", "must be >= 0")


@dataclass
class DecodeConfig:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_jpeg_scans: int = 100  # a JPEG's start-of-scan markers (encoders write ~10): above = dead letter
    #                            too_many_scans, before decoding (a progressive scan-bomb decodes for a minute)
    threads: int = -1  # -1 = auto: 0 on CPU (decode on the engine thread: torch already uses every core);
    #                    with a GPU every core but two, 2 to 16 (decode the next batches while the GPU runs this one)
    max_tiles: int = 16  # model inputs one frame may need after tiling (aspect up to ~13:1; a 10000 x 10 strip
    #                      would need ~500): above = dead letter too_many_tiles
    max_meta_bytes: int = 64 * 1024  # the `meta` field is copied into every result

    def __post_init__(self) -> None:
        _positive("decode.max_bytes", self.max_bytes)
        _positive("decode.max_pixels", self.max_pixels)
        _at_least("decode.threads", self.threads, -1, " (-1 = auto, 0 = on the engine thread)")
        _positive("decode.max_tiles", self.max_tiles)
        _positive("decode.max_jpeg_scans", self.max_jpeg_scans)
        _positive("decode.max_meta_bytes", self.max_meta_bytes)


@dataclass
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464
    token: str | None = None  # required when host is not a loopback address (or env INSPECTD_ADMIN_TOKEN)
    token_file: str | None = None  # without a token on loopback: one is generated here (0600) for writes;
    #                                default $STATE_DIRECTORY/admin-token or ~/.local/state/inspectd/admin-token
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted besides loopback ones
    max_body_bytes: int = 32 * 1024 * 1024
    trusted_proxies: list[str] = field(default_factory=list)  # reverse proxies (addresses or CIDR networks) whose
    #   X-Forwarded-For names the client: per-client limits (wrong tokens, live-feed streams) count that client

    def __post_init__(self) -> None:
        import ipaddress
        import os

        from inspectd.daemon.http_common import is_loopback

        for index, proxy in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError as exc:
                raise ConfigError(f"http.trusted_proxies[{index}]", f"{proxy!r} is not an address or network "
                                                                    f"({exc})") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError("http.port", f"must be within [0, 65535] (0 = any free port), got {self.port}")
        _positive("http.max_body_bytes", self.max_body_bytes)
        if self.enabled and not is_loopback(self.host) and not (self.token or os.environ.get("INSPECTD_ADMIN_TOKEN")):
            raise ConfigError("http.token", f"http.host {self.host!r} is not a loopback address: set http.token "
                                            "(or INSPECTD_ADMIN_TOKEN), or bind to 127.0.0.1")


@dataclass
class ConsoleConfig:
    """The operator console under /console: review buffer of recent frames and feedback into the product."""

    enabled: bool = True  # served by the http server (same auth rules as the admin API)
    review: str = "memory"  # where recent frames are kept for review: memory | redis (streams capped by MAXLEN,
    #                         shared by every instance) | off (lines that must keep no images)
    keep_ng: int = 100  # NG frames kept for review (newest), all products together
    keep_ok: int = 20  # OK frames kept (0 = none)
    max_side: int = 512  # review images (and their maps) are downscaled to this longer side
    keep_original: bool = True  # also keep each frame as it was scored, so feedback saves that (not the review
    #                             size: references and eval images at the scale the detector sees)
    original_budget_mb: int = 256  # memory for those originals; over it, the oldest fall back to review size
    ng_per_s: float = 10.0  # at most this many NG frames a second are rendered for review (the rest only count)
    ok_per_s: float = 1.0  # and this many OK frames: rendering costs CPU the engine may need
    skip_lines: list[str] = field(default_factory=list)  # lines whose frames are never kept (stats still count)
    skip_products: list[str] = field(default_factory=list)  # products whose frames are never kept
    stats_window: int = 200  # "NG rate over the last N frames" per product
    feedback_dir: str | None = None  # confirmed defects land here in the `folder` eval layout, with the feedback
    #                                  log; None = <registry.references_root>/_console, else feedback is off
    session_ttl_s: float = 12 * 3600.0  # a browser session (obtained once with the admin token) lasts this long

    def __post_init__(self) -> None:
        _choice("console.review", self.review, ("memory", "redis", "off"))
        for key in ("keep_ng", "keep_ok"):
            if getattr(self, key) < 0:
                raise ConfigError(f"console.{key}", "must be >= 0")
        _positive("console.max_side", self.max_side)
        for key in ("ng_per_s", "ok_per_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"console.{key}", "must be >= 0")
        _positive("console.stats_window", self.stats_window)


@dataclass
class ThresholdConfig:
    value: float | None = None  # fixed threshold; overrides calibration
    quantile: float = 1.0  # of the normal scores (leave-one-out on references, plus held-out goods)
    margin: float = 0.02  # added to the quantile
    holdout_dir: str | None = None  # extra good images for calibration
    default: float = 0.5  # when there is nothing to calibrate on (zero-shot without held-out goods)

    def __post_init__(self) -> None:  # a NaN threshold would call every frame OK
        for key in ("value", "margin", "default"):
            number = getattr(self, key)
            if number is not None and not math.isfinite(number):
                raise _FieldError(key, f"must be a finite number, got {number}")


@dataclass
class ProductConfig:
    id: str
    object_name: str = "object"
    defect_words: list[str] = field(default_factory=list)
    detector: str = "winclip"
    options: dict[str, Any] = field(default_factory=dict)
    references: str | None = None  # directory of normal reference images
    shots: int = 4  # how many references to use (sorted by name); 0 = zero-shot
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    mask: str = "downscaled:256"  # "full" | "none" | "downscaled:<max_side>"
    model: str | None = None  # a name from the daemon's `models:` (default: the first model)
    seed: int = 0  # seed of a fit that trains (FitContext.seed), so a rebuild is repeatable

    def __post_init__(self) -> None:
        _at_least("shots", self.shots, 0, " (0 = zero-shot)", _FieldError)


@dataclass
class RegistryConfig:
    products_dir: str | None = None  # one YAML file per product
    state_cache_dir: str | None = None  # fitted product states, keyed by model/config/reference hash
    references_root: str | None = None  # reference directories set over the admin API must lie under it (files
    #                                     written by the operator may point anywhere); None = the API cannot set them
    watch: bool = True  # rebuild on changes to products_dir and reference directories
    debounce_s: float = 1.0
    on_building: str = "wait"  # frames of a product still building: "wait" (bounded) | "dead_letter"
    wait_timeout_s: float = 30.0
    build_workers: int = 2  # product builds running at once (a slow fit never blocks every other rebuild)

    def __post_init__(self) -> None:
        _choice("registry.on_building", self.on_building, ("wait", "dead_letter"))
        _positive("registry.build_workers", self.build_workers)
        _at_least("registry.wait_timeout_s", self.wait_timeout_s, 0, " (0 = do not wait)")


@dataclass
class DaemonConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    models: list[ModelConfig] = field(default_factory=list)  # the model pool; empty = just `model`
    redis: RedisConfig = field(default_factory=RedisConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    sinks: SinksConfig = field(default_factory=SinksConfig)
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    products: list[ProductConfig] = field(default_factory=list)
    shutdown_timeout_s: float = 20.0
    demo: bool = False  # allow model.pretrained == "random": every result says its scores are meaningless
    allocator: str = "keep"  # keep: freed tensor memory stays in the heap for the next batch (inspectd/allocator.py)
    #                          system: glibc's defaults (freed memory goes back to the kernel; resident memory falls)

    def __post_init__(self) -> None:
        _choice("allocator", self.allocator, ALLOCATORS)
        _at_least("shutdown_timeout_s", self.shutdown_timeout_s, 0, " (0 = do not wait for frames in flight)")
        if self.sources.redis and not self.redis.lines:
            raise ConfigError("redis.lines", "the redis source (sources.redis) needs at least one line to read")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError("models", f"model names must be unique, repeated: {dupes}")

    def model_pool(self) -> list[ModelConfig]:
        """The models to load, first = the default: `models:` when given, else the single `model:`."""
        return list(self.models) or [self.model]


def _choice(path: str, value: str, allowed: tuple[str, ...], error: type[ConfigError] = ConfigError) -> None:
    if value not in allowed:
        raise error(path, f"must be one of {list(allowed)}, got {value!r}")


def _positive(path: str, value: float, error: type[ConfigError] = ConfigError) -> None:
    if not value > 0:  # (NaN too)
        raise error(path, f"must be > 0, got {value}")


def _at_least(path: str, value: float, low: float, meaning: str = "", error: type[ConfigError] = ConfigError) -> None:
    """``value >= low``; ``meaning`` says what the lowest allowed values do, e.g. " (0 = off)"."""
    if not value >= low:  # (NaN too)
        raise error(path, f"must be >= {low}{meaning}, got {value}")


def _line(path: str, line: str, error: type[ConfigError] = ConfigError) -> None:
    """A line id as the stream keys' hash tag needs it (results of a bad one could not be published)."""
    try:
        validate_line(line)
    except ValueError as exc:
        raise error(path, str(exc)) from None


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking keys and types recursively."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(where, f"unknown key; known keys here: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}" if path else missing[0], "required key is missing")
    try:
        return cls(**values)
    except _FieldError as exc:  # a key relative to this dataclass: its full path
        raise ConfigError(f"{path}.{exc.path}" if path else exc.path, exc.message) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from exc


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(path, f"expected {_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(path, f"expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(path, f"expected {_name(tp)}, got {value!r}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_config(data: Any) -> DaemonConfig:
    config = build(DaemonConfig, data)
    ids = [p.id for p in config.products]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError("products", f"duplicate product id(s) {duplicates}")
    return config


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a second
    ``batcher:`` block would drop the first one's settings without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def _read_yaml(path: Path, where: str) -> Any:
    """A config or product file's YAML; a ConfigError at ``where`` naming the file when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc}") from exc
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"{path} is not valid YAML: {exc}") from exc


def load_config(path: str | Path) -> DaemonConfig:
    path = Path(path)
    data = _read_yaml(path, "")
    config = parse_config(data or {})
    _resolve_paths(config, path.parent)
    return config


def _is_relative(value: str) -> bool:
    """A path relative to some folder (not a URL, not absolute, ``~`` counted as absolute)."""
    return "://" not in value and not Path(value).expanduser().is_absolute()


def _relative_to(base: Path) -> Any:
    """A function making a relative path relative to ``base`` (None, URLs and absolute paths are kept)."""

    def fix(value: str | None) -> str | None:
        if not value or not _is_relative(value):
            return value
        return str((base / value).resolve())

    return fix


def product_paths(product: ProductConfig) -> dict[str, str]:
    """{key path: value} of a product's paths: references, holdout and learned-part files (its detector's
    ``artifact_options``); the set given."""
    paths = {"references": product.references, "threshold.holdout_dir": product.threshold.holdout_dir}
    try:
        from inspectd.detectors.base import detector_class

        artifact_options = detector_class(product.detector).artifact_options
    except ValueError:  # an unknown detector: `--check` and the build say so
        artifact_options = ()
    paths.update({f"options.{o}": product.options.get(o) for o in artifact_options
                  if isinstance(product.options.get(o), str)})
    return {key: value for key, value in paths.items() if value}


def relative_product_paths(product: ProductConfig) -> list[str]:
    """The key paths of `product_paths` that are relative."""
    return [key for key, value in product_paths(product).items() if _is_relative(value)]


def resolve_product_paths(product: ProductConfig, base: Path) -> None:
    """A product's paths (`product_paths`) relative to ``base``: the folder of the file that defines it, or the
    products_dir a product sent through the API or the control stream is saved in."""
    fix = _relative_to(base)
    for key in product_paths(product):
        if key == "references":
            product.references = fix(product.references)
        elif key == "threshold.holdout_dir":
            product.threshold.holdout_dir = fix(product.threshold.holdout_dir)
        else:
            option = key.removeprefix("options.")
            product.options[option] = fix(product.options[option])


def _resolve_paths(config: DaemonConfig, base: Path) -> None:
    """Relative paths in a config file are relative to that file (a model's ``pretrained`` when it names a file or
    folder rather than a tag)."""
    from inspectd.detectors.weights import looks_like_path

    fix = _relative_to(base)
    for model in [config.model, *config.models]:
        if looks_like_path(model.pretrained) or (base / model.pretrained).exists():
            model.pretrained = fix(model.pretrained) or model.pretrained
        model.cache_dir = fix(model.cache_dir)
    config.http.token_file = fix(config.http.token_file)
    config.registry.products_dir = fix(config.registry.products_dir)
    config.registry.state_cache_dir = fix(config.registry.state_cache_dir)
    config.registry.references_root = fix(config.registry.references_root)
    config.console.feedback_dir = fix(config.console.feedback_dir)
    config.sinks.jsonl = fix(config.sinks.jsonl)
    config.sinks.jsonl_masks_dir = fix(config.sinks.jsonl_masks_dir)
    for folder in config.sources.folders:
        folder.path = fix(folder.path) or folder.path
        folder.ledger = fix(folder.ledger)
    for camera in config.sources.cameras:
        if not camera.uri.isdigit():
            camera.uri = fix(camera.uri) or camera.uri
    for product in config.products:
        resolve_product_paths(product, base)


def load_product_file(path: str | Path) -> ProductConfig:
    path = Path(path)
    data = _read_yaml(path, path.name)
    product = build(ProductConfig, data, path.stem)
    resolve_product_paths(product, path.parent)  # as in the main config: relative to the file, not the cwd
    return product
