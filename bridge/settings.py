"""Configuration, read once at start: the environment, an optional ``.env`` file and an optional TOML file.

The settings come in sections, one per concern, and each component receives only its own:

- :class:`UpstreamSettings`: how the bridge talks to Alibaba's API (timeouts, page and batch sizes, TLS);
- :class:`AccountSettings`, one per account: its name, credentials, API flavour, endpoint, signing and filters;
- :class:`BrokerSettings`: the broker, the exchange and the publish window;
- :class:`DeliverySettings`: the run loop's pacing, backoff, deadlines and leader election;
- :class:`OperatorSettings`: the operator port and the logs.

Every setting keeps its one environment variable: ``BRIDGE_<NAME>`` (``_SECONDS`` for a field ending in ``_s``),
and for the credentials the variables Alibaba Cloud's own SDKs read (``ALIBABA_CLOUD_ACCESS_KEY_ID`` …). A secret
may instead be read from the file named by the same variable with ``_FILE`` appended, as orchestrators mount
secrets. A TOML file (``task-bridge run --config FILE`` or ``BRIDGE_CONFIG_FILE``) holds the same settings, lower
case without ``BRIDGE_``, and may list several ``[[accounts]]``; the environment overrides its top-level keys.
Without ``[[accounts]]`` the environment defines one account, named by ``BRIDGE_ACCOUNT`` (``default``).

:func:`load_settings` turns every problem into one line naming the variable (or the file's key) and why, and
never shows a secret's value. The credentials are checked there, once.
"""

from __future__ import annotations

import os
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from yarl import URL

from bridge.errors import SettingsError
from bridge.events import ACCOUNT_PATTERN
from bridge.signing import Credentials

__all__ = [
    "API_FLAVOURS",
    "CONFIG_FILE_VARIABLE",
    "SECRET_FIELDS",
    "SETTING_NAMES",
    "AccountSettings",
    "BrokerSettings",
    "DeliverySettings",
    "OperatorSettings",
    "Settings",
    "UpstreamSettings",
    "default_of",
    "env_name",
    "load_settings",
    "origins",
    "split_amqp_urls",
]

# Endpoint and API version of the two flavours of the Domain API; request and response fields are identical.
API_FLAVOURS: dict[str, tuple[str, str]] = {
    "domain-intl": ("https://domain-intl.aliyuncs.com", "2017-12-18"),
    "domain": ("https://domain.aliyuncs.com", "2018-01-29"),
}

CONFIG_FILE_VARIABLE = "BRIDGE_CONFIG_FILE"
_DOTENV = ".env"
_CREDENTIALS = ("access_key_id", "access_key_secret", "security_token")
# Settings (by their flat names) whose value is never shown; each may also come from a file named by <VAR>_FILE.
SECRET_FIELDS = (*_CREDENTIALS, "amqp_url")


def _empty_is_unset(value: object) -> object:
    # `NAME=` in an env file or a compose file means "not set", not "set to the empty string".
    if isinstance(value, str) and not value.strip():
        return None
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class UpstreamSettings(_Section):
    """How the bridge talks to Alibaba's Domain API, the same for every account."""

    request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    page_size: int = Field(default=1000, ge=1, le=1000)
    # 100 ids of 32 characters keep an AcknowledgeTaskResult request line under 8 KiB (docs/upstream.md).
    ack_batch_size: int = Field(default=100, ge=1, le=1000)
    ack_concurrency: int = Field(default=4, ge=1, le=64)
    # A full page of 1000 details is about 0.42 MiB (the simulator's, measured); 16 MiB leaves room for 38 times that.
    upstream_max_response_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)
    upstream_ca_file: Path | None = None

    _unset = field_validator("upstream_ca_file", mode="before")(_empty_is_unset)

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


