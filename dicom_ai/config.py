"""One typed settings object, read from a TOML file with ``DICOM_AI_*`` environment overrides.

Every knob of the product lives here, with its default and the reason for it. A key in the
TOML file ``[section] key = value`` is overridden by the environment variable
``DICOM_AI_SECTION_KEY`` (``DICOM_AI_SCP_PORT=11112``); top-level keys by ``DICOM_AI_KEY``.
Unknown keys and wrongly typed values are errors: :func:`load_settings` raises
:class:`SettingsError` listing every problem, and ``dicom-ai config check FILE`` prints them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_ai.dicom.uid import is_valid_uid

ENV_PREFIX = "DICOM_AI_"


class SettingsError(ValueError):
    """A configuration file or environment override is invalid; ``problems`` lists each issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class TLSSettings:
    """TLS for a listener or a destination. Disabled unless ``enabled`` is true."""

    enabled: bool = False
    #: PEM certificate chain and key presented by us.
    certificate: str = ""
    private_key: str = ""
    #: CA bundle used to verify the peer; for the SCP, setting it with ``require_client_cert``
    #: makes mutual TLS.
    ca_certificates: str = ""
    require_client_cert: bool = False


@dataclass
class SCPSettings:
    """The DICOM listener (``dicom-ai serve``)."""

    ae_title: str = "DICOMAI"
    #: Loopback by default: a hospital opens it to the PACS deliberately, not by accident.
    bind_address: str = "127.0.0.1"
    port: int = 11112
    #: Associations served at once; a request beyond them is rejected (transient, local limit).
    maximum_associations: int = 8
    #: Associations one calling AE title may hold at once, so that a peer that opens too many
    #: (or leaves them idle) cannot lock the others out: the slots beyond it stay free for them.
    maximum_associations_per_ae: int = 4
    #: 0 means unlimited; 16 KiB–1 MiB are usual. Larger PDUs mean fewer round-trips per instance.
    maximum_pdu_size: int = 262144
    #: Calling AE titles allowed to associate; empty means any caller is accepted.
    allowed_calling_aets: list[str] = field(default_factory=list)
    #: Seconds an idle association is kept before it is aborted.
    network_timeout: float = 60.0
    #: Seconds a connection has to send its whole A-ASSOCIATE-RQ (a caller that has not asked
    #: for an association holds no slot, but a thread).
    request_timeout_s: float = 10.0
    #: Longest an association may last, whatever it sends: a peer trickling bytes (each read
    #: within ``network_timeout``) is aborted after this. One hour carries a 2000-image study
    #: over a slow link many times over.
    association_deadline_s: float = 3600.0
    #: Largest data set one C-STORE may carry (MiB); a larger one is read to its end without
    #: being kept and refused with 0xA700. Received data sets go to disk as they arrive.
    maximum_message_mb: int = 4096
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass
class StorageSettings:
    """Where received instances, the SQLite index and outputs live."""

    directory: str = "var/dicom-ai"
    #: Below this much free disk, C-STORE answers 0xA700 (out of resources) instead of storing.
    minimum_free_mb: int = 1024
    #: Days a *finished* study (processed, every result delivered) is kept after its last
    #: instance arrived; then its files and rows are removed. 0 keeps everything. dicom-ai is not
    #: an archive: the PACS holds the originals and our results.
    retention_days: float = 7.0
    #: Days a study's audit trail (``audit/<study>.jsonl``) is kept after its last event; longer
    #: than ``retention_days`` so that "which model version analysed this study, and where did
    #: the result go?" can be answered after the files are gone. 0 keeps every trail.
    audit_retention_days: float = 365.0


