"""Layers on other machines: llama.cpp's RPC backend, in a runner.

Each worker (`myllm rpc-worker`, or llama.cpp's own `rpc-server`) offers its devices over TCP; a
model loaded with `LoadSpec.rpc_servers` gets them as its device list, and llama.cpp puts the
layers it offloads on them, split by each one's free memory (its default `tensor_split`).

llama.cpp's RPC client aborts the process on a worker it cannot reach or that answers wrongly
(`GGML_ABORT` in its connect, its handshake and most calls), which would end the runner with
nothing clearer than "aborted". So each worker is first greeted here, in Python, with the same
handshake and a timeout: one that does not answer is a `ModelLoadError` naming it. A worker that
goes away later still aborts the runner mid-request (the daemon then reports `model_crashed`,
runner/client.py), and the next load names it here.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from myllm.errors import ModelLoadError, OutOfMemory

HELLO = 14
"""`RPC_CMD_HELLO` (ggml-rpc.cpp: fixed at 14 in every protocol version)."""
CONN_CAPS = 24
"""`RPC_CONN_CAPS_SIZE`: the transport capabilities the hello carries (zeros: plain TCP)."""
PROTO_MAJOR = 7
"""`RPC_PROTO_MAJOR_VERSION` of the vendored llama.cpp's ggml-rpc.h: a worker of another major
version is refused by llama.cpp (with an abort), so it is refused here first."""
GREETING_TIMEOUT = 5.0
"""Seconds a worker has to accept and answer the hello."""
WORKER_SHARE = 0.9
"""Of a worker's free memory, what layers may take (as MYLLM_MAX_GPU_MEMORY's default): the
rest for what the footprint does not count (its own buffers, the allocator's alignment)."""


def greet(endpoint: str, timeout: float = GREETING_TIMEOUT) -> None:
    """Check that `endpoint` is an RPC worker of this protocol, ready for a client, with
    llama.cpp's own hello; raises `ModelLoadError` naming it otherwise. A worker serves one
    client at a time, so one busy with another model's runner accepts the connection (the
    kernel does) but does not answer until that client leaves."""
    host, _, port = endpoint.rpartition(":")
    advice = "start it (`myllm rpc-worker`) or leave it out of MYLLM_RPC_SERVERS / the model's rpc_servers"
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise ModelLoadError(f"RPC worker {endpoint} cannot be reached ({exc.strerror or exc}): {advice}") from exc
    with sock:
        try:
            sock.sendall(bytes([HELLO]) + struct.pack("<Q", CONN_CAPS) + bytes(CONN_CAPS))
            size = struct.unpack("<Q", _receive(sock, 8))[0]
            answer = _receive(sock, size) if size == 4 + CONN_CAPS else b""
        except TimeoutError as exc:
            raise ModelLoadError(
                f"RPC worker {endpoint} accepted but did not answer within {timeout:g} s: a worker serves one "
                f"client at a time (is another model or daemon using it?), or it is not an RPC worker") from exc
        except OSError as exc:
            raise ModelLoadError(f"RPC worker {endpoint} closed the connection ({exc.strerror or exc}): {advice}") from exc
    if not answer:
        raise ModelLoadError(f"RPC worker {endpoint} did not answer as an RPC worker does (size {size})")
    if answer[0] != PROTO_MAJOR:
        raise ModelLoadError(f"RPC worker {endpoint} speaks protocol {answer[0]}.{answer[1]}.{answer[2]}; "
                             f"this llama.cpp speaks {PROTO_MAJOR}.x: run a worker from the same llama.cpp")


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError(104, "closed by the worker")
        data += chunk
    return data


def layers_that_fit(layer_bytes: Sequence[int], free: int) -> int:
    """The most layers k whose `layer_bytes[k]` fits `WORKER_SHARE` of the workers' `free` memory."""
    room = int(free * WORKER_SHARE)
    return max((k for k, need in enumerate(layer_bytes) if need <= room), default=0)


@dataclass(frozen=True)
class Workers:
    """The workers' devices as the NULL-ended array a model's `devices` takes (it must outlive
    the model), their free memory, and the layers planned on them."""

    devices: ctypes.Array[ctypes.c_void_p]
    free: int
    layers: int

    @classmethod
    def connect(cls, endpoints: Sequence[str], layer_bytes: Sequence[int], name: str) -> Workers:
        """Greet each worker, add it to ggml's RPC backend, and plan the layers `layer_bytes`
        allows (`LoadSpec.rpc_layer_bytes`) on their free memory together. Raises
        `ModelLoadError` for a llama.cpp without RPC or a worker that does not answer, and
        `OutOfMemory` when not even one layer fits."""
        import llama_cpp

        if not llama_cpp.llama_supports_rpc():
            raise ModelLoadError("this llama.cpp was built without its RPC backend (MYLLM_RPC_SERVERS needs one: "
                                 "`make install` builds it, or CMAKE_ARGS=-DGGML_RPC=on)")
        lib = _rpc_functions()
        reg = lib.ggml_backend_reg_by_name(b"RPC")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
            lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
        found: list[int] = []
        free = 0
        for endpoint in endpoints:
            greet(endpoint)
            worker = add_server(endpoint.encode())
            if not worker:
                raise ModelLoadError(f"RPC worker {endpoint} offers no device")
            for i in range(lib.ggml_backend_reg_dev_count(worker)):
                device = lib.ggml_backend_reg_dev_get(worker, i)
                dev_free, dev_total = ctypes.c_size_t(), ctypes.c_size_t()
                lib.ggml_backend_dev_memory(device, ctypes.byref(dev_free), ctypes.byref(dev_total))
                found.append(device)
                free += dev_free.value
        layers = layers_that_fit(layer_bytes, free) if layer_bytes else -1  # no plan: every layer
        if layers == 0:
            raise OutOfMemory(f"not one layer of '{name}' fits the RPC workers' {free >> 20} MiB free "
                              f"({', '.join(endpoints)}): one takes {layer_bytes[1] >> 20} MiB")
        devices = (ctypes.c_void_p * (len(found) + 1))(*found)
        return cls(devices, free, layers)


def _rpc_functions() -> Any:
    """ggml's registry functions the RPC backend is reached through (llama-cpp-python declares
    none of them), on libllama's handle as `devices._ggml` finds the device ones. Imported here:
    `devices` brings asyncio, which a runner without workers has no use for."""
    from myllm.runtime.devices import _ggml

    lib = _ggml()
    lib.ggml_backend_reg_by_name.argtypes, lib.ggml_backend_reg_by_name.restype = [ctypes.c_char_p], ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_dev_count.argtypes, lib.ggml_backend_reg_dev_count.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes, lib.ggml_backend_dev_by_type.restype = [ctypes.c_int], ctypes.c_void_p
    return lib
