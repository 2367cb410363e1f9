"""OpenAI's API under `/v1` (the Cria document, 001): chat and text completions, embeddings and
models (routes.py), and the Responses API (responses.py), in OpenAI's error shape."""

from myllm.api.http.document import ApiDocument
from myllm.api.openai import responses, routes

API = ApiDocument(
    routers=(routes.router, responses.router),
    errors={routes.PREFIX: routes.openai_renderer},
    generation_paths=frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}),
)
