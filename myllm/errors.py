"""Typed domain errors raised by the core; each API maps them to its own shape in one place.

`status` is the HTTP status most APIs use for the error; adapters may override it.
"""

from __future__ import annotations


class MyLLMError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidModelName(MyLLMError):
    status = 400
    code = "invalid_model_name"


class ModelNotFound(MyLLMError):
    status = 404
    code = "model_not_found"

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(message or f"model '{name}' not found")
        self.name = name


class SessionNotFound(MyLLMError):
    status = 404
    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session '{session_id}' not found")
        self.session_id = session_id


class SessionBusy(MyLLMError):
    """Another turn on the session (on this daemon or another over the same database) ran
    longer than a turn may wait for it (MYLLM_TURN_WAIT)."""

    status = 409
    code = "session_busy"


class TurnLost(MyLLMError):
    """A turn's claim on its session lapsed (its daemon could not renew it, say while the
    database was unreachable) and another turn took the session: this turn was not stored."""

    status = 409
    code = "session_busy"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session '{session_id}' went on without this turn (its claim lapsed while another turn "
                         "took the session); the answer was not stored: send the turn again")
        self.session_id = session_id


class StoreUnavailable(MyLLMError):
    """The database did not answer (a lost connection, a server restarting): try again."""

    status = 503
    code = "database_unavailable"

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ResponseNotFound(MyLLMError):
    status = 404
    code = "not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.")
        self.response_id = response_id


class Forbidden(MyLLMError):
    """The caller's key may not do this (an inference key asking for an admin's action)."""

    status = 403
    code = "forbidden"


class ModelExists(MyLLMError):
    status = 409
    code = "model_exists"


class InvalidModelFile(MyLLMError):
    """The file is not a GGUF model llama.cpp can load (wrong magic, truncated, a header or
    hyperparameters out of llama.cpp's limits): refused before it is registered."""

    status = 400
    code = "invalid_model_file"


class InvalidDigest(MyLLMError):
    """A blob digest that is not `sha256:` and 64 lower-case hex digits."""

    status = 400
    code = "invalid_digest"


class BlobNotFound(MyLLMError):
    status = 404
    code = "blob_not_found"


class ImageNotFound(MyLLMError):
    """An image a stored conversation does not hold, or holds but whose file is not in this
    daemon's blob store (a replica needs the blob store the others write to)."""

    status = 404
    code = "image_not_found"


class PullError(MyLLMError):
    """A source could not be fetched: unknown repo or quant, missing path, hub failure."""

    status = 400
    code = "pull_failed"


class SourceNotFound(PullError):
    status = 404
    code = "source_not_found"


class IntegrityError(PullError):
    """Downloaded bytes do not match the digest the source promised."""

    code = "digest_mismatch"


class ModelFileMissing(ModelNotFound):
    """The model is registered (perhaps by another daemon over the same database) but its
    file is not on this machine: a 404 that says what to pull."""

    def __init__(self, name: str, digest: str, source: str | None) -> None:
        how = f"`myllm pull {source} --name {name}`" if source else f"`myllm pull` of the file with sha256 {digest}"
        super().__init__(name, f"model '{name}' is registered but its file (sha256:{digest[:12]}) is not on this machine; "
                               f"pull it here: {how}")
        self.digest = digest


class ModelBroken(MyLLMError):
    """The registry row is there but its blob is missing or no longer matches its digest."""

    status = 500
    code = "model_broken"


class ModelLoadError(MyLLMError):
    """llama.cpp refused the model; the message carries its reason."""

    status = 500
    code = "model_load_failed"


class InvalidOptions(MyLLMError):
    status = 400
    code = "invalid_options"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BadImage(InvalidOptions):
    """An image a client sent that no model is given: `reason` names which check it failed
    (`not_an_image`, `unsupported_format`, `too_many_bytes`, `too_many_pixels`,
    `too_many_images`), so each API can say it in its own 400."""

    code = "invalid_image"

    def __init__(self, message: str, reason: str, field: str | None = "images") -> None:
        super().__init__(message, field)
        self.reason = reason


class PromptTooLong(MyLLMError):
    status = 400
    code = "prompt_too_long"

    def __init__(self, prompt_tokens: int, context_length: int, at_least: bool = False) -> None:
        """`at_least`: the prompt was refused before all of it was tokenized (it has more
        than `prompt_tokens`)."""
        super().__init__(
            f"prompt is {'more than ' if at_least else ''}{prompt_tokens} tokens, which does not fit the model's "
            f"context of {context_length} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        self.at_least = at_least


class OutOfMemory(MyLLMError):
    """The model does not fit the memory budget, now or at all."""

    status = 503
    code = "out_of_memory"

    def __init__(self, message: str, needed: int = 0, budget: int = 0, retry_after: int = 10) -> None:
        super().__init__(message)
        self.needed = needed
        self.budget = budget
        self.retry_after = retry_after


class Overloaded(MyLLMError):
    """Too many requests are queued for a model; retry later."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyReloads(MyLLMError):
    """A key has caused too many loads that evict others or duplicate a loaded model
    (MYLLM_RELOADS_PER_KEY); retry later, or use the loaded instance's options."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotLoaded(MyLLMError):
    status = 503
    code = "model_not_loaded"


class ShuttingDown(MyLLMError):
    status = 503
    code = "shutting_down"


class ModelCrashed(MyLLMError):
    """The model's runner process died (a llama.cpp abort, a signal, the OOM killer). Only that
    model is lost: its requests fail with this error and the next request loads it afresh,
    unless it crashed while loading or keeps crashing (MYLLM_CRASH_LIMIT), when it is refused for
    a while instead of crash-looping."""

    status = 500
    code = "model_crashed"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        """`retry_after`: the seconds left of the model's crash back-off, when it is refused for one."""
        super().__init__(message)
        self.retry_after = retry_after


# -- uploads (issue 27) ---------------------------------------------------------------------


class TooManyUploads(MyLLMError):
    """Every upload slot (MYLLM_MAX_UPLOADS) is taken; retry later."""

    status = 429
    code = "too_many_uploads"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UploadTooLarge(MyLLMError):
    """An upload passed MYLLM_MAX_UPLOAD_SIZE; what it had sent is removed."""

    status = 413
    code = "upload_too_large"


class StagingFull(MyLLMError):
    """Uploads no model uses (being received or stored) would pass MYLLM_MAX_STAGED_UPLOADS."""

    status = 507
    code = "insufficient_storage"


class UploadStalled(MyLLMError):
    """An upload sent nothing for MYLLM_UPLOAD_IDLE_TIMEOUT seconds; what it had sent is removed."""

    status = 408
    code = "upload_timeout"
