"""Client of Keel's gRPC API.

- `keel_client.Client`: a channel, the stubs of every module, login, bearer
  metadata, refresh before the access token expires;
- `keel_client.errors`: `KeelError` per status code, details decoded;
- `keel_client.proto`: the messages and stubs generated from proto/ at build
  time, one package per proto package (`keel_client.proto.keel.identity.v1`).
"""

from keel_client.client import Client
from keel_client.errors import KeelError

__all__ = ["Client", "KeelError"]
