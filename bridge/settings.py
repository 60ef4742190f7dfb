"""Configuration, read once at start from the environment and an optional ``.env`` file.

Credentials use the variables Alibaba Cloud's own SDKs and CLI read (``ALIBABA_CLOUD_ACCESS_KEY_ID`` …); every
other setting is ``BRIDGE_<NAME>``. A secret may instead be read from the file named by the same variable with
``_FILE`` appended, as container orchestrators mount secrets. :func:`load_settings` turns every problem into one
line naming the variable and why, and never shows a secret's value.
"""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from yarl import URL

from bridge.errors import SettingsError

__all__ = ["API_FLAVOURS", "SECRET_FIELDS", "Settings", "env_name", "load_settings", "origins", "split_amqp_urls"]

# Endpoint and API version of the two flavours of the Domain API; request and response fields are identical.
API_FLAVOURS: dict[str, tuple[str, str]] = {
    "domain-intl": ("https://domain-intl.aliyuncs.com", "2017-12-18"),
    "domain": ("https://domain.aliyuncs.com", "2018-01-29"),
}

_CREDENTIAL_ENV = {
    "access_key_id": "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "access_key_secret": "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "security_token": "ALIBABA_CLOUD_SECURITY_TOKEN",
}
# Settings whose value is never shown; each may also come from a file named by ``<VAR>_FILE``.
SECRET_FIELDS = ("access_key_id", "access_key_secret", "security_token", "amqp_url")


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (``BRIDGE_REQUEST_TIMEOUT_SECONDS`` for ``request_timeout_s``)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return _CREDENTIAL_ENV.get(field, f"BRIDGE_{field.upper()}")


