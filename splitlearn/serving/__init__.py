"""Serving: an inference server with dynamic batching over Unix sockets (seed 002), a trunk
server over TCP with a split client (seed 000), and the pickle-free wire format they share.

Importing this package does not import torch.
"""

from splitlearn.serving.client import InferenceClient
from splitlearn.serving.server import InferenceServer, ManagedServer, ServerStartError
from splitlearn.serving.split_client import SplitClient, TrunkClient
from splitlearn.serving.transport import HandshakeError, ServerError, ServerUnavailable, ServingError
from splitlearn.serving.trunk_server import TrunkServer
from splitlearn.serving.wire import Frame, MsgType, WireError

__all__ = [
    "Frame",
    "HandshakeError",
    "InferenceClient",
    "InferenceServer",
    "ManagedServer",
    "MsgType",
    "ServerError",
    "ServerStartError",
    "ServerUnavailable",
    "ServingError",
    "SplitClient",
    "TrunkClient",
    "TrunkServer",
    "WireError",
]
