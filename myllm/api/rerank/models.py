"""Shapes of the rerank API that Jina, Cohere (v1 and v2) and llama-server share: a query, its
documents (strings, or objects with `text` as Jina and Cohere v1 take them), `top_n` and
`return_documents` in; the documents' indexes and scores, best first, out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Document(BaseModel):
    """A document as an object (Jina, Cohere v1): its `text` is what is ranked; other fields
    (Cohere v1's `rank_fields` ranks them) are not read."""

    model_config = ConfigDict(extra="allow")

    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="a reranking model (a cross-encoder: `myllm list` shows its kind)")
    query: str
    documents: list[str | Document] = Field(description="strings, or objects with `text`")
    top_n: int | None = Field(None, description="the best this many; omitted: every document")
    return_documents: bool = Field(False, description="each result carries its document as `{\"text\": ...}`")
    truncate: bool | None = Field(
        None, description="extension: a query-document pair longer than the model's batch has its document cut to fit "
        "(true), or is a 400 (false); default false, but true on Cohere's /v2/rerank, which truncates long documents")
    keep_alive: str | float | None = Field(None, description="extension: how long the model stays loaded")


class DocumentText(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="the document's place in the request's `documents`")
    relevance_score: float = Field(description="the model's score for the pair (its classifier's raw output, as "
                                   "llama-server gives it): higher is more relevant")
    document: DocumentText | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    model: str
    object: Literal["list"] = "list"
    results: list[RerankResult]
    usage: RerankUsage


class ErrorBody(BaseModel):
    code: int = Field(description="the HTTP status")
    message: str
    type: str = Field(description="llama-server's error types: invalid_request_error, exceed_context_size_error, "
                      "authentication_error, permission_error, not_found_error, server_error, unavailable_error")


class ErrorObject(BaseModel):
    """llama-server's error shape, `{"error": {"code", "message", "type"}}`."""

    error: ErrorBody