class _SecretFilesSource(PydanticBaseSettingsSource):
    """Reads ``<VAR>_FILE`` for the secret settings, so a mounted secret file can replace the variable."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        problems: list[str] = []
        for field in SECRET_FIELDS:
            var = env_name(field)
            path = os.environ.get(f"{var}_FILE")
            if not path:
                continue
            if os.environ.get(var):
                problems.append(f"{var}_FILE: set together with {var}; set only one of them")
                continue
            try:
                values[field] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{var}_FILE: cannot read {path!r} ({exc.strerror or type(exc).__name__})")
        if problems:
            raise SettingsError(problems)
        return values


class Settings(BaseSettings):
    """Every setting of task-bridge. Field names carry units; docs/operating.md's settings table mirrors it."""

    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # --- credentials (Alibaba Cloud's own variable names) ---
    access_key_id: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ALIBABA_CLOUD_ACCESS_KEY_ID", "access_key_id")
    )
    access_key_secret: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "access_key_secret")
    )
    security_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ALIBABA_CLOUD_SECURITY_TOKEN", "security_token")
    )

    # --- upstream ---
    upstream_api: Literal["domain-intl", "domain"] = "domain-intl"
    upstream_endpoint: str | None = None
    signature_version: Literal["v3", "v1"] = "v3"
    lang: Literal["en", "zh"] = "en"
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=300, validation_alias=AliasChoices("BRIDGE_REQUEST_TIMEOUT_SECONDS")
    )
    task_result_status: Literal[2, 3] | None = None
    domain_name: str | None = None
    instance_id: str | None = None
    task_no: str | None = None
    user_client_ip: str | None = None
    page_size: int = Field(default=1000, ge=1, le=1000)
    # 100 ids of 32 characters keep an AcknowledgeTaskResult request line under 8 KiB (docs/upstream.md).
    ack_batch_size: int = Field(default=100, ge=1, le=1000)
    ack_concurrency: int = Field(default=4, ge=1, le=64)
    read_ahead: bool = True
    # A full page of 1000 details is about 0.42 MiB (the simulator's, measured); 16 MiB leaves room for 38 times that.
    upstream_max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    upstream_ca_file: Path | None = None
    # 10,000 ids (~1.7 MB) keep the RSS flat with the backlog; a detail that comes back does so within a poll or two.
    ack_memory: int = Field(default=10_000, ge=0, le=10_000_000)

    # --- broker and event contract ---
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = Field(default="domain.tasks", min_length=1, max_length=200)
    event_source: str = Field(default="urn:alibabacloud:domain", min_length=1)
    max_in_flight: int = Field(default=512, ge=1, le=65535)
    publish_timeout_s: float = Field(
        default=10.0, gt=0, le=300, validation_alias=AliasChoices("BRIDGE_PUBLISH_TIMEOUT_SECONDS")
    )
    # AMQP heartbeat: 4 s finds a dead, idle link within 17 s (see docs/broker.md, dead_link_detection_s), and lets
    # the broker free a dead host's leader lock within 3 x 4 + 2 = 14 s, under the 15 s takeover bound
    # (docs/leadership.md).
    amqp_heartbeat_s: int = Field(
        default=4, ge=1, le=60, validation_alias=AliasChoices("BRIDGE_AMQP_HEARTBEAT_SECONDS")
    )
    amqp_ca_file: Path | None = None
    amqp_cert_file: Path | None = None
    amqp_key_file: Path | None = None

    # --- replicas ---
    # The account this process polls; it names the leader lock <exchange>.leader.<account>. 40 characters keep the
    # lock's name within RabbitMQ's 255 bytes next to the longest exchange name.
    account: str = Field(default="default", min_length=1, max_length=40, pattern=r"^[a-z0-9-]+$")
    leader_election: bool = True

    # --- run loop ---
    poll_interval_s: float = Field(
        default=5.0, gt=0, le=3600, validation_alias=AliasChoices("BRIDGE_POLL_INTERVAL_SECONDS")
    )
    backoff_initial_s: float = Field(
        default=0.5, gt=0, le=60, validation_alias=AliasChoices("BRIDGE_BACKOFF_INITIAL_SECONDS")
    )
    backoff_max_s: float = Field(
        default=30.0, gt=0, le=3600, validation_alias=AliasChoices("BRIDGE_BACKOFF_MAX_SECONDS")
    )
    shutdown_timeout_s: float = Field(
        default=20.0, gt=0, le=600, validation_alias=AliasChoices("BRIDGE_SHUTDOWN_TIMEOUT_SECONDS")
    )
    once_deadline_s: float = Field(default=300.0, gt=0, validation_alias=AliasChoices("BRIDGE_ONCE_DEADLINE_SECONDS"))

    # --- observability ---
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    ready_max_poll_age_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("BRIDGE_READY_MAX_POLL_AGE_SECONDS")
    )
    ready_max_refused_s: float = Field(
        default=10.0, gt=0, validation_alias=AliasChoices("BRIDGE_READY_MAX_REFUSED_SECONDS")
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # None: text when stderr is a terminal, JSON otherwise (decided where the logs are configured).
    log_format: Literal["json", "text"] | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _SecretFilesSource(settings_cls), dotenv_settings)

    @field_validator(
        "access_key_id",
        "access_key_secret",
        "security_token",
        "upstream_endpoint",
        "task_result_status",
        "domain_name",
        "instance_id",
        "task_no",
        "user_client_ip",
        "log_format",
        "upstream_ca_file",
        "amqp_ca_file",
        "amqp_cert_file",
        "amqp_key_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `NAME=` in an env file or a compose file means "not set", not "set to the empty string".
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("task_result_status", mode="before")
    @classmethod
    def _status_from_text(cls, value: object) -> object:
        # Environment values are text; the Literal[2, 3] would not accept "2" without this.
        if isinstance(value, str) and value.strip() in ("2", "3"):
            return int(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("upstream_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("upstream_ca_file")
    @classmethod
    def _check_upstream_ca_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        try:
            ssl.create_default_context(cafile=str(value))
        except FileNotFoundError:
            raise ValueError("no such file") from None
        except ssl.SSLError:  # an OSError too: first
            raise ValueError("holds no PEM CA certificate") from None
        except OSError as exc:
            raise ValueError(f"cannot read it ({exc.strerror or type(exc).__name__})") from None
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr) -> SecretStr:
        # Every message here names the part that is wrong, never the URL itself: it carries the password.
        urls = split_amqp_urls(value.get_secret_value())
        for position, text in enumerate(urls, start=1):
            where = f"URL {position} of {len(urls)} " if len(urls) > 1 else ""
            try:
                _check_one_amqp_url(text)
            except ValueError as exc:
                raise ValueError(f"{where}{exc}") from None
        schemes = [text.partition("://")[0] for text in urls]
        if len(set(schemes)) > 1:
            # One set of TLS settings serves every node; a plain URL in the list would fail over to plain text.
            raise ValueError(f"mixes {' and '.join(sorted(set(schemes)))}: list only amqp:// or only amqps:// URLs")
        return value

    @field_validator("exchange")
    @classmethod
    def _check_exchange(cls, value: str) -> str:
        if value.startswith("amq."):
            raise ValueError("names starting with 'amq.' are reserved by RabbitMQ")
        return value

    @model_validator(mode="after")
    def _check_backoff(self) -> Settings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("BRIDGE_BACKOFF_MAX_SECONDS must not be below BRIDGE_BACKOFF_INITIAL_SECONDS")
        return self

    @model_validator(mode="after")
    def _check_amqp_tls(self) -> Settings:
        tls_files = [env_name(f) for f in ("amqp_ca_file", "amqp_cert_file", "amqp_key_file") if getattr(self, f)]
        if tls_files and not self.amqp_tls:
            # aiormq would ignore them and connect in plain text.
            raise ValueError(f"{', '.join(tls_files)} set, but BRIDGE_AMQP_URL is not an amqps:// URL")
        if self.amqp_key_file and not self.amqp_cert_file:
            raise ValueError("BRIDGE_AMQP_KEY_FILE is set without BRIDGE_AMQP_CERT_FILE")
        if self.amqp_tls:
            self.amqp_ssl_context()  # unreadable or malformed files stop the process at start
        return self

    # --- derived values ---
    @property
    def endpoint(self) -> str:
        """Base URL of the upstream API: the override, or the flavour's public endpoint."""
        return self.upstream_endpoint or API_FLAVOURS[self.upstream_api][0]

    @property
    def api_version(self) -> str:
        return API_FLAVOURS[self.upstream_api][1]

    @property
    def unrouted_exchange(self) -> str:
        return f"{self.exchange}.unrouted"

    @property
    def invalid_exchange(self) -> str:
        return f"{self.exchange}.invalid"

    @property
    def amqp_urls(self) -> list[str]:
        """The broker URLs of ``BRIDGE_AMQP_URL`` in the order they are tried (one, or a cluster's nodes)."""
        return split_amqp_urls(self.amqp_url.get_secret_value())

    @property
    def amqp_tls(self) -> bool:
        return self.amqp_urls[0].startswith("amqps://")  # every URL of a list has the same scheme

    def amqp_node(self, index: int) -> Settings:
        """These settings with ``BRIDGE_AMQP_URL`` reduced to its URL number ``index`` (from 0): one broker node."""
        urls = self.amqp_urls
        if len(urls) == 1:
            return self
        return self.model_copy(update={"amqp_url": SecretStr(urls[index % len(urls)])})

    def amqp_ssl_context(self) -> ssl.SSLContext:
        """The TLS context for an ``amqps://`` broker: verification always on (the system CAs, or the CA file).

        Raises ``ValueError`` naming the variable whose file cannot be read or used.
        """
        try:
            context = ssl.create_default_context(cafile=self.amqp_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"BRIDGE_AMQP_CA_FILE: cannot use {str(self.amqp_ca_file)!r} ({_ssl_why(exc)})") from None
        if self.amqp_cert_file is not None:
            try:
                context.load_cert_chain(self.amqp_cert_file, self.amqp_key_file)
            except (OSError, ssl.SSLError) as exc:
                files = [str(f) for f in (self.amqp_cert_file, self.amqp_key_file) if f is not None]
                raise ValueError(
                    f"BRIDGE_AMQP_CERT_FILE/BRIDGE_AMQP_KEY_FILE: cannot use {', '.join(files)} ({_ssl_why(exc)})"
                ) from None
        return context

    @property
    def amqp_url_masked(self) -> str:
        """The AMQP URL (every URL of a list, joined by ``", "``) with any password replaced, safe for logs."""
        return ", ".join(_mask_amqp_url(url) for url in self.amqp_urls)

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds (each AMQP URL and password alone too), longest first."""
        # A URL without a password is no secret: its host stays readable in the messages that name it.
        text = self.amqp_url.get_secret_value()
        values = [v for v in (text, *self.amqp_urls) if "@" in v]
        for url in self.amqp_urls:
            userinfo = url.partition("://")[2].rpartition("@")[0]
            user, colon, password = userinfo.partition(":")
            # A password equal to the user name (guest:guest) hides nothing the masked URL does not show
            # already, and masking it would blank out the user name wherever it appears.
            if colon and password != user:
                values.append(password)
        values += [v.get_secret_value() for v in (self.access_key_secret, self.security_token) if v is not None]
        # Very short values would blank out ordinary words; longest first leaves no tail of a longer one behind.
        return sorted({v for v in values if len(v) >= 3}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` (a foreign library's error, say) with every secret value replaced by ``***``."""
        for secret in self.secret_values():
            text = text.replace(secret, "***")
        return text

    def masked(self) -> dict[str, Any]:
        """Every setting by field name, safe to show: secrets as ``***`` (or ``None``), the AMQP URL masked."""
        values: dict[str, Any] = {}
        for field in type(self).model_fields:
            value = getattr(self, field)
            if field == "amqp_url":
                value = self.amqp_url_masked
            elif isinstance(value, SecretStr):
                value = "***"
            elif isinstance(value, str):
                value = self.scrub(value)
            values[field] = value
        return values

    def require_credentials(self) -> None:
        """Raise :class:`SettingsError` when the access key pair is missing (needed by every upstream call)."""
        missing = [env_name(f) for f in ("access_key_id", "access_key_secret") if getattr(self, f) is None]
        if missing:
            raise SettingsError([f"{var}: required (or set {var}_FILE)" for var in missing])


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A comma starts the next URL only where one follows it, so a comma inside a password needs no escape.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)")
_OTHER_URL_AFTER_COMMA = re.compile(r",\s*[A-Za-z][A-Za-z0-9+.-]*://")


def split_amqp_urls(text: str) -> list[str]:
    """The URLs of a ``BRIDGE_AMQP_URL`` value: one, or several separated by commas (spaces around them allowed)."""
    return _URL_SEPARATOR.split(text.strip())


def _check_one_amqp_url(text: str) -> None:
    """Raise ``ValueError`` naming what is wrong with one broker URL (never the URL: it carries the password)."""
    if not text.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    if "," in text.rpartition("@")[2] or _OTHER_URL_AFTER_COMMA.search(text):
        raise ValueError("has a ',' after its host: separate URLs by commas, each starting with amqp:// or amqps://")
    if _BAD_ESCAPE.search(text):
        raise ValueError("has a '%' not followed by two hex digits (write a literal '%' as %25)")
    try:
        url = URL(text)
    except ValueError:
        raise ValueError("does not parse as a URL (check the port and the brackets of an IPv6 host)") from None
    if not url.host:
        raise ValueError("names no host")
    if url.explicit_port is not None and not 0 < url.explicit_port <= 65535:
        raise ValueError("has a port outside 1-65535")
    if url.raw_path.count("/") > 1:
        raise ValueError("has a '/' inside the virtual host name: write it as %2F")
    for option in url.query:
        if option in _REFUSED_URL_OPTIONS:
            raise ValueError(f"option {option!r} is not supported: {_REFUSED_URL_OPTIONS[option]}")


def _mask_amqp_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


# URL query options aiormq reads on its own, each of which would bypass or silently override a setting.
_TLS_INSTEAD = "set BRIDGE_AMQP_CA_FILE, BRIDGE_AMQP_CERT_FILE and BRIDGE_AMQP_KEY_FILE instead"
_REFUSED_URL_OPTIONS = {
    "no_verify_ssl": "TLS verification cannot be turned off; trust the broker's CA with BRIDGE_AMQP_CA_FILE",
    "cafile": _TLS_INSTEAD,
    "capath": _TLS_INSTEAD,
    "cadata": _TLS_INSTEAD,
    "certfile": _TLS_INSTEAD,
    "keyfile": _TLS_INSTEAD,
    "ca_certs": _TLS_INSTEAD,
    "cert_reqs": "TLS verification cannot be turned off; trust the broker's CA with BRIDGE_AMQP_CA_FILE",
    "ssl_version": "the TLS version is negotiated",
    "heartbeat": "set BRIDGE_AMQP_HEARTBEAT_SECONDS instead",
}


def _ssl_why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__


def _describe(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    field = loc[0] if loc else ""
    name = field if field.isupper() else env_name(field) if field else "settings"
    why = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not field and why.startswith("BRIDGE_"):
        return why  # a check across settings, whose message names its variables itself
    if field in SECRET_FIELDS or any(var == field for var in _CREDENTIAL_ENV.values()):
        return f"{name}: {why}"
    value = error.get("input")
    if value is None or isinstance(value, dict):
        return f"{name}: {why}"
    return f"{name}: {why} (got {value!r})"


def origins() -> dict[str, str]:
    """Where each setting's value comes from, by field name, in the order :class:`Settings` reads them.

    ``environment``, ``file <path> (<VAR>_FILE)`` for a secret read from a file, ``.env file`` or ``default``.
    Call it after :func:`load_settings` succeeded (a secret file it cannot read raises :class:`SettingsError`).
    """
    names = {field: {field.lower(), env_name(field).lower()} for field in Settings.model_fields}

    def field_of(key: str) -> str | None:
        return next((field for field, known in names.items() if key.lower() in known), None)

    dotenv = f"{Settings.model_config.get('env_file')} file"
    layers: list[dict[str, str]] = [
        dict.fromkeys(EnvSettingsSource(Settings)(), "environment"),
        {
            field: f"file {os.environ[f'{env_name(field)}_FILE']} ({env_name(field)}_FILE)"
            for field in _SecretFilesSource(Settings)()
        },
        dict.fromkeys(DotEnvSettingsSource(Settings)(), dotenv),
    ]
    found: dict[str, str] = {}
    for layer in layers:
        for key, origin in layer.items():
            field = field_of(key)
            if field is not None:
                found.setdefault(field, origin)
    return {field: found.get(field, "default") for field in Settings.model_fields}


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings`, turning every validation problem into one line of a :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError([_describe(err) for err in exc.errors()]) from None
