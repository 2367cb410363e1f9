"""`POST /v1/rerank` and its aliases: llama-server's `/rerank`, `/v1/reranking` and `/reranking`,
and Cohere's `/v2/rerank` (where the `cohere` client's `ClientV2.rerank` posts). One handler: the
request to `Runtime.rerank`, its ranking to the shared answer. Errors are llama-server's shape
(`rerank_renderer`), on every listener this document is mounted on."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm.api.http.auth import keep_alive_of, reloading_key
from myllm.api.http.errors import ApiError
from myllm.api.rerank.models import DocumentText, ErrorObject, RerankRequest, RerankResponse, RerankResult, RerankUsage
from myllm.api.state import services

COHERE_V2 = "/v2/rerank"
PATHS = ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking", COHERE_V2)
"""Jina's, Cohere v1's and llama-server's path first, then llama-server's aliases, then Cohere v2's."""

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 501: "not_supported_error",
          503: "unavailable_error"}
router = APIRouter(tags=["Rerank"], responses={c: {"model": ErrorObject} for c in (400, 404, 500, 503)})


def rerank_renderer(err: ApiError) -> Response:
    """llama-server's error (tools/server `format_error_response`): `code` the status, `type`
    by status, a prompt past the model's batch its `exceed_context_size_error`."""
    kind = "exceed_context_size_error" if err.code == "prompt_too_long" else _TYPES.get(
        err.status, "invalid_request_error" if err.status < 500 else "server_error")
    return JSONResponse({"error": {"code": err.status, "message": err.message, "type": kind}}, status_code=err.status)


async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """The documents scored against the query by a reranking model, the most relevant first
    (equal scores keep the request's order), `top_n` of them."""
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    truncate = body.truncate if body.truncate is not None else request.url.path == COHERE_V2
    ranking = await services(request).runtime.rerank(
        body.model, body.query, texts, keep_alive=keep_alive_of(request, body.keep_alive), truncate=truncate,
        top_n=body.top_n, caller=reloading_key(request))
    results = [
        RerankResult(index=i, relevance_score=score, document=DocumentText(text=texts[i]) if body.return_documents else None)
        for i, score in ranking.ranked
    ]
    usage = RerankUsage(prompt_tokens=ranking.prompt_tokens, total_tokens=ranking.prompt_tokens)
    return RerankResponse(model=ranking.model, results=results, usage=usage)


for _path in PATHS:
    router.add_api_route(_path, rerank, methods=["POST"], response_model=RerankResponse, response_model_exclude_none=True)
