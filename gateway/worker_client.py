"""Client side of the internal worker API (privlm.internal.v1.Worker), as domain calls."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from privlm.base.errors import Unavailable
from privlm.base.transport import TransportConfig
from privlm.internal.v1 import worker_pb2, worker_pb2_grpc

FINISH_NAMES = {
    worker_pb2.WORKER_FINISH_REASON_LENGTH: "length",
    worker_pb2.WORKER_FINISH_REASON_END_OF_SEQUENCE: "eos",
    worker_pb2.WORKER_FINISH_REASON_CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class WorkerChunk:
    token_ids: tuple[int, ...]
    finish: str | None          # "length", "eos", "cancelled" on the last chunk
    prompt_tokens: int


class WorkerClient:
    def __init__(self, target: str, transport: TransportConfig, interceptors=()):
        self.target = target
        opts = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        self.channel = transport.aio_channel(target, "gateway", interceptors, opts)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def describe(self, timeout: float = 10.0) -> worker_pb2.WorkerInfo:
        return await self.stub.Describe(worker_pb2.DescribeRequest(), timeout=timeout, wait_for_ready=True)

    async def generate(self, request_id: str, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                       top_p: float, top_k: int, seed: int | None, tenant: str = "",
                       timeout: float | None = None) -> AsyncIterator[WorkerChunk]:
        """Stream generated token ids. Closing the iterator early cancels the worker-side request."""
        sampling = worker_pb2.WorkerSampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_p=top_p, top_k=top_k)
        if seed is not None:
            sampling.seed = seed
        req = worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids,
                                               sampling=sampling, tenant=tenant)
        call = self.stub.Generate(req, timeout=timeout)
        try:
            async for msg in call:
                finish = FINISH_NAMES.get(msg.finish_reason) if msg.finish_reason else None
                if finish is not None:
                    await _until_end(call)
                yield WorkerChunk(tuple(msg.token_ids), finish, msg.prompt_tokens)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                raise Unavailable(f"inference worker group unavailable: {err.details()}") from None
            raise _reraise(err) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()


END_WAIT_S = 5.0            # the worker ends its stream right after the final message


async def _until_end(call) -> None:
    """After the final message: wait for the worker's status, so the call ends OK on both sides
    rather than CANCELLED by the caller closing the iterator (bounded: a stream that does not end
    is then cancelled by generate's finally)."""
    try:
        await asyncio.wait_for(call.code(), END_WAIT_S)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass


def _reraise(err: grpc.aio.AioRpcError) -> Exception:
    """Carry a worker-side status (e.g. INVALID_ARGUMENT, RESOURCE_EXHAUSTED) through the gateway."""
    from privlm.base import errors

    by_code = {c.code: c for c in (errors.InvalidArgument, errors.NotFound, errors.FailedPrecondition,
                                   errors.ResourceExhausted, errors.Unavailable, errors.DeadlineExceeded,
                                   errors.PermissionDenied, errors.Unauthenticated)}
    cls = by_code.get(err.code(), errors.Unavailable)
    return cls(err.details() or err.code().name)
