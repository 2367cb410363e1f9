"""Anthropic's Messages API (`/v1/messages`, its `count_tokens`), in Anthropic's error shape:
its prefix is longer than OpenAI's `/v1`, so its renderer wins there."""

from myllm.api.anthropic import routes
from myllm.api.http.document import ApiDocument

API = ApiDocument(
    routers=(routes.router,),
    errors={routes.PREFIX: routes.anthropic_renderer},
    generation_paths=frozenset({"/v1/messages"}),
)