class AccountSettings(_Section):
    """One Alibaba Cloud account: the bridge polls, publishes and acknowledges for each on its own."""

    # It names the leader lock <exchange>.leader.<name>; 40 characters keep that within RabbitMQ's 255 bytes next
    # to the longest exchange name.
    name: str = Field(default="default", pattern=ACCOUNT_PATTERN)
    access_key_id: SecretStr | None = None
    access_key_secret: SecretStr | None = None
    security_token: SecretStr | None = None
    api: Literal["domain-intl", "domain"] = "domain-intl"
    endpoint: str | None = None
    signature_version: Literal["v3", "v1"] = "v3"
    lang: Literal["en", "zh"] = "en"
    task_result_status: Literal[2, 3] | None = None
    domain_name: str | None = None
    instance_id: str | None = None
    task_no: str | None = None
    user_client_ip: str | None = None

    _unset = field_validator(
        *_CREDENTIALS,
        "endpoint",
        "task_result_status",
        "domain_name",
        "instance_id",
        "task_no",
        "user_client_ip",
        mode="before",
    )(_empty_is_unset)

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """An account of the config file may name a file per credential: ``access_key_secret_file = "/run/…"``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for field in _CREDENTIALS:
            path = data.pop(f"{field}_file", None)
            if path is None:
                continue
            if data.get(field) is not None:
                raise ValueError(f"{field}_file: set together with {field}; set only one of them")
            data[field] = _read_secret_file(str(path), f"{field}_file")
        return data

    @field_validator("task_result_status", mode="before")
    @classmethod
    def _status_from_text(cls, value: object) -> object:
        # Environment values are text; the Literal[2, 3] would not accept "2" without this.
        if isinstance(value, str) and value.strip() in ("2", "3"):
            return int(value)
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def base_url(self) -> str:
        """Base URL of the upstream API: the endpoint override, or the flavour's public endpoint."""
        return self.endpoint or API_FLAVOURS[self.api][0]

    @property
    def api_version(self) -> str:
        return API_FLAVOURS[self.api][1]

    @property
    def credentials(self) -> Credentials:
        """The key pair; :func:`load_settings` has checked that it is there (``credentials=True``)."""
        if self.access_key_id is None or self.access_key_secret is None:
            raise SettingsError(_missing_credentials(self, several=False))
        return Credentials(self.access_key_id.get_secret_value(), self.access_key_secret, self.security_token)

    def secret_values(self) -> list[str]:
        """The secret and the STS token, in :func:`_scrub` order."""
        return _in_scrub_order(v.get_secret_value() for v in (self.access_key_secret, self.security_token) if v)


class BrokerSettings(_Section):
    """The broker (one URL, or a cluster's), its TLS files, the exchange and the event contract's source."""

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = Field(default="domain.tasks", min_length=1, max_length=200)
    event_source: str = Field(default="urn:alibabacloud:domain", min_length=1)
    max_in_flight: int = Field(default=512, ge=1, le=65535)
    publish_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # AMQP heartbeat: 4 s finds a dead, idle link within 17 s (see docs/broker.md, dead_link_detection_s), and lets
    # the broker free a dead host's leader lock within 3 x 4 + 2 = 14 s, under the 15 s takeover bound
    # (docs/leadership.md).
    amqp_heartbeat_s: int = Field(default=4, ge=1, le=60)
    amqp_ca_file: Path | None = None
    amqp_cert_file: Path | None = None
    amqp_key_file: Path | None = None
    ready_max_refused_s: float = Field(default=10.0, gt=0)

    _unset = field_validator("amqp_ca_file", "amqp_cert_file", "amqp_key_file", mode="before")(_empty_is_unset)

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
    def _check_amqp_tls(self) -> BrokerSettings:
        tls_files = [env_name(f) for f in ("amqp_ca_file", "amqp_cert_file", "amqp_key_file") if getattr(self, f)]
        if tls_files and not self.amqp_tls:
            # aiormq would ignore them and connect in plain text.
            raise ValueError(f"{', '.join(tls_files)} set, but BRIDGE_AMQP_URL is not an amqps:// URL")
        if self.amqp_key_file and not self.amqp_cert_file:
            raise ValueError("BRIDGE_AMQP_KEY_FILE is set without BRIDGE_AMQP_CERT_FILE")
        if self.amqp_tls:
            self.amqp_ssl_context()  # unreadable or malformed files stop the process at start
        return self

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

    def amqp_node(self, index: int) -> BrokerSettings:
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
        """Each AMQP URL with a password, and each password alone, in :func:`_scrub` order."""
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
        return _in_scrub_order(values)

    def scrub(self, text: str) -> str:
        """``text`` (a foreign library's error, say) with the broker's secrets replaced by ``***``."""
        return _scrub(text, self.secret_values())


