"""Ollama's API, on its own listener (`MYLLM_OLLAMA_PORT`; its paths collide with the native
API's): generation and embeddings (inference.py), model management (manage.py), in Ollama's error
shape, which is that listener's default."""

from myllm.api.http.document import ApiDocument
from myllm.api.ollama import inference, manage

API = ApiDocument(
    routers=(inference.router, manage.router),
    errors={"/": inference.ollama_renderer},
    open_paths=inference.OPEN_PATHS,
    generation_paths=frozenset({"/api/chat", "/api/generate", "/api/embeddings", "/api/embed"}),
    streamed_body_prefixes=manage.UNLIMITED_PATHS,
)
