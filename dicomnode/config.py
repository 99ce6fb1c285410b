"""Configuration: one YAML file, validated by one pydantic-settings model.

Precedence (highest first): ``DICOMNODE_*`` environment variables, the YAML file, defaults.
Nested keys use ``__`` in environment variables: ``DICOMNODE_NODE__PORT=11113`` overrides
``node.port``; lists are JSON: ``DICOMNODE_ACCESS__ALLOWED_CALLING_AETS='["CT1","PACS"]'``.

Every key is documented in ``dicomnode.example.yaml`` and ``docs/configuration.md``. A bad file
gives one :class:`ConfigError` whose message names the key, so an admin never has to read a
traceback to find a typo.
"""

from __future__ import annotations

import difflib
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "DICOMNODE_CONFIG"
"""Environment variable naming the config file when ``--config`` is not given."""

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(
            "must be 1-16 printable ASCII characters, no backslash, not only spaces (PS3.5 AE)"
        )
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class NodeConfig(_Section):
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    # processes receiving (each its own GIL): the node hands each accepted connection to the
    # least busy; max_associations is split across them. 1: receive in the node process only.
    receiver_processes: int = Field(1, ge=1, le=16)
    max_pdu_bytes: int = Field(
        4 * 1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="Maximum PDU length we announce and accept. Larger PDUs mean fewer Python "
        "round trips per instance; anything a peer claims above this is aborted unread.",
    )
    network_timeout_seconds: float = Field(60.0, gt=0)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    shutdown_grace_seconds: float = Field(
        15.0, ge=0, description="On SIGTERM, how long in-flight instances may take to finish."
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @property
    def associations_per_process(self) -> int:
        """Each receiving process's share of max_associations (rounded up)."""
        return -(-self.max_associations // self.receiver_processes)


class StorageConfig(_Section):
    path: Path = Path("./dicomnode-data")
    min_free_mb: int = Field(1024, ge=0)
    duplicate_policy: Literal["keep-first", "replace", "reject"] = "keep-first"


class DatabaseConfig(_Section):
    url: str | None = Field(
        None, description="SQLAlchemy URL; default SQLite (WAL) at <storage.path>/index.sqlite3"
    )
    echo: bool = False


class AccessConfig(_Section):
    allowed_calling_aets: list[str] = Field(default_factory=list)
    require_called_aet: bool = True

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]


class ModalityConfig(_Section):
    """A remote AE the node knows (issue 22): what it may ask of the node when it calls
    (``allow``), and where it listens when it is a C-MOVE destination (any listed AE may be).
    ``store`` is allowed in addition to ``access.allowed_calling_aets``."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    allow: list[Literal["find", "move", "get", "store"]] = Field(default_factory=list)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    def may(self, service: str) -> bool:
        return service in self.allow


class QueryConfig(_Section):
    """Query/Retrieve (C-FIND/MOVE/GET, QIDO-RS): ``max_results`` bounds one response (it then
    ends with 0xA700 "Out of resources" and an error comment, and is audited);
    ``fuzzy_person_names``: person names match case-insensitively."""

    max_results: int = Field(1000, ge=1, le=1_000_000)
    fuzzy_person_names: bool = False


class AssembleConfig(_Section):
    quiet_seconds: float = Field(5.0, ge=0)
    level: Literal["study", "series"] = "study"
    poll_seconds: float = Field(0.5, gt=0, le=60)


class DestinationConfig(_Section):
    """A DICOM peer results are sent to (C-STORE SCU), with its own retry policy."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_aet: str | None = None  # default node.ae_title
    max_retries: int = Field(5, ge=0)
    retry_delay_seconds: float = Field(10.0, gt=0)
    retry_multiplier: float = Field(2.0, ge=1)
    retry_max_delay_seconds: float = Field(600.0, gt=0)
    timeout_seconds: float = Field(60.0, gt=0)
    associations: int = Field(2, ge=1, le=16)  # parallel associations for one job's results

    @field_validator("ae_title", "calling_aet")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae(v)


class StepConfig(_Section):
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)


MatchValue = str | int | float | list[str | int | float] | dict[str, str]
ROUTE_SPECIAL_KEYS = {"CallingAETitle"}