@dataclass
class StudySettings:
    """Study assembly."""

    #: A study is complete after this many seconds without a new instance. 30 s covers the pause
    #: between series of one modality push and a PACS forwarding a study in several associations,
    #: while a radiologist still sees results within a minute of the last image. The default and
    #: the rule for CT, MR and multi-frame studies (see :mod:`dicom_ai.service.studies`).
    quiet_period_s: float = 30.0
    #: The quiet period of a study whose images are all single-image objects (CR, DX,
    #: ophthalmic, VL and dermoscopic photography, single-frame Secondary Capture of those
    #: modalities), and of one whose every series has reached its announced instance count:
    #: such a study is sent in one push, with no pause between series to wait out.
    single_image_quiet_period_s: float = 2.0
    #: A study is complete this long after the first instance of its current generation, however
    #: instances keep trickling in, an expected count falls short or an MPPS stays IN PROGRESS.
    #: Ten minutes: a long CT or a slow link, but a result still within the quarter hour.
    maximum_wait_s: float = 600.0


@dataclass
class WorkerSettings:
    """The processing worker (a separate process, so the model never shares the SCP's GIL)."""

    #: Attempts before a job is marked failed for good.
    max_attempts: int = 3
    #: Longest one analysis may run, in seconds. Past it the service kills the worker (a
    #: decoder or library call that never returns holds its lane otherwise), starts a fresh one,
    #: and fails the study for good with the reason: a study that hung once would hang its
    #: retries too. The 300-slice CT takes about 18 s from its last image to its result on 2
    #: CPUs; 1800 s leaves room for a 2000-slice one on a loaded machine.
    job_timeout_s: float = 1800.0
    poll_interval_s: float = 1.0
    #: Worker processes, each with its own copy of the models; 0 sizes the pool from the usable
    #: CPUs and the available memory (:func:`dicom_ai.service.lanes.default_processes`: CPUs − 1,
    #: at least 2, at most 4, 2 GB each). With 2 or more, one serves single-image studies only, so a
    #: chest X-ray never waits for a CT.
    processes: int = 0
    #: CPU priority of the workers: "batch" (SCHED_BATCH, nice 10), "idle" (SCHED_IDLE: starves
    #: beside any busy process) or "normal". See ``dicom_ai.service.process.set_priority``.
    priority: str = "batch"
    #: Keep the workers that take CTs off one CPU (when there are two or more) so the listener
    #: always has one; the fast-lane worker's jobs last seconds and it runs anywhere.
    listener_core: bool = True


@dataclass
class DestinationSettings:
    """One place results are sent: a C-STORE SCP or a DICOMweb STOW-RS endpoint."""

    name: str = ""
    #: "dimse" (C-STORE) or "stow" (DICOMweb STOW-RS).
    kind: str = "dimse"
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 4242
    #: For kind = "stow": the DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web
    url: str = ""
    tls: TLSSettings = field(default_factory=TLSSettings)


@dataclass
class ExportSettings:
    """The durable outbound queue."""

    destinations: list[DestinationSettings] = field(default_factory=list)
    #: Backoff before attempt n is ``initial_backoff_s * 2**(n-1)``, capped at ``max_backoff_s``.
    initial_backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    #: A delivery pending this long is logged at WARNING (once).
    late_after_s: float = 900.0
    #: A delivery that still fails this long after it was queued is dead-lettered (logged at
    #: ERROR, shown by ``dicom-ai status``, re-queued by ``dicom-ai retry``). A PACS maintenance
    #: window is hours: 24 h by default.
    retry_horizon_s: float = 86400.0


@dataclass
class InferenceSettings:
    """Models and where they run."""

    models_dir: str = "models"
    #: "auto" picks CUDA when torch sees a GPU, else the CPU; "cpu" or "cuda" force one.
    device: str = "auto"
    batch_size: int = 16
    #: Mixed precision on CUDA only; CPU inference always runs in float32.
    amp: bool = True
    #: CPU threads for torch; 0 leaves torch's default.
    num_threads: int = 0


#: Formats of log lines (``log_format``).
LOG_FORMATS = ("text", "json")
#: Languages of the text in our results (``output.language``); the first is the default.
OUTPUT_LANGUAGES = ("en", "zh")


