"""A process that takes one account's lock and holds it until it is killed: the leader the SIGKILL test kills.

``python -m tests.leadership_holder AMQP_URL EXCHANGE ACCOUNT`` prints ``leader`` once it holds the lock.
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika
from prometheus_client import CollectorRegistry

from bridge.leadership import Leadership, LeadershipMetrics


async def main(amqp_url: str, exchange: str, account: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    leadership = Leadership(account, exchange, LeadershipMetrics(CollectorRegistry()))
    lease = await leadership.acquire(connection, asyncio.Event())
    assert lease is not None
    print("leader", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
