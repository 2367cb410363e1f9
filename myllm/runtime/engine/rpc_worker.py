"""`myllm rpc-worker`: this machine's CPU as an RPC worker other machines' daemons spread model
layers over (MYLLM_RPC_SERVERS there). It is llama.cpp's `rpc-server`, reached through the
llama.cpp myllm already installed (`ggml_backend_rpc_start_server`), so a worker needs no
second build, and speaks the protocol of the daemons beside it.

The protocol has no authentication and no encryption: whoever reaches the port can make the
worker allocate memory and run computations. Bind it to a private network's address only.

Run as `python -m myllm.runtime.engine.rpc_worker --host H --port P` (the CLI execs this, so the
worker is one process with nothing else loaded); it serves until killed.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
from pathlib import Path

from myllm.runtime.engine.llama_setup import default_threads
from myllm.runtime.engine.rpc import _rpc_functions

CPU = 0
"""`GGML_BACKEND_DEVICE_TYPE_CPU`."""


def serve(host: str, port: int, threads: int, cache: Path | None) -> None:
    """Serve this machine's CPU on host:port until killed (llama.cpp's loop never returns but
    on a socket error, which it prints)."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        sys.exit("this llama.cpp was built without its RPC backend: `make install` builds it "
                 "(or reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=on)")
    lib = _rpc_functions()
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(
        lib.ggml_backend_reg_get_proc_address(lib.ggml_backend_reg_by_name(b"RPC"), b"ggml_backend_rpc_start_server"))
    devices = (ctypes.c_void_p * 1)(lib.ggml_backend_dev_by_type(CPU))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    # Python's handlers cannot run while llama.cpp's loop holds the thread: the default ones end it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    endpoint = f"{host}:{port}"
    start(endpoint.encode(), str(cache).encode() if cache else None, threads, 1, devices)
    sys.exit(f"the RPC worker on {endpoint} stopped (see above: is the port taken?)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="myllm rpc-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="IPv4 address to listen on (a private network's only)")
    parser.add_argument("--port", type=int, default=50052, help="port to listen on (llama.cpp's default 50052)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder where the worker keeps tensors it was sent, so a model's next load sends "
                             "only their hashes (llama.cpp's rpc-server -c); default: none")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.threads or default_threads(), args.cache)


if __name__ == "__main__":
    main()
