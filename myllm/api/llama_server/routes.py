"""The Llama-server document (000): `POST /llama`, one prompt in, the whole templated
conversation out as a JSON string."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from myllm.api.http.auth import reloading_key
from myllm.api.http.errors import ApiError
from myllm.api.http.relay import collect
from myllm.api.llama_server.models import LlamaError, LlamaRequest
from myllm.api.state import services
from myllm.errors import InvalidOptions
from myllm.runtime.service import GenerationOptions

PATH = "/llama"
SYSTEM = (
    "You are a succinct chat bot that will do as prompted by the user, or if asked a question will answer "
    "that question."
)
router = APIRouter(tags=["Llama server"], responses={c: {"model": LlamaError} for c in (400, 404, 500, 503)})


def llama_renderer(err: ApiError) -> Response:
    message = err.message if err.status < 500 or err.error is not None else "internal server error"
    return JSONResponse({"error": message}, status_code=400 if err.status == 422 else err.status)


@router.post(PATH, response_model=str)
async def llama(body: LlamaRequest, request: Request) -> str:
    """The system prompt, the user's turn and the assistant's turn (starting with
    `pre_response`) in the model's chat template, followed by the generated text."""
    if not body.prompt:
        raise InvalidOptions("Missing required parameter prompt", field="prompt")
    if body.max_length is not None and body.max_length < 0:
        raise InvalidOptions("max_length must not be negative", field="max_length")
    svc = services(request)
    stream = await svc.runtime.chat(
        body.model or svc.settings.default_model,
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body.prompt}],
        GenerationOptions.parse({"max_tokens": body.max_length or None}),  # 0: until the model stops
        prefill=body.pre_response or "",
        caller=reloading_key(request),
    )
    done = await collect(request, stream)
    return stream.prompt_text + done.text