@dataclass
class OutputSettings:
    """The DICOM objects we write."""

    #: UID root of the organization; empty uses the 2.25 (UUID-derived) root. Output UIDs are
    #: deterministic: root + hash of source SOP Instance UIDs + model name/version + object kind.
    uid_root: str = ""
    manufacturer: str = "dicom-ai"
    institution_name: str = ""
    #: Write Secondary Captures with heatmaps (one per analysed image / key slice).
    secondary_captures: bool = True
    #: Language of the text we write (finding lines, Impression, SC caption): one of
    #: :data:`OUTPUT_LANGUAGES`, "en" English or "zh" Simplified Chinese.
    language: str = "en"


@dataclass
class LimitsSettings:
    """Bounds on what one input may cost, checked before the work is done."""

    #: Largest decoded pixel data one decode may produce, in MiB, from the declared Rows ×
    #: Columns × frames × Samples per Pixel × Bits Allocated. A few kB of RLE, JPEG or JPEG 2000
    #: can declare 65000 × 65000 pixels; refusing by the header stops such a file before any
    #: decoder allocates. 1024 MiB holds a 2000-frame 512 × 512 16-bit enhanced CT; a site
    #: with larger multi-frame objects (breast tomosynthesis) raises it.
    max_decoded_mb: int = 1024
    #: Largest CT volume one series may be assembled into, in MiB: slices × Rows × Columns ×
    #: 4 bytes (float32 Hounsfield units), checked from the headers before any slice is decoded.
    #: 2048 MiB holds 2048 slices of 512 × 512; each slice is also bounded by max_decoded_mb.
    max_volume_mb: int = 2048
    #: Longest one decode in the decoder process may take, in seconds. JPEG Lossless is decoded
    #: there (by GDCM, which aborts the process it runs in on some malformed files); past this
    #: the process is killed and the file refused, and the next file gets a new one. A 512 ×
    #: 512 slice takes milliseconds; 120 s leaves room for a 1024 MiB multi-frame object on a
    #: loaded machine.
    isolated_decode_timeout_s: float = 120.0


@dataclass
class HTTPSettings:
    """The service's one HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz`` and
    the status page at ``/``."""

    enabled: bool = True
    #: Loopback by default, like the listener: the page and the metrics name studies by UID, so
    #: opening them to a network is a deliberate act (0.0.0.0 in a container, for the probes).
    bind_address: str = "127.0.0.1"
    #: 9110 is free of the common Prometheus exporters' ports; 0 picks a free port (logged).
    port: int = 9110
    #: When set, the status page asks for it (``Authorization: Bearer`` or ``?token=``);
    #: ``/metrics``, ``/healthz`` and ``/readyz`` stay open for scrapers and probes.
    token: str = ""


