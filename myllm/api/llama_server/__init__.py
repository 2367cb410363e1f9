"""The Llama-server document (000): `POST /llama`, one prompt in, the whole reply out."""

from myllm.api.http.document import ApiDocument
from myllm.api.llama_server import routes

API = ApiDocument(
    routers=(routes.router,), errors={routes.PATH: routes.llama_renderer}, generation_paths=frozenset({routes.PATH}))
