"""Settings: every bad value is one line naming its variable, secrets never show, defaults and flavours hold.

Each test runs in an empty temporary directory (so a stray ``.env`` is never read) with every ``BRIDGE_*`` and
``ALIBABA_CLOUD_*`` variable removed from the environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.errors import SettingsError
from bridge.settings import API_FLAVOURS, SECRET_FIELDS, env_name, load_settings

SECRET = "s3cr3t-Value-42"
TOKEN = "STS.token+/=value-77"
AMQP_PASSWORD = "amqp-pa55word"


pytestmark = pytest.mark.usefixtures("clean_env")


def _problems(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return caught.value.problems


# --- bad values: one line each, naming the variable and (not for secrets) the value ---
BAD_VALUES = [
    ("BRIDGE_UPSTREAM_API", "domain-cn"),
    ("BRIDGE_UPSTREAM_ENDPOINT", "ftp://domain.example"),
    ("BRIDGE_UPSTREAM_ENDPOINT", "domain.aliyuncs.com"),
    ("BRIDGE_SIGNATURE_VERSION", "v2"),
    ("BRIDGE_LANG", "fr"),
    ("BRIDGE_REQUEST_TIMEOUT_SECONDS", "ten"),
    ("BRIDGE_REQUEST_TIMEOUT_SECONDS", "0"),
    ("BRIDGE_REQUEST_TIMEOUT_SECONDS", "301"),
    ("BRIDGE_TASK_RESULT_STATUS", "4"),
    ("BRIDGE_PAGE_SIZE", "0"),
    ("BRIDGE_PAGE_SIZE", "1001"),
    ("BRIDGE_PAGE_SIZE", "1.5"),
    ("BRIDGE_ACK_BATCH_SIZE", "0"),
    ("BRIDGE_ACK_CONCURRENCY", "65"),
    ("BRIDGE_EXCHANGE", "amq.topic"),
    ("BRIDGE_EXCHANGE", "x" * 201),
    ("BRIDGE_EVENT_SOURCE", ""),
    ("BRIDGE_MAX_IN_FLIGHT", "-1"),
    ("BRIDGE_PUBLISH_TIMEOUT_SECONDS", "nan"),
    ("BRIDGE_POLL_INTERVAL_SECONDS", "-5"),
    ("BRIDGE_SHUTDOWN_TIMEOUT_SECONDS", "601"),
    ("BRIDGE_ONCE_DEADLINE_SECONDS", "0"),
    ("BRIDGE_METRICS_PORT", "70000"),
    ("BRIDGE_READY_MAX_POLL_AGE_SECONDS", "soon"),
    ("BRIDGE_LOG_LEVEL", "verbose"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    problems = _problems(monkeypatch, **{variable: value})
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    assert line.startswith(f"{variable}: ")
    # The value is shown as given (log level is upper-cased before it is checked).
    shown = value.upper() if variable == "BRIDGE_LOG_LEVEL" else value
    assert repr(shown) in line


def test_several_bad_values_give_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = _problems(monkeypatch, BRIDGE_PAGE_SIZE="0", BRIDGE_LANG="fr", BRIDGE_METRICS_PORT="-1")
    assert sorted(line.split(":")[0] for line in problems) == [
        "BRIDGE_LANG",
        "BRIDGE_METRICS_PORT",
        "BRIDGE_PAGE_SIZE",
    ]
    assert "BRIDGE_PAGE_SIZE" in str(SettingsError(problems))


def test_backoff_bounds_are_checked_together(monkeypatch: pytest.MonkeyPatch) -> None:
    (line,) = _problems(monkeypatch, BRIDGE_BACKOFF_INITIAL_SECONDS="10", BRIDGE_BACKOFF_MAX_SECONDS="5")
    assert "BRIDGE_BACKOFF_MAX_SECONDS" in line
    assert "BRIDGE_BACKOFF_INITIAL_SECONDS" in line


def test_overrides_are_checked_like_the_environment() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(page_size=5000)
    assert caught.value.problems == ["BRIDGE_PAGE_SIZE: Input should be less than or equal to 1000 (got 5000)"]


# --- secrets ---
def test_a_bad_secret_is_named_but_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    (line,) = _problems(monkeypatch, BRIDGE_AMQP_URL=f"http://bridge:{AMQP_PASSWORD}@rabbit:5672/")
    assert line.startswith("BRIDGE_AMQP_URL: ")
    assert AMQP_PASSWORD not in line
    assert "rabbit" not in line


def test_secrets_never_appear_in_repr_str_dump_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAI-id-value")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", TOKEN)
    monkeypatch.setenv("BRIDGE_AMQP_URL", f"amqp://bridge:{AMQP_PASSWORD}@rabbit:5672/vhost")
    settings = load_settings()
    shown = [repr(settings), str(settings), settings.model_dump_json(), settings.broker.amqp_url_masked]
    for text in shown:
        for secret in (SECRET, TOKEN, AMQP_PASSWORD):
            assert secret not in text
    assert settings.broker.amqp_url_masked == "amqp://bridge:***@rabbit:5672/vhost"
    # The values themselves are intact behind the SecretStr.
    assert settings.account.access_key_secret is not None
    assert settings.account.access_key_secret.get_secret_value() == SECRET
    # An unrelated error while secrets are set does not drag them into the message.
    monkeypatch.setenv("BRIDGE_PAGE_SIZE", "0")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    for secret in (SECRET, TOKEN, AMQP_PASSWORD, "LTAI-id-value"):
        assert secret not in str(caught.value)


def test_missing_credentials_name_both_variables() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(credentials=True)
    assert [line.split(":")[0] for line in caught.value.problems] == [
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    ]
    assert "_FILE" in caught.value.problems[0]


def test_an_empty_credential_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)
    with pytest.raises(SettingsError):
        load_settings(credentials=True)


@pytest.mark.parametrize("status", ["2", "3"])
def test_task_result_status_from_the_environment(monkeypatch: pytest.MonkeyPatch, status: str) -> None:
    monkeypatch.setenv("BRIDGE_TASK_RESULT_STATUS", status)
    assert load_settings().account.task_result_status == int(status)


# --- the _FILE variants ---
@pytest.mark.parametrize("field", SECRET_FIELDS)
def test_a_secret_can_come_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str) -> None:
    value = "amqp://u:p@filehost:5672/" if field == "amqp_url" else f"{field}-from-file"
    path = tmp_path / f"{field}.txt"
    path.write_text(f"{value}\n", encoding="utf-8")  # mounted secrets often end with a newline
    monkeypatch.setenv(f"{env_name(field)}_FILE", str(path))
    secret = load_settings().get(field)
    assert secret is not None
    assert secret.get_secret_value() == value


def test_file_and_variable_both_set_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET, encoding="utf-8")
    (line,) = _problems(
        monkeypatch,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="other",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET_FILE=str(path),
    )
    assert line.startswith("ALIBABA_CLOUD_ACCESS_KEY_SECRET_FILE: ")
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in line.split(":", 1)[1]
    assert SECRET not in line
    assert "other" not in line


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_secret_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope.txt" if kind == "missing" else tmp_path
    (line,) = _problems(monkeypatch, ALIBABA_CLOUD_SECURITY_TOKEN_FILE=str(path))
    assert line.startswith("ALIBABA_CLOUD_SECURITY_TOKEN_FILE: cannot read ")
    assert str(path) in line


def test_problems_of_several_secret_files_are_reported_together(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    problems = _problems(
        monkeypatch,
        ALIBABA_CLOUD_ACCESS_KEY_ID_FILE=str(tmp_path / "a"),
        BRIDGE_AMQP_URL_FILE=str(tmp_path / "b"),
    )
    assert [line.split(":")[0] for line in problems] == ["ALIBABA_CLOUD_ACCESS_KEY_ID_FILE", "BRIDGE_AMQP_URL_FILE"]


def test_a_bad_secret_from_a_file_is_not_shown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "amqp.txt"
    path.write_text(f"https://u:{AMQP_PASSWORD}@host/", encoding="utf-8")
    (line,) = _problems(monkeypatch, BRIDGE_AMQP_URL_FILE=str(path))
    assert "BRIDGE_AMQP_URL" in line
    assert AMQP_PASSWORD not in line


# --- defaults, flavours, sources ---
def test_defaults() -> None:
    settings = load_settings()
    assert settings.account.api == "domain-intl"
    assert settings.account.signature_version == "v3"
    assert settings.account.lang == "en"
    assert settings.upstream.request_timeout_s == 10.0
    assert settings.upstream.page_size == 1000
    assert settings.upstream.ack_batch_size == 100
    assert settings.account.task_result_status is None
    assert (
        settings.account.domain_name
        is settings.account.instance_id
        is settings.account.task_no
        is settings.account.user_client_ip
        is None
    )
    assert (
        settings.account.access_key_id is settings.account.access_key_secret is settings.account.security_token is None
    )
    assert settings.broker.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.broker.exchange == "domain.tasks"
    assert (settings.broker.unrouted_exchange, settings.broker.invalid_exchange) == (
        "domain.tasks.unrouted",
        "domain.tasks.invalid",
    )
    assert settings.delivery.backoff_initial_s <= settings.delivery.backoff_max_s
    assert settings.operator.log_level == "INFO"


@pytest.mark.parametrize(
    ("flavour", "endpoint", "version"),
    [
        ("domain-intl", "https://domain-intl.aliyuncs.com", "2017-12-18"),
        ("domain", "https://domain.aliyuncs.com", "2018-01-29"),
    ],
)
def test_endpoint_and_version_per_flavour(
    monkeypatch: pytest.MonkeyPatch, flavour: str, endpoint: str, version: str
) -> None:
    monkeypatch.setenv("BRIDGE_UPSTREAM_API", flavour)
    settings = load_settings()
    assert (settings.account.base_url, settings.account.api_version) == (endpoint, version) == API_FLAVOURS[flavour]
    # An endpoint override (a simulator, a proxy) changes the URL, never the API version.
    monkeypatch.setenv("BRIDGE_UPSTREAM_ENDPOINT", "http://127.0.0.1:8080/")
    settings = load_settings()
    assert (settings.account.base_url, settings.account.api_version) == ("http://127.0.0.1:8080", version)


def test_typed_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_REQUEST_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("BRIDGE_LOG_LEVEL", "debug")
    monkeypatch.setenv("BRIDGE_UPSTREAM_ENDPOINT", "")
    monkeypatch.setenv("BRIDGE_DOMAIN_NAME", "example.com")
    settings = load_settings()
    assert settings.upstream.request_timeout_s == 2.5
    assert settings.account.domain_name == "example.com"
    assert settings.operator.log_level == "DEBUG"
    assert settings.account.endpoint is None


def test_dotenv_in_the_working_directory_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    (clean_env / ".env").write_text("BRIDGE_PAGE_SIZE=250\nBRIDGE_LANG=zh\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_LANG", "en")
    settings = load_settings()
    assert settings.upstream.page_size == 250
    assert settings.account.lang == "en"


def test_env_name_is_a_variable_that_sets_each_field(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = []
    # Error lines for overrides use env_name(); a user must be able to set exactly that variable.
    for field in ("request_timeout_s", "publish_timeout_s", "poll_interval_s", "page_size", "exchange", "lang"):
        value = "zh" if field == "lang" else "7"
        monkeypatch.setenv(env_name(field), value)
        if str(load_settings().get(field)).removesuffix(".0") != value:
            wrong.append(env_name(field))
    assert wrong == []


def test_scrub_removes_every_secret_value() -> None:
    settings = load_settings(
        access_key_id="LTAI-visible-id",
        access_key_secret="ak-secret-value",
        security_token="sts-token-value",
        amqp_url="amqp://bridge:amqp-pass-word@rabbit:5672/",
    )
    text = (
        "failed: amqp://bridge:amqp-pass-word@rabbit:5672/ pw=amqp-pass-word secret=ak-secret-value "
        "token=sts-token-value id=LTAI-visible-id"
    )
    scrubbed = settings.scrub(text)
    for secret in ("amqp-pass-word", "ak-secret-value", "sts-token-value"):
        assert secret not in scrubbed
    assert "LTAI-visible-id" in scrubbed  # an access key id is not a secret