class DeliverySettings(_Section):
    """The run loop of each account: pacing, what it remembers, backoff, deadlines, leader election."""

    poll_interval_s: float = Field(default=5.0, gt=0, le=3600)
    read_ahead: bool = True
    # 10,000 ids (~1.7 MB) keep the RSS flat with the backlog; a detail that comes back does so within a poll or two.
    ack_memory: int = Field(default=10_000, ge=0, le=10_000_000)
    leader_election: bool = True
    backoff_initial_s: float = Field(default=0.5, gt=0, le=60)
    backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=600)
    once_deadline_s: float = Field(default=300.0, gt=0)
    ready_max_poll_age_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check_backoff(self) -> DeliverySettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("BRIDGE_BACKOFF_MAX_SECONDS must not be below BRIDGE_BACKOFF_INITIAL_SECONDS")
        return self


class OperatorSettings(_Section):
    """The operator port (``/metrics``, ``/healthz``, ``/readyz``) and the logs."""

    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=9108, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # None: text when stderr is a terminal, JSON otherwise (decided where the logs are configured).
    log_format: Literal["json", "text"] | None = None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        value = _empty_is_unset(value)
        return value.strip().lower() if isinstance(value, str) else value


# --- where each setting lives, and its variable ---
_SECTIONS: dict[str, type[_Section]] = {
    "account": AccountSettings,
    "upstream": UpstreamSettings,
    "broker": BrokerSettings,
    "delivery": DeliverySettings,
    "operator": OperatorSettings,
}
# Account fields whose variable (and flat name) is not BRIDGE_<FIELD>.
_ACCOUNT_VARIABLES = {
    "name": ("BRIDGE_ACCOUNT", "account"),
    "api": ("BRIDGE_UPSTREAM_API", "upstream_api"),
    "endpoint": ("BRIDGE_UPSTREAM_ENDPOINT", "upstream_endpoint"),
    **{field: (f"ALIBABA_CLOUD_{field.upper()}", field) for field in _CREDENTIALS},
}


@dataclass(frozen=True, slots=True)
class _Setting:
    section: str
    field: str
    variable: str  # BRIDGE_PAGE_SIZE
    flat: str  # page_size: the name load_settings() takes, and `config` and the start line show


def _all_settings() -> Iterator[_Setting]:
    for section, model in _SECTIONS.items():
        for field in model.model_fields:
            if section == "account" and field in _ACCOUNT_VARIABLES:
                variable, flat = _ACCOUNT_VARIABLES[field]
            else:
                flat = field
                variable = "BRIDGE_" + (f"{field[:-2]}_seconds" if field.endswith("_s") else field).upper()
            yield _Setting(section, field, variable, flat)


_BY_VARIABLE = {s.variable: s for s in _all_settings()}
SETTING_NAMES: tuple[str, ...] = tuple(s.flat for s in _all_settings())
"""Every setting by its flat name (``page_size``), in the order of the settings table."""
_BY_FLAT = {s.flat: s for s in _all_settings()}
_BY_PLACE = {(s.section, s.field): s for s in _all_settings()}
# The config file's top-level keys: a BRIDGE_ variable in lower case without the prefix (credentials excluded).
_BY_FILE_KEY = {s.variable.removeprefix("BRIDGE_").lower(): s for s in _all_settings() if s.flat not in _CREDENTIALS}


def default_of(flat: str) -> Any:
    """The default of a setting by its flat name (``None`` for an optional one)."""
    setting = _BY_FLAT[flat]
    return _SECTIONS[setting.section].model_fields[setting.field].get_default(call_default_factory=True)


def env_name(flat: str) -> str:
    """The environment variable of a setting by its flat name (``BRIDGE_REQUEST_TIMEOUT_SECONDS`` for
    ``request_timeout_s``)."""
    setting = _BY_FLAT.get(flat)
    return setting.variable if setting is not None else f"BRIDGE_{flat.upper()}"


# --- the sources, in order of precedence ---
@dataclass(frozen=True, slots=True)
class _ConfigFile:
    path: str
    top: dict[str, Any]  # flat names -> values
    accounts: list[dict[str, Any]] | None


_config_file: ContextVar[_ConfigFile | None] = ContextVar("bridge_config_file", default=None)


