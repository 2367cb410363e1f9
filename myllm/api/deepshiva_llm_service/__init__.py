"""The DeepShiva (002) and LLM-service (004) documents, which share `POST /generate`: one set of
routes answering with both documents' fields, errors in both shapes' keys."""

from myllm.api.deepshiva_llm_service import routes
from myllm.api.http.document import ApiDocument

API = ApiDocument(
    routers=(routes.router,),
    errors={path: routes.legacy_renderer for path in routes.PATHS},
    generation_paths=frozenset({"/generate", "/stream"}),
)