class NotifyConfig(_Section):
    """Where a critical finding (``Outputs.critical``) is announced, as soon as the job ends.

    ``webhook``: an http(s) URL that gets a JSON POST; ``command``: a program (argv list) that
    gets the same JSON on stdin. Each is tried ``attempts`` times, ``timeout_seconds`` each,
    from a queue in SQL (survives restarts); the outcome and the time from study completion
    are audited."""

    webhook: str | None = None
    command: list[str] | None = None
    timeout_seconds: float = Field(10.0, gt=0)
    attempts: int = Field(3, ge=1, le=20)

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("webhook must be an http:// or https:// URL")
        return v


class RouteConfig(_Section):
    """A rule: which completed studies/series go through which pipeline to which destinations.

    ``match`` maps a DICOM keyword (or ``CallingAETitle``) to a value, a list of values (any of),
    or ``{regex: "..."}`` (searched). A multi-valued attribute matches if any value does. All
    keys must match. At study level a study matches when any of its series does; those series
    are the pipeline's inputs.
    """

    name: str = Field(min_length=1)
    level: Literal["study", "series"] | None = None  # default: assemble.level
    match: dict[str, MatchValue] = Field(default_factory=dict)
    pipeline: list[StepConfig] = Field(min_length=1)
    send_to: list[str] = Field(default_factory=list)
    notify: NotifyConfig | None = None  # critical findings → webhook and/or command

    @field_validator("match")
    @classmethod
    def _match(cls, v: dict[str, MatchValue]) -> dict[str, MatchValue]:
        from pydicom.datadict import keyword_dict

        for key, value in v.items():
            if key not in keyword_dict and key not in ROUTE_SPECIAL_KEYS:
                close = difflib.get_close_matches(key, list(keyword_dict), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{key!r} is not a DICOM keyword{hint}")
            if isinstance(value, dict):
                if set(value) != {"regex"}:
                    raise ValueError(f"{key}: a mapping must be {{regex: '...'}}")
                try:
                    re.compile(value["regex"])
                except re.error as e:
                    raise ValueError(f"{key}: bad regex {value['regex']!r}: {e}") from None
        return v


class PackageConfig(_Section):
    """How results are encoded."""

    # classic: one CT Image Storage object per slice (every PACS and viewer shows it);
    # enhanced: one Legacy Converted Enhanced CT object per derived series, listing every
    # source image once (much faster to write, send and store; needs a PACS/viewer that
    # supports multi-frame CT; bench/e2e: ~6 s against ~10 s for classic)
    derived_series: Literal["classic", "enhanced"] = "classic"
    # images: every slice of a classic derived series lists the source images it was made
    # from (SourceImageSequence: for an MPR, the whole source series in every slice); series:
    # only the source series, once per slice (RelatedSeriesSequence, always present). PACS
    # store and index each listed reference: Orthanc took 13 ms of CPU per 300-reference
    # slice against 3 ms without (bench/e2e). Enhanced objects always list the images once.
    source_references: Literal["images", "series"] = "images"


class RunnerConfig(_Section):
    """The embedded runner: each job runs in its own spawned process."""

    processes: int = Field(2, ge=1, le=64)  # jobs at once
    gpu_slots: int = Field(0, ge=0, le=16)  # jobs holding a GPU at once (one per GPU)
    max_attempts: int = Field(3, ge=1, le=20)  # failed jobs are retried until this, then dead
    poll_seconds: float = Field(0.5, gt=0, le=60)
    # job processes started ahead, imports done, waiting for a job (each still runs one job
    # only): saves the ~2 s of Python imports at the start of every job; 0 = start cold
    warm_spares: int = Field(1, ge=0, le=8)
    # CPU priority of job processes (nice): receiving is what scanners wait on, so jobs (and
    # spares warming up) yield the CPU to it; an idle machine runs them at full speed anyway
    nice: int = Field(10, ge=0, le=19)
    # a running job is leased to its runner for this long and renewed while it runs; a job
    # whose lease expired (its runner died or lost the database) is queued again by any runner
    lease_seconds: float = Field(60.0, ge=5, le=3600)


class OIDCConfig(_Section):
    """Single sign-on with an OpenID Connect provider (authorization code flow, authlib)."""

    issuer: str = Field(description="The provider's issuer URL; its discovery document is "
                        "<issuer>/.well-known/openid-configuration.")
    client_id: str
    client_secret: str = ""
    scope: str = "openid profile email"
    # the claim whose value(s) decide the role, and how: claim value -> node role
    role_claim: str = "groups"
    role_map: dict[str, Literal["admin", "radiologist", "auditor"]] = Field(default_factory=dict)
    # the claim used as the user name in the node (and in every audit event)
    username_claim: str = "preferred_username"
    button_label: str = "Sign in with single sign-on"


class WebConfig(_Section):
    """The web console and REST API (``dicomnode serve`` runs it beside the DICOM listener)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # a login lasts this long (cookie and bearer token alike), then the user logs in again
    session_hours: float = Field(8.0, gt=0, le=24 * 30)
    # how users reach the console (behind a proxy: its https URL); links, SSO redirects and
    # Secure cookies follow it. Default: http://<host>:<port>
    public_url: str | None = None
    # consecutive failed logins that lock an account until an admin unlocks it
    lockout_failures: int = Field(5, ge=1, le=100)
    # after each failed login the next attempt for that user waits this long (seconds)
    failure_delay_seconds: float = Field(1.0, ge=0, le=30)
    oidc: OIDCConfig | None = None
    # the OHIF viewer's files (scripts/install-ohif.sh puts them there), served at /viewer.
    # Default: $DICOMNODE_VIEWER_DIR, else dicomnode/web/viewer
    viewer_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


class DicomwebConfig(_Section):
    """DICOMweb under /dicomweb on the console's server."""

    # origins (e.g. https://viewer.example.org) whose pages may call /dicomweb (CORS);
    # empty: same origin only
    cors_origins: list[str] = Field(default_factory=list)
    # the largest STOW-RS request accepted (the body is held in memory while it is stored)
    max_stow_mb: int = Field(1024, ge=1, le=16384)


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


_yaml_data: ContextVar[dict[str, Any]] = ContextVar("_yaml_data", default={})  # noqa: B039


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


class Settings(BaseSettings):
    """The whole node configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    dicomweb: DicomwebConfig = Field(default_factory=DicomwebConfig)
    package: PackageConfig = Field(default_factory=PackageConfig)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)
    modalities: dict[str, ModalityConfig] = Field(default_factory=dict)
    query: QueryConfig = Field(default_factory=QueryConfig)
    routes: list[RouteConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _routes_refer_to_known_destinations(self) -> Settings:
        titles = [m.ae_title for m in self.modalities.values()]
        for dup in sorted({t for t in titles if titles.count(t) > 1}):
            raise ValueError(f"modalities: AE title {dup!r} is listed twice")
        names = [r.name for r in self.routes]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"routes: name {dup!r} is used twice")
        for i, route in enumerate(self.routes):
            if route.level is not None and route.level != self.assemble.level:
                raise ValueError(
                    f"routes.{i}.level: {route.level!r}, but completions are emitted at "
                    f"assemble.level {self.assemble.level!r}: set one or the other")
            for j, dest in enumerate(route.send_to):
                if dest not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none defined"
                    raise ValueError(f"routes.{i}.send_to.{j}: unknown destination {dest!r} "
                                     f"(destinations: {known})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy URL."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.path / 'index.sqlite3').resolve()}"


def _suggest(loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    """'did you mean' for an unknown key, from the fields of the section it sits in."""
    target: type[BaseModel] | None = model
    for part in loc[:-1]:
        field = target.model_fields.get(str(part)) if target else None
        ann = field.annotation if field else None
        target = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if target is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(target.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {key}: unknown key{_suggest(err['loc'], Settings)}")
        else:
            lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration\n  " + "\n  ".join(lines)


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate the configuration.

    ``path`` falls back to ``$DICOMNODE_CONFIG``; with neither, defaults plus environment.
    Raises :class:`ConfigError` with a message naming the offending key.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data: dict[str, Any] = {}
    source = "environment/defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections (node:, storage:, …)")
        data = loaded
    token = _yaml_data.set(data)
    try:
        return Settings()
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
    finally:
        _yaml_data.reset(token)
