"""A broker's refusal as a person reads it: one line naming the problem and the fix, never a traceback.

aiormq reports refusals in protocol terms: an unknown virtual host, or one the user may not use, arrives as
``InvalidFrameError: Expected one of ['Connection.OpenOk'], got <Connection.Close ...>`` (the broker's reply text
is lost on the way); a missing permission as a channel closed with ``ACCESS_REFUSED``. :func:`explain` turns
each into a :class:`BrokerError` of :mod:`bridge.errors` whose message says what is wrong with which user,
virtual host or entity, and what to check; :func:`connect` is ``aio_pika.connect`` with that translation, for the
operator commands (``tail``, ``demo``, ``check``). Messages never carry the AMQP password.
"""

from __future__ import annotations

import ssl
from urllib.parse import unquote, urlsplit

import aiormq

from bridge import amqp
from bridge.errors import BrokerError, BrokerRefusedError, BrokerUnavailableError
from bridge.settings import BrokerSettings

__all__ = ["CONNECT_ERRORS", "connect", "explain", "user_and_vhost"]

CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    ConnectionError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
)
"""What ``aio_pika.connect`` and channel operations raise for a broker-side problem."""

_MAX_REPLY_CHARS = 300


def user_and_vhost(settings: BrokerSettings) -> tuple[str, str]:
    """The user name and the virtual host that ``BRIDGE_AMQP_URL`` asks for (aio-pika's reading of the URL).

    Of its first URL, for a list: :meth:`BrokerSettings.amqp_node` gives the settings of another.
    """
    parts = urlsplit(settings.amqp_urls[0])
    user = unquote(parts.username) if parts.username else "guest"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return user, unquote(path) or "/"


def _reply(exc: BaseException) -> str:
    # aiormq puts the broker's reply text (e.g. "ACCESS_REFUSED - access to queue ...") first.
    args = getattr(exc, "args", ())
    text = args[0] if args and isinstance(args[0], str) else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= _MAX_REPLY_CHARS else text[: _MAX_REPLY_CHARS - 1] + "…"


def explain(exc: BaseException, settings: BrokerSettings, doing: str | None = None) -> BrokerError:
    """``exc`` (from aio-pika or aiormq, while ``doing`` something) as a one-line :class:`BrokerError`."""
    error = _classify_nodes(exc, settings) if isinstance(exc, amqp.NoNodeConnected) else _classify(exc, settings)
    if doing and not isinstance(error, BrokerUnavailableError):
        error = type(error)(f"{doing}: {error}")
    return type(error)(settings.scrub(str(error)))


def _classify_nodes(exc: amqp.NoNodeConnected, settings: BrokerSettings) -> BrokerError:
    """Every node of a ``BRIDGE_AMQP_URL`` list failed: each one's reason, and the gravest kind of them.

    A refusal by any node is a refusal: users, virtual hosts and permissions are the same on every node of a
    cluster, so the nodes that did not answer would most likely have refused too. It stops the process at start.
    """
    errors = [(index, _classify(error, settings.amqp_node(index))) for index, error in exc.failures]
    kinds = {type(error) for _, error in errors}
    kind: type[BrokerError] = BrokerError
    if BrokerRefusedError in kinds:
        kind = BrokerRefusedError
    elif kinds == {BrokerUnavailableError}:
        kind = BrokerUnavailableError
    reasons = "; ".join(f"node {index + 1}: {error}" for index, error in errors)
    return kind(f"no node of BRIDGE_AMQP_URL took the connection ({len(errors)} tried) - {reasons}")


