"""The session's shared private node (see ``shared_node`` in conftest.py): how it boots, and its users.

The users the sharing modules need are created as the node boots, from a definitions file, rather than with one
``rabbitmqctl`` call each (every call boots an Erlang VM: 1-3 s). Each name belongs to one module.
"""

from __future__ import annotations

import json

from tests.private_broker import PrivateNode

__all__ = ["USERS", "boot_shared_node"]

_ALL = (".*", ".*", ".*")
_READ_ONLY = ("^$", "^$", ".*")

USERS: dict[str, tuple[str, tuple[str, str, str] | None]] = {
    # user: (password, permissions on '/' as (configure, write, read), or None for no access to '/')
    "guest": ("guest", _ALL),  # the default user, which a node booted with definitions does not create by itself
    # tests/test_cli_ops.py
    "bridge": ("amqp-pw-Xr42kT", _ALL),
    "nobody": ("nobody-pw-5150", None),  # may log in, has no permission on any virtual host
    "reader": ("reader-pw-6160", _READ_ONLY),  # may read '/', may not configure or write anything
    # tests/test_broker_edge.py
    "tb_noaccess": ("pw-noaccess", None),
    "tb_readonly": ("pw-readonly", _READ_ONLY),
}


def _definitions() -> str:
    users = [
        {"name": name, "password": password, "tags": ["administrator"] if name == "guest" else []}
        for name, (password, _) in USERS.items()
    ]
    permissions = [
        {"user": name, "vhost": "/", "configure": rights[0], "write": rights[1], "read": rights[2]}
        for name, (_, rights) in USERS.items()
        if rights is not None
    ]
    return json.dumps({"vhosts": [{"name": "/"}], "users": users, "permissions": permissions})


def boot_shared_node() -> PrivateNode:
    """A started plain node with :data:`USERS`; stopped again (and the error raised) when its boot fails."""
    node = PrivateNode()
    try:
        node.base.mkdir(parents=True, exist_ok=True)
        definitions = node.write_file("definitions.json", _definitions())
        node.config = [f"load_definitions = {definitions}"]
        node.start()
    except BaseException:
        node.stop()
        raise
    return node