@dataclass
class Settings:
    """All settings of dicom-ai. See ``deploy/dicom-ai.example.toml`` for a commented file."""

    log_level: str = "INFO"
    #: "text" (one readable line per record) or "json" (one JSON object per line, for a log
    #: collector); both pass the same identity filter.
    log_format: str = "text"
    scp: SCPSettings = field(default_factory=SCPSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    studies: StudySettings = field(default_factory=StudySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a table, got {type(value).__name__}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and not (dataclasses.is_dataclass(item_tp)):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return []
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false",
                                                        "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return False
    if tp in (int, float):
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return tp()
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected {'an integer' if tp is int else 'a number'}, "
                            f"got {value!r}")
            return tp()
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
            return ""
        return value
    raise TypeError(f"unsupported settings type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type[Any], data: Mapping[str, Any], where: str,
           problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            problems.append(f"{where + '.' if where else ''}{key}: unknown setting")
    kwargs = {
        name: _coerce(data[name], hints[name], f"{where + '.' if where else ''}{name}", problems)
        for name in known if name in data
    }
    return cls(**kwargs)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Map ``DICOM_AI_SECTION_KEY`` variables onto the nested settings tree."""
    tree: dict[str, Any] = {}
    hints = typing.get_type_hints(Settings)
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):].lower()
        node: dict[str, Any] = tree
        cls: Any = Settings
        hints = typing.get_type_hints(cls)
        while True:
            match = next((n for n in sorted(hints, key=len, reverse=True)
                          if rest == n or rest.startswith(n + "_")), None)
            if match is None:
                tree.setdefault("__unknown__", []).append(var)
                break
            tp = hints[match]
            if rest == match or not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
                node[match] = raw
                break
            node = node.setdefault(match, {})
            rest = rest[len(match) + 1:]
            hints = typing.get_type_hints(tp)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_settings(path: str | Path | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from a TOML file (optional) and ``DICOM_AI_*`` environment variables.

    Parameters
    ----------
    path:
        TOML file; ``None`` uses only defaults and the environment.
    env:
        Environment to read overrides from; ``os.environ`` by default.

    Raises
    ------
    SettingsError
        Listing every unknown key, wrong type or unreadable file.
    """
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise SettingsError([f"{path}: cannot read ({exc.strerror})"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError([f"{path}: not valid TOML ({exc})"]) from exc
    overrides = _env_overrides(os.environ if env is None else env)
    for var in overrides.pop("__unknown__", []):
        problems.append(f"{var}: unknown environment setting")
    settings: Settings = _build(Settings, _merge(data, overrides), "", problems)
    problems.extend(validate(settings))
    if problems:
        raise SettingsError(problems)
    return settings


def validate(settings: Settings) -> list[str]:
    """Semantic checks beyond types: ranges, AE title form, consistent TLS and destinations."""
    problems: list[str] = []

    def check_ae(value: str, where: str) -> None:
        if not 0 < len(value) <= 16 or "\\" in value or not value.isprintable():
            problems.append(f"{where}: an AE title is 1–16 printable characters, got {value!r}")

    check_ae(settings.scp.ae_title, "scp.ae_title")
    for i, aet in enumerate(settings.scp.allowed_calling_aets):
        check_ae(aet, f"scp.allowed_calling_aets[{i}]")
    if not 0 < settings.scp.port < 65536:
        problems.append(f"scp.port: must be 1–65535, got {settings.scp.port}")
    if settings.scp.maximum_associations < 1:
        problems.append("scp.maximum_associations: must be at least 1")
    if settings.scp.maximum_associations_per_ae < 1:
        problems.append("scp.maximum_associations_per_ae: must be at least 1")
    for key in ("network_timeout", "request_timeout_s", "association_deadline_s"):
        if getattr(settings.scp, key) <= 0:
            problems.append(f"scp.{key}: must be positive")
    if settings.scp.maximum_message_mb < 1:
        problems.append("scp.maximum_message_mb: must be at least 1")
    if settings.scp.maximum_pdu_size < 0:
        problems.append("scp.maximum_pdu_size: must be 0 (unlimited) or positive")
    if settings.storage.retention_days < 0:
        problems.append("storage.retention_days: must be 0 (keep everything) or positive")
    if settings.storage.audit_retention_days < 0:
        problems.append("storage.audit_retention_days: must be 0 (keep every trail) or positive")
    if settings.log_format not in LOG_FORMATS:
        problems.append(f"log_format: one of {', '.join(LOG_FORMATS)}, "
                        f"got {settings.log_format!r}")
    if settings.studies.quiet_period_s < 0:
        problems.append("studies.quiet_period_s: must not be negative")
    if settings.studies.single_image_quiet_period_s < 0:
        problems.append("studies.single_image_quiet_period_s: must not be negative")
    if settings.studies.maximum_wait_s < max(settings.studies.quiet_period_s,
                                             settings.studies.single_image_quiet_period_s):
        problems.append("studies.maximum_wait_s: must be at least studies.quiet_period_s and "
                        "studies.single_image_quiet_period_s")
    if settings.inference.device not in {"auto", "cpu", "cuda"}:
        problems.append(f"inference.device: one of auto, cpu, cuda; "
                        f"got {settings.inference.device!r}")
    if not settings.worker.job_timeout_s > 0:
        problems.append("worker.job_timeout_s: must be positive")
    if settings.worker.processes < 0:
        problems.append("worker.processes: must be 0 (sized from the machine) or positive")
    if settings.worker.priority not in {"batch", "idle", "normal"}:
        problems.append(f"worker.priority: one of batch, idle, normal; "
                        f"got {settings.worker.priority!r}")
    if settings.inference.batch_size < 1:
        problems.append("inference.batch_size: must be at least 1")
    if settings.limits.max_decoded_mb < 1:
        problems.append("limits.max_decoded_mb: must be at least 1")
    if settings.limits.max_volume_mb < 1:
        problems.append("limits.max_volume_mb: must be at least 1")
    if not settings.limits.isolated_decode_timeout_s > 0:
        problems.append("limits.isolated_decode_timeout_s: must be positive")
    if not 0 <= settings.http.port < 65536:
        problems.append(f"http.port: must be 0 (a free port) or 1–65535, got {settings.http.port}")
    if settings.http.enabled and not settings.http.bind_address:
        problems.append("http.bind_address: required when http.enabled is true")
    if settings.export.retry_horizon_s < 0 or settings.export.late_after_s < 0:
        problems.append("export.retry_horizon_s, export.late_after_s: must not be negative")
    if settings.output.uid_root and not is_valid_uid(settings.output.uid_root):
        problems.append(f"output.uid_root: a UID root is dot-separated numbers without leading "
                        f"zeros (PS3.5 9.1), got {settings.output.uid_root!r}")
    if len(settings.output.uid_root) > 24:
        problems.append("output.uid_root: keep the root at most 24 characters so derived UIDs "
                        "fit in 64")
    if settings.output.language not in OUTPUT_LANGUAGES:
        problems.append(f"output.language: one of {', '.join(OUTPUT_LANGUAGES)}, "
                        f"got {settings.output.language!r}")

    def check_tls(tls: TLSSettings, where: str, *, server: bool) -> None:
        if not tls.enabled:
            return
        if server and not (tls.certificate and tls.private_key):
            problems.append(f"{where}: TLS enabled needs certificate and private_key")
        if tls.require_client_cert and not tls.ca_certificates:
            problems.append(f"{where}: require_client_cert needs ca_certificates")
        for key in ("certificate", "private_key", "ca_certificates"):
            value = getattr(tls, key)
            if value and not Path(value).is_file():
                problems.append(f"{where}.{key}: no such file {value!r}")

    check_tls(settings.scp.tls, "scp.tls", server=True)
    names: set[str] = set()
    for i, dest in enumerate(settings.export.destinations):
        where = f"export.destinations[{i}]"
        if not dest.name:
            problems.append(f"{where}.name: required")
        elif dest.name in names:
            problems.append(f"{where}.name: duplicate destination {dest.name!r}")
        names.add(dest.name)
        if dest.kind == "dimse":
            check_ae(dest.ae_title, f"{where}.ae_title")
            if not 0 < dest.port < 65536:
                problems.append(f"{where}.port: must be 1–65535, got {dest.port}")
        elif dest.kind == "stow":
            if not dest.url.startswith(("http://", "https://")):
                problems.append(f"{where}.url: a STOW-RS destination needs an http(s) URL")
        else:
            problems.append(f"{where}.kind: 'dimse' or 'stow', got {dest.kind!r}")
        check_tls(dest.tls, f"{where}.tls", server=False)
    return problems


__all__ = ["Settings", "SettingsError", "load_settings", "validate"]