def _classify(exc: BaseException, settings: BrokerSettings) -> BrokerError:
    where = settings.amqp_url_masked
    user, vhost = user_and_vhost(settings)
    errors = aiormq.exceptions
    if isinstance(exc, amqp.HandshakeRefused):
        # The broker's own reason, read from its Connection.Close during the handshake.
        if exc.reply_code == 530:  # NOT_ALLOWED: the vhost does not exist or the user may not use it
            return BrokerRefusedError(
                f"the broker at {where} refused virtual host {vhost!r} to user {user!r} ({exc.reply_text}): "
                f"check the path of BRIDGE_AMQP_URL (rabbitmqctl list_vhosts; rabbitmqctl list_user_permissions "
                f"{user})"
            )
        return BrokerRefusedError(
            f"the broker at {where} refused the login of user {user!r} ({exc.reply_text}): "
            "check the user name and password in BRIDGE_AMQP_URL"
        )
    tls = _tls_problem(exc, settings)
    if tls is not None:
        return tls
    if isinstance(exc, errors.AMQPConnectionError) and isinstance(exc.__cause__, OSError):
        exc = exc.__cause__  # a TCP connect that failed (refused, unreachable), wrapped for aiormq: no broker there
    if isinstance(exc, errors.ProbableAuthenticationError | errors.AuthenticationError):
        return BrokerRefusedError(
            f"the broker at {where} refused the login of user {user!r} ({_reply(exc)}): "
            "check the user name and password in BRIDGE_AMQP_URL"
        )
    if _refused_vhost(exc):
        return BrokerRefusedError(
            f"the broker at {where} refused virtual host {vhost!r} to user {user!r}: the virtual host does not "
            f"exist or the user has no permission on it; check the path of BRIDGE_AMQP_URL "
            f"(rabbitmqctl list_vhosts; rabbitmqctl list_user_permissions {user})"
        )
    if isinstance(exc, errors.ChannelAccessRefused):
        return BrokerRefusedError(
            f"user {user!r} lacks a permission on virtual host {vhost!r} ({_reply(exc)}): grant it "
            f"(rabbitmqctl set_permissions -p {vhost} {user} ...) or use another user in BRIDGE_AMQP_URL"
        )
    if isinstance(exc, errors.ChannelPreconditionFailed):
        return BrokerError(
            f"exchange {settings.exchange!r} exists on the broker with other settings ({_reply(exc)}): "
            "set BRIDGE_EXCHANGE to another name, or delete the old exchange"
        )
    if isinstance(exc, errors.ChannelClosed):
        return BrokerError(f"the broker refused it: {_reply(exc)}")
    if isinstance(exc, errors.ConnectionClosed):
        return BrokerUnavailableError(f"the broker at {where} closed the connection: {_reply(exc)}")
    if isinstance(exc, errors.AMQPError):
        # A connection that could not be opened or was lost (AMQPConnectionError and kin): try again later.
        return BrokerUnavailableError(f"broker error on {where}: {type(exc).__name__}: {_reply(exc)}")
    if isinstance(exc, TimeoutError):
        return BrokerUnavailableError(
            f"cannot connect to {where}: no answer within {settings.publish_timeout_s:g}s; "
            "check that RabbitMQ runs there and BRIDGE_AMQP_URL"
        )
    reason = getattr(exc, "strerror", None) or _reply(exc)
    return BrokerUnavailableError(
        f"cannot connect to {where} ({type(exc).__name__}: {reason}): start RabbitMQ "
        "(e.g. `docker compose up -d rabbitmq`) or set BRIDGE_AMQP_URL"
    )


def _tls_problem(exc: BaseException, settings: BrokerSettings) -> BrokerError | None:
    """A TLS failure as one line naming TLS, the host and the setting to use; None for anything else."""
    host = settings.amqp_url_masked.rpartition("@")[2].partition("/")[0]
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Not transient: fatal at start like a refused login, retried during a run (a certificate rotation).
        return BrokerRefusedError(
            f"TLS: cannot verify the certificate of {host} ({exc.verify_message}); "
            "set BRIDGE_AMQP_CA_FILE to the CA that signed it"
        )
    if isinstance(exc.__cause__, ssl.SSLError):
        exc = exc.__cause__  # aiormq wraps an error of the TLS session read after the handshake (an alert)
    if isinstance(exc, ssl.SSLError):
        return BrokerUnavailableError(
            f"TLS: handshake with {host} failed ({exc.reason or exc}); check BRIDGE_AMQP_CA_FILE, "
            "BRIDGE_AMQP_CERT_FILE and BRIDGE_AMQP_KEY_FILE"
        )
    return None


def _refused_vhost(exc: BaseException) -> bool:
    """The broker closed the connection instead of opening the virtual host (530 NOT_ALLOWED)."""
    if isinstance(exc, aiormq.exceptions.ConnectionNotAllowed):
        return True
    if isinstance(exc, aiormq.exceptions.ConnectionClosed):
        return "NOT_ALLOWED" in _reply(exc) and "vhost" in _reply(exc)
    # aiormq 7 checks the answer's type before reading a Connection.Close, and loses its reply text.
    text = _reply(exc)
    return isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.OpenOk" in text and "Close" in text


async def connect(settings: BrokerSettings) -> amqp.BrokerConnection:
    """Connect to ``BRIDGE_AMQP_URL`` as the bridge does (:func:`bridge.amqp.connect`: TLS, heartbeat, each URL
    of a list in turn); every failure is a one-line :class:`BrokerError` (see :func:`explain`)."""
    try:
        return await amqp.connect(settings)
    except CONNECT_ERRORS as exc:
        raise explain(exc, settings) from None
