"""The native API's `POST /api/rerank` (an extension of the 003 document, which has no rerank):
a query's documents scored by a reranking model, the most relevant first. Its shapes are here,
beside the route, in the document's style (plain strings, `usage` as the other routes give it);
errors are the document's `{"detail": ...}`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from myllm.api.http.auth import keep_alive_of, reloading_key
from myllm.api.native.models import ErrorDetail
from myllm.api.state import services

PATH = "/api/rerank"
router = APIRouter(tags=["MyLLM"], responses={code: {"model": ErrorDetail} for code in (400, 404, 500, 503)})


class RerankRequest(BaseModel):
    model: str = Field(description="a reranking model (its `kind` in /api/models)")
    query: str
    documents: list[str]
    top_n: int | None = Field(None, description="the best this many; omitted: every document")
    return_documents: bool = Field(False, description="each result carries its document's text")
    truncate: bool = Field(False, description="a query-document pair longer than the model's batch has its document "
                           "cut to fit, instead of a 400")
    keep_alive: str | float | None = Field(None, description="how long the model stays loaded")


class RankedDocument(BaseModel):
    index: int = Field(description="the document's place in the request's `documents`")
    relevance_score: float = Field(description="the model's score for the pair: higher is more relevant")
    document: str | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    model: str
    results: list[RankedDocument]
    usage: RerankUsage


@router.post(PATH, response_model=RerankResponse, response_model_exclude_none=True)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """Extension: the documents, most relevant to the query first (equal scores keep their
    order), `top_n` of them."""
    ranking = await services(request).runtime.rerank(
        body.model, body.query, body.documents, keep_alive=keep_alive_of(request, body.keep_alive),
        truncate=body.truncate, top_n=body.top_n, caller=reloading_key(request))
    return RerankResponse(
        model=ranking.model,
        results=[RankedDocument(index=i, relevance_score=score, document=body.documents[i] if body.return_documents else None)
                 for i, score in ranking.ranked],
        usage=RerankUsage(prompt_tokens=ranking.prompt_tokens, total_tokens=ranking.prompt_tokens),
    )