def _grouped(flat_values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"page_size": 5}`` -> ``{"upstream": {"page_size": 5}}``; ``accounts`` passes through."""
    grouped: dict[str, Any] = {}
    for flat, value in flat_values.items():
        if flat == "accounts":
            grouped["accounts"] = value
            continue
        setting = _BY_FLAT[flat]
        grouped.setdefault(setting.section, {})[setting.field] = value
    return grouped


def _from_variables(values: Mapping[str, str | None]) -> dict[str, Any]:
    """The settings among ``values`` (variable -> text; names case-insensitive), by flat name."""
    found: dict[str, Any] = {}
    for name, value in values.items():
        setting = _BY_VARIABLE.get(name.upper())
        if setting is not None and value is not None:
            found[setting.flat] = value
    return found


def _environment() -> dict[str, Any]:
    return _from_variables(os.environ)


def _dotenv() -> dict[str, Any]:
    return _from_variables(dotenv_values(_DOTENV)) if Path(_DOTENV).is_file() else {}


def _secret_files() -> dict[str, Any]:
    """``<VAR>_FILE`` for the secret settings, so a mounted secret file can replace the variable."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for flat in SECRET_FIELDS:
        var = env_name(flat)
        path = os.environ.get(f"{var}_FILE")
        if not path:
            continue
        if os.environ.get(var):
            problems.append(f"{var}_FILE: set together with {var}; set only one of them")
            continue
        try:
            values[flat] = _read_secret_file(path, f"{var}_FILE")
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise SettingsError(problems)
    return values


def _from_config_file() -> dict[str, Any]:
    config = _config_file.get()
    if config is None:
        return {}
    values = dict(config.top)
    if config.accounts is not None:
        values["accounts"] = config.accounts
    return values


class _Layer(PydanticBaseSettingsSource):
    """One source of settings by flat name, handed to pydantic-settings grouped into sections."""

    def __init__(self, settings_cls: type[BaseSettings], read: Callable[[], dict[str, Any]]) -> None:
        super().__init__(settings_cls)
        self._read = read

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _grouped(self._read())


