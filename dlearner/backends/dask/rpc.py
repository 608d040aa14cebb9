"""Calling a method of a Dask actor over the cluster's own comms.

Every request between the driver, learners and env runners goes through here: a direct worker RPC
(``actor_execute``, the message Dask's own ``Actor`` proxies send), or, for clients made with
``direct_to_workers=False``, the same message relayed by the scheduler
(:class:`distributed.actor.ProxyRPC`). TLS, ``distributed.comm`` settings and worker ports therefore
apply to all of it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Type

from distributed.actor import ProxyRPC
from distributed.comm.core import CommClosedError
from distributed.protocol import to_serialize

#: Errors that mean the actor's worker cannot be reached (gone, or the connection broke).
UNREACHABLE: Tuple[Type[BaseException], ...] = (OSError, CommClosedError)


def worker_rpc(client: Any, address: str) -> Any:
    """An RPC handle on worker ``address`` through ``client``: direct, or relayed by the scheduler
    when the client was made with ``direct_to_workers=False`` (e.g. workers behind a gateway)."""
    if client.direct_to_workers is False:
        return ProxyRPC(client.scheduler, address)
    return client.rpc(address)


class Whole:
    """``value``, serialized by Dask in one piece and received as ``value`` itself.

    Dask serializes a list, tuple or dict marked with ``to_serialize`` element by element, each
    element through its own pickle call and sub-header: a sample request's fragment ids, or an
    update request's fragment references, cost the driver more CPU than everything else it does.
    Wrapped, the value is pickled once (protocol 5: numpy arrays still travel as frames of their
    own, without a copy) and unpickles as the value, not as this wrapper.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return _unwrapped, (self.value,)


def _unwrapped(value: Any) -> Any:
    return value


class ActorMissing(KeyError):
    """The worker answered but holds no actor of that key (released, or the worker was replaced)."""


async def call_actor(
    remote: Any, key: str, method: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None
) -> Any:
    """``actor.method(*args, **kwargs)`` on the actor ``key`` behind ``remote`` (see :func:`worker_rpc`).

    Returns the method's value (awaited if it is a coroutine). Raises one of :data:`UNREACHABLE`
    when the worker cannot be reached, :class:`ActorMissing` when the worker has no such actor, and
    the method's own exception otherwise.
    """
    try:
        response = await remote.actor_execute(
            actor=key,
            function=method,
            args=[to_serialize(Whole(a)) for a in args],
            kwargs={k: to_serialize(Whole(v)) for k, v in (kwargs or {}).items()},
        )
    except KeyError as err:  # raised by the worker's handler before it looks at the method
        raise ActorMissing(f"The worker holds no actor {key!r} (it was released or its worker was replaced).") from err
    if response.get("status") == "OK":
        return response["result"]
    err = response.get("exception")
    if isinstance(err, BaseException):
        raise err
    raise RuntimeError(f"Calling {method} on actor {key} failed: {response!r}")
