"""task-bridge: Alibaba Cloud Domain task results, polled and acknowledged, as a RabbitMQ event stream."""

__version__ = "0.1.0"

__all__ = ["__version__"]