class Settings(BaseSettings):
    """Every setting of task-bridge, by section; docs/operating.md's settings table lists the variables."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    operator: OperatorSettings = Field(default_factory=OperatorSettings)
    accounts: tuple[AccountSettings, ...] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: load_settings' overrides, the environment, <VAR>_FILE secrets, .env, the config file.
        layers = (_environment, _secret_files, _dotenv, _from_config_file)
        return (init_settings, *(_Layer(settings_cls, read) for read in layers))

    @model_validator(mode="before")
    @classmethod
    def _resolve_accounts(cls, data: Any) -> Any:
        """The accounts: the config file's ``[[accounts]]``, else the one the environment defines.

        Every per-account setting outside ``[[accounts]]`` (``BRIDGE_UPSTREAM_API``, the filters …) is each
        account's default. Credentials and a name outside ``[[accounts]]`` would be ambiguous next to it.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shared = dict(data.pop("account", None) or {})
        listed = data.get("accounts")
        if listed is None:
            data["accounts"] = [shared]
            return data
        clash = [_BY_PLACE["account", field].variable for field in ("name", *_CREDENTIALS) if field in shared]
        if clash:
            raise ValueError(
                f"{', '.join(clash)}: set, but the config file lists [[accounts]]; "
                "give each account its name and credentials in its [[accounts]] table"
            )
        data["accounts"] = [{**shared, **entry} if isinstance(entry, dict) else entry for entry in listed]
        return data

    @field_validator("accounts")
    @classmethod
    def _unique_names(cls, accounts: tuple[AccountSettings, ...]) -> tuple[AccountSettings, ...]:
        names = [account.name for account in accounts]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"account names must be unique: {', '.join(twice)} appear more than once")
        return accounts

    @property
    def account(self) -> AccountSettings:
        """The first account (the only one, unless the config file lists several)."""
        return self.accounts[0]

    def get(self, flat: str) -> Any:
        """A setting's value by its flat name (``page_size``); an account's setting is the first account's."""
        setting = _BY_FLAT[flat]
        return getattr(getattr(self, setting.section), setting.field)

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds (each AMQP URL and password alone too), longest first."""
        return _in_scrub_order([*self.broker.secret_values(), *(v for a in self.accounts for v in a.secret_values())])

    def scrub(self, text: str) -> str:
        """``text`` (a foreign library's error, say) with every secret value replaced by ``***``."""
        return _scrub(text, self.secret_values())

    def masked(self) -> dict[str, Any]:
        """Every setting by flat name, safe to show: secrets as ``***`` (or ``None``), the AMQP URL masked.

        With several accounts, ``accounts`` lists each account's settings the same way.
        """
        secrets = self.secret_values()

        def shown(value: Any) -> Any:
            if isinstance(value, SecretStr):
                return "***"
            return _scrub(value, secrets) if isinstance(value, str) else value

        values: dict[str, Any] = {}
        for setting in _BY_FLAT.values():
            if setting.section == "account":
                if len(self.accounts) == 1:
                    values[setting.flat] = shown(getattr(self.account, setting.field))
                continue
            section = getattr(self, setting.section)
            value = section.amqp_url_masked if setting.flat == "amqp_url" else getattr(section, setting.field)
            values[setting.flat] = shown(value)
        if len(self.accounts) > 1:
            values["accounts"] = [
                {field: shown(getattr(account, field)) for field in AccountSettings.model_fields}
                for account in self.accounts
            ]
        return values


def _in_scrub_order(values: Iterable[str]) -> list[str]:
    """Distinct secrets, longest first, leaving out those under 3 characters.

    Very short values would blank out ordinary words; longest first leaves no tail of a longer one behind.
    """
    return sorted({v for v in values if len(v) >= 3}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` (in :func:`_in_scrub_order`) replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _read_secret_file(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path!r} ({exc.strerror or type(exc).__name__})") from None


def _missing_credentials(account: AccountSettings, *, several: bool) -> list[str]:
    missing = [field for field in ("access_key_id", "access_key_secret") if getattr(account, field) is None]
    if several:
        return [f"account {account.name!r}: {field}: required (or set {field}_file)" for field in missing]
    return [f"{env_name(field)}: required (or set {env_name(field)}_FILE)" for field in missing]


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


# --- the config file ---
def _config_path(config_file: str | Path | None) -> str | None:
    if config_file is not None and str(config_file):
        return str(config_file)
    return os.environ.get(CONFIG_FILE_VARIABLE) or None


def _read_config_file(path: str) -> _ConfigFile:
    """The TOML file's settings by flat name, and its ``[[accounts]]``; every problem one line naming the file."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError([f"config file {path!r}: cannot read it ({exc.strerror or type(exc).__name__})"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError([f"config file {path!r}: not valid TOML ({' '.join(str(exc).split())})"]) from None
    problems: list[str] = []
    top: dict[str, Any] = {}
    accounts: list[dict[str, Any]] | None = None
    for key, value in data.items():
        if key == "accounts":
            if isinstance(value, list) and value and all(isinstance(entry, dict) for entry in value):
                accounts = value
            else:
                problems.append(f"config file {path!r}: accounts: must be one or more [[accounts]] tables")
            continue
        setting = _BY_FILE_KEY.get(key)
        if setting is None:
            credential = key.removesuffix("_file") in _CREDENTIALS
            hint = ": credentials belong in an [[accounts]] table" if credential else ""
            problems.append(f"config file {path!r}: unknown setting {key!r}{hint}")
            continue
        top[setting.flat] = value
    if problems:
        raise SettingsError(problems)
    return _ConfigFile(path, top, accounts)


# --- problems, one line each ---
def _describe(error: Any, config: _ConfigFile | None) -> str:
    loc = list(error.get("loc", ()))
    why = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    unknown = error.get("type") == "extra_forbidden"
    if unknown:
        why = "unknown key"
    if loc and loc[0] == "accounts":
        if config is not None and config.accounts is not None:
            return _describe_listed_account(loc, why, error.get("input"), config, show_value=not unknown)
        loc = ["account", *loc[2:]]  # the one account the environment defines
    if len(loc) < 2:
        return why  # a check across settings, whose message names its variables itself
    setting = _BY_PLACE.get((str(loc[0]), str(loc[1])))
    if setting is None:
        return f"{'.'.join(map(str, loc))}: {why}"
    name = _where(setting, config)
    value = error.get("input")
    if unknown or setting.flat in SECRET_FIELDS or value is None or isinstance(value, dict):
        return f"{name}: {why}"
    return f"{name}: {why} (got {value!r})"


def _where(setting: _Setting, config: _ConfigFile | None) -> str:
    """The variable of ``setting``, or the config file's key when only the file sets it."""
    if config is not None and setting.flat in config.top and _from_file_only(setting):
        return f"{setting.variable.removeprefix('BRIDGE_').lower()} (config file {config.path!r})"
    return setting.variable


def _describe_listed_account(loc: list[Any], why: str, value: Any, config: _ConfigFile, *, show_value: bool) -> str:
    index = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else None
    where = f"config file {config.path!r}: [[accounts]]"
    if index is not None and config.accounts is not None and index < len(config.accounts):
        name = config.accounts[index].get("name")
        where += f" {index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
    if len(loc) < 3:
        return f"{where}: {why}"
    field = str(loc[2])
    shown = show_value and field not in _CREDENTIALS and value is not None and not isinstance(value, dict)
    return f"{where}: {field}: {why}" + (f" (got {value!r})" if shown else "")


def _from_file_only(setting: _Setting) -> bool:
    """Whether the environment (or .env, or a secret file) leaves this setting to the config file."""
    return setting.flat not in _environment() and setting.flat not in _dotenv()


def origins(config_file: str | Path | None = None) -> dict[str, str]:
    """Where each setting's value comes from, by flat name, in the order of the settings table.

    ``environment``, ``file <path> (<VAR>_FILE)`` for a secret read from a file, ``.env file``,
    ``config file <path>`` or ``default``; with ``[[accounts]]``, ``accounts.<name>.<key>`` entries too (a key the
    account's table sets, else where the setting's default for every account comes from). Call it after
    :func:`load_settings` succeeded.
    """
    path = _config_path(config_file)
    config = _read_config_file(path) if path else None
    secret_files = {
        flat: f"file {os.environ[f'{env_name(flat)}_FILE']} ({env_name(flat)}_FILE)" for flat in _secret_files()
    }
    layers: list[dict[str, str]] = [
        dict.fromkeys(_environment(), "environment"),
        secret_files,
        dict.fromkeys(_dotenv(), f"{_DOTENV} file"),
        dict.fromkeys(config.top if config else (), f"config file {path}"),
    ]
    found: dict[str, str] = {}
    for layer in layers:
        for flat, origin in layer.items():
            found.setdefault(flat, origin)
    result = {flat: found.get(flat, "default") for flat in _BY_FLAT}
    for entry in config.accounts if config is not None and config.accounts is not None else ():
        for field in AccountSettings.model_fields:
            if f"{field}_file" in entry:
                origin = f"file {entry[f'{field}_file']} ({field}_file, config file {path})"
            elif field in entry:
                origin = f"config file {path}"
            else:
                origin = result[_BY_PLACE["account", field].flat]
            result[f"accounts.{entry.get('name')}.{field}"] = origin
    return result


def load_settings(config_file: str | Path | None = None, *, credentials: bool = False, **overrides: Any) -> Settings:
    """Build :class:`Settings`, turning every problem into one line of a :class:`SettingsError`.

    ``config_file`` (else ``BRIDGE_CONFIG_FILE``) is the TOML file; ``overrides`` take flat names
    (``page_size=10``, ``upstream_endpoint=…``, ``accounts=[{…}]``) and win over every source. With
    ``credentials``, every account must have its access key pair: the one place that checks it.
    """
    unknown = sorted(set(overrides) - {*_BY_FLAT, "accounts"})
    if unknown:
        raise TypeError(f"load_settings() got unknown settings: {', '.join(unknown)}")
    path = _config_path(config_file)
    config = _read_config_file(path) if path else None
    token = _config_file.set(config)
    try:
        settings = Settings(**_grouped(overrides))
    except ValidationError as exc:
        errors = exc.errors()
        # An account that fails leaves the list of accounts empty too: that says nothing more.
        known = [e for e in errors if not (e.get("type") == "too_short" and tuple(e.get("loc", ())) == ("accounts",))]
        raise SettingsError([_describe(error, config) for error in known or errors]) from None
    finally:
        _config_file.reset(token)
    if credentials:
        several = (config is not None and config.accounts is not None) or "accounts" in overrides
        problems = [line for account in settings.accounts for line in _missing_credentials(account, several=several)]
        if problems:
            raise SettingsError(problems)
    return settings
