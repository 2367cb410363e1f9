"""The native MyLLM API (document 003): models, load and unload, chat with stored sessions,
generate, embeddings, `/api/ps`, and (an extension) `/api/rerank` (retrieval.py). Its error shape
is the main listener's default (http/errors.py)."""

from myllm.api.http.document import ApiDocument
from myllm.api.native import retrieval, routes

API = ApiDocument(routers=(routes.router, retrieval.router),
                  generation_paths=frozenset({"/api/chat", "/api/generate", "/api/embeddings", retrieval.PATH}))
