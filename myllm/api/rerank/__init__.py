"""The rerank API Jina, Cohere and llama-server share (`/v1/rerank` and its aliases), in
llama-server's error shape, on the main listener and on Ollama's (which has no rerank route of
its own)."""

from myllm.api.http.document import ApiDocument
from myllm.api.rerank import routes

API = ApiDocument(
    routers=(routes.router,),
    errors={path: routes.rerank_renderer for path in routes.PATHS},
    generation_paths=frozenset(routes.PATHS),
)
