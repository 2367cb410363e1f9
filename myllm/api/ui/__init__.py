"""The chat page (`/ui`): static files (static/), a client of the native API, served without a key."""

from myllm.api.http.document import ApiDocument
from myllm.api.ui import routes

API = ApiDocument(routers=(routes.router,), open_paths=routes.PATHS)
