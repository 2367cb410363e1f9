"""All configuration in one place: every knob is a `MYLLM_*` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Read fresh from the environment each time it is built, so tests and the CLI
    can point a process at another home without global state."""

    model_config = SettingsConfigDict(env_prefix="MYLLM_", extra="ignore")

    home: Path = Field(
        default=Path("~/.myllm"),
        description="Data folder: the database, the blob store and download caches.",
    )
    host: str = Field(default="127.0.0.1", description="Address the daemon binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port the daemon listens on.")
    ollama_port: int = Field(
        default=11434, ge=0, le=65535, description="Second port, serving Ollama's API (Ollama's own port by "
        "default, so Ollama clients work unchanged); 0 turns it off. Taken (by a running Ollama): one log line, "
        "and the daemon serves its main port alone."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the registry and sessions database; default SQLite at $MYLLM_HOME/myllm.db. "
        "postgresql+psycopg://user:pass@host/db lets several daemons share models and sessions.",
    )
    default_model: str = Field(
        default="smollm2:135m", description="Model used when a request names none."
    )
    num_threads: int | None = Field(
        default=None, ge=1, description="llama.cpp threads per model; default: physical cores."
    )
    runner_nice: int = Field(
        default=5, ge=0, le=19,
        description="How much lower the runners' CPU priority is than the daemon's (a Unix nice increment). "
        "llama.cpp's threads keep every core busy while a model computes, and the daemon's short work on each "
        "request and token (relaying it, answering the client) then waited behind them: first tokens came "
        "1.3 ms later on 2 cores. 0: the same priority.",
    )
    num_ctx: int = Field(
        default=4096,
        ge=256,
        description="Context length a model is loaded with unless it or the request asks for another "
        "(capped at the model's trained context).",
    )
    max_memory: str = Field(
        default="75%",
        description="Memory budget for loaded models: bytes, a size such as 6GiB, or a percentage "
        "of the memory available at start.",
    )
    num_gpu: int = Field(
        default=-1, ge=-1, le=1024,
        description="Layers of a model llama.cpp puts on the GPU when it was built for one: -1 (the default) as many "
        "as fit the GPU memory budget, as Ollama decides; 0 none (the CPU alone); N at most N (the output layer "
        "counts as one). `num_gpu` per request or model overrides it.",
    )
    flash_attention: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="llama.cpp's flash attention: `auto` lets llama.cpp decide (on where the backend has it, "
        "llama-server's default), `on`, `off`. On a CPU, `off` decodes about twice as fast behind 2,000 tokens of "
        "context and evaluates short turns faster; `on` evaluates long prompts up to twice as fast.",
    )
    max_gpu_memory: str = Field(
        default="90%",
        description="GPU memory budget for loaded models beside the RAM budget: bytes, a size such as 20GiB, or a "
        "percentage of the GPU memory free at start (several GPUs count as one pool). Unused without a GPU.",
    )
    rpc_servers: str = Field(
        default="",
        description="llama.cpp RPC workers (`myllm rpc-worker`) a model's layers are spread over: `host:port` "
        "comma-separated, e.g. 10.0.0.2:50052,10.0.0.3:50052; empty: none. As many layers as the workers' memory "
        "holds go to them (split by each one's free memory), the rest stays on this machine's CPU. A model's "
        "`rpc_servers` parameter overrides it. The workers have no authentication: a private network only.",
    )
    max_loaded_models: int = Field(default=3, ge=1, description="Most model instances loaded at once.")
    keep_alive: str = Field(
        default="5m",
        description="How long an idle model stays loaded: 30s, 5m, 1h, seconds as a number; 0 unloads "
        "after each request, a negative value keeps it loaded.",
    )
    load_timeout: str = Field(
        default="5m", description="How long a load may wait for memory held by busy models."
    )
    num_parallel: int = Field(
        default=4, ge=1, le=64,
        description="Requests one loaded model generates at once (continuous batching in one llama.cpp "
        "context; each gets num_ctx tokens of KV). 1 turns batching off.",
    )
    draft_max: int = Field(
        default=16, ge=0, le=64,
        description="The most tokens a request may draft a step for speculative decoding: by prompt lookup (the "
        "request or model option `draft_max` turns it on) or with the model's draft model (Modelfile DRAFT; on "
        "unless `draft_max` is 0): each loaded model keeps this many rows of logits more for verifying drafts "
        "(per sequence with a draft model; about 8 bytes x vocabulary each). 0 turns speculation off.",
    )
    grammar_token_ms: int = Field(
        default=1000, ge=10, le=60_000,
        description="CPU milliseconds an output format's grammar (JSON mode, a schema, a forced tool call) may "
        "take for one token, on the model's scheduler thread, which every request of the model waits on: a "
        "format whose first token would take more than half of it is refused (400) before it starts, and a "
        "request whose grammar takes longer for a later token is stopped with an error.",
    )
    stream_interval_ms: float = Field(
        default=1.0, ge=0, le=100,
        description="Milliseconds a runner may hold a streamed request's tokens before sending them to the daemon, "
        "so that when decode steps take a fraction of a millisecond (a small model, a GPU) tokens go out a few "
        "steps at a time and the daemon, woken less often, takes less time from the computation. A request's first "
        "token and its end are never held. 0: every step's tokens at once.",
    )
    kv_cache: str = Field(
        default="auto",
        description="RAM per loaded model for the prefix cache (KV of past prompts beyond the slots, shared "
        "prefixes held once), so a prompt that extends an earlier one evaluates only its new tokens: "
        "`auto` is as much as the model's own context KV "
        "(num_parallel x num_ctx tokens), a size such as 512MiB sets it, 0 turns it off. "
        "Counted in the model's memory estimate.",
    )
    thinking_budget: int | None = Field(
        default=None, ge=1,
        description="Tokens a thinking model may think before the engine closes its reasoning section and it answers, "
        "unless the request (`thinking_budget`, Anthropic's `budget_tokens`) or the model (a Modelfile PARAMETER) "
        "says otherwise; unset: no limit but the answer's own.",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Requests that may wait per model; past it the API answers 503."
    )
    template_timeout: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds a chat template may take to render one request's "
        "messages; past it the request gets a 400 (a template is a program: a slow one must not hold the daemon)."
    )
    health_interval: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds between health checks of each loaded model's runner; one "
        "that does not answer within twice this, or whose scheduler died or stalled, is restarted."
    )
    allowed_hosts: str | None = Field(
        default=None, description="Comma-separated extra names clients may reach the daemon by (the Host header); "
        "localhost, 127.0.0.1 and [::1] always pass, and beyond loopback the machine's own names and addresses. "
        "`*` turns the check off, which lets any web page drive the daemon through DNS rebinding."
    )
    origins: str | None = Field(
        default=None,
        description="Comma-separated origins browsers may call from (CORS); default: localhost and "
        "127.0.0.1 on any port.",
    )
    max_body: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger ones get 413.")
    shutdown_grace: float = Field(
        default=10.0, ge=0, description="Seconds in-flight requests may run on after SIGTERM/Ctrl-C before "
        "they are cancelled (their streams end with an error event)."
    )
    api_keys: SecretStr | None = Field(
        default=None, description="Comma-separated API keys; when set, requests need 'Authorization: Bearer KEY'."
    )
    api_keys_file: Path | None = Field(default=None, description="A file of API keys, one per line.")
    inference_keys: SecretStr | None = Field(
        default=None, description="Comma-separated keys that may run models (generate, chat, embed, list) but not "
        "change the registry or others' state (pull, create, copy, delete, blob upload, unload)."
    )
    inference_keys_file: Path | None = Field(default=None, description="A file of inference keys, one per line.")
    model_dirs: str | None = Field(
        default=None, description="Folders (separated by ':') under which API clients may name local .gguf files to "
        "load or pull (admin keys only); default: none, so clients cannot make the daemon read local paths. The "
        "CLI's own pulls are not limited."
    )
    turn_wait: float = Field(
        default=60.0, ge=0, le=3600, description="Seconds a turn on a stored session waits for the session's running turn "
        "(on this daemon or another over the same database) to end; past it, 409 session_busy."
    )
    turn_lease: float = Field(
        default=15.0, ge=1, le=3600, description="Seconds a running turn's claim on its session lasts unless its daemon "
        "renews it (every third of this): a daemon that dies mid-turn holds its session no longer."
    )
    replica_id: str | None = Field(
        default=None, description="This daemon's name in the X-MyLLM-Replica response header (default: host:port), for "
        "telling replicas apart behind a load balancer."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="The daemon's log: `text` (lines for people) or `json` (one object per line: "
        "time, level, message, and each request's api, route, model, status, tokens, ttft_ms, ms, key hash)."
    )
    rate_limit: str | None = Field(
        default=None, description="Requests per key (per client address while keys are off), e.g. 120/minute; past "
        "it, 429 with Retry-After. /health is never limited."
    )
    max_concurrent_per_key: int = Field(
        default=0, ge=0, description="Generations one key (or address) may run at once; past it, 429. 0: no cap."
    )
    # Input bounds (issue 27)
    max_messages: int = Field(
        default=2048, ge=1, le=1_000_000, description="Messages one chat request may send (every chat route, tool "
        "results included); past it, 400. OpenAI's own limit, so a client that works there works here. A stored "
        "session or response chain longer than this keeps its newest messages in the prompt."
    )
    max_embed_inputs: int = Field(
        default=2048, ge=1, le=1_000_000, description="Inputs one embedding request may send (every embedding route); "
        "past it, 400. OpenAI's own limit; the inputs are embedded in small slices, so other requests go on between them."
    )
    max_rerank_documents: int = Field(
        default=1000, ge=1, le=100_000, description="Documents one rerank request may send (every rerank route); past "
        "it, 400. Cohere's own limit; they are scored in small slices, so other requests go on between them."
    )
    max_document_bytes: int = Field(
        default=65536, ge=256, le=16 * 1024 * 1024, description="UTF-8 bytes of one document (or query) a rerank "
        "request may send; past it, 400, before anything is tokenized. A pair longer than the model's batch is "
        "refused too, or cut with the request's `truncate`."
    )
    max_grammar: int = Field(
        default=65536, ge=1024, le=16 * 1024 * 1024, description="Characters of grammar a request's JSON schema (`format`, "
        "`response_format`, `text.format`, a required tool call) may become; past it, 400. Measured before the "
        "schema is converted (repetition counts such as minLength or minItems, pattern quantifiers, enum values, "
        "properties), and conversion runs off the event loop. Sampling costs time per token in proportion to it."
    )
    max_schema_depth: int = Field(
        default=64, ge=4, le=512, description="Levels a request's JSON schema may nest (JSON objects and arrays, and "
        "$ref hops while it is converted); past it, 400."
    )
    max_schema_nodes: int = Field(
        default=65536, ge=16, le=10_000_000, description="JSON values (objects, arrays, strings, numbers) a request's "
        "JSON schema may hold; past it, 400."
    )
    # Runners and reloads (issue 27)
    crash_limit: int = Field(
        default=3, ge=1, le=100, description="Runner crashes of one model (while loading or serving) within "
        "MYLLM_CRASH_WINDOW after which the model is refused (500 model_crashed with Retry-After, nothing loaded or "
        "evicted) for 30 s, doubling with each further crash up to 10 min. A crash while loading is refused at once."
    )
    crash_window: float = Field(
        default=600.0, gt=0, le=86400, description="Seconds over which a model's runner crashes are counted "
        "(MYLLM_CRASH_LIMIT); a model quiet for this long starts afresh."
    )
    reloads_per_key: str | None = Field(
        default="6/minute", description="Loads an inference key may cause that evict another instance or add a "
        "second instance of a model already loaded with other options (e.g. cycling num_ctx), as N/second, "
        "N/minute or N/hour; past it, 429 with Retry-After. Admin keys and requests that reuse a loaded instance "
        "are not counted. Empty: no limit."
    )
    max_json_depth: int = Field(
        default=64, ge=8, le=512, description="Deepest nesting of arrays and objects in a request body, and in the "
        "JSON text of tool-call arguments it carries; deeper, 400 (a deep value used to reach Python's recursion "
        "limit: a 500)."
    )
    # Web and keys (issue 27)
    trusted_proxies: str | None = Field(
        default=None, description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers are believed (the client's address is then the one they "
        "name, for rate limits and the log); default: none, so those headers are ignored and no client can pose as "
        "another address."
    )
    auth_failures: str | None = Field(
        default="10/minute", description="Requests with a wrong API key one client address may send, e.g. 10/minute; "
        "past it, every request from that address gets 429 with Retry-After until its budget refills, a right key's "
        "too (so a guesser learns nothing). Clients behind one address share it. Empty: no limit."
    )

    # Pools and uploads (issue 27)
    db_threads: int = Field(
        default=8, ge=1, le=256, description="Threads that run database calls (registry, sessions) off the event loop. "
        "A PostgreSQL pool keeps a connection for each of these, blob and pull threads."
    )
    blob_threads: int = Field(
        default=4, ge=1, le=256, description="Threads for blob I/O (hashing and reading model files, writing uploads, "
        "registering an uploaded blob), apart from the database's, so slow disks never hold up database calls."
    )
    max_pulls: int = Field(
        default=2, ge=1, le=64, description="Pulls (`/api/pull`, `/load_model`) that download at once; more wait in line."
    )
    pool_queue: int = Field(
        default=256, ge=1, description="Calls that may wait for each pool's threads (database, blobs, pulls); past it, 503."
    )
    max_uploads: int = Field(
        default=4, ge=1, le=1024, description="Blob uploads (`POST /api/blobs`) received at once; past it, 429 with "
        "Retry-After."
    )
    upload_idle_timeout: float = Field(
        default=60.0, gt=0, le=3600, description="Seconds an upload may go without sending a byte; past it, it is "
        "dropped (408) and its staged bytes removed."
    )
    max_upload_size: ByteSize = Field(
        default=ByteSize(64 << 30), ge=1, description="Largest blob upload, e.g. 64GiB; past it, 413 and its staged "
        "bytes removed."
    )
    max_staged_uploads: ByteSize = Field(
        default=ByteSize(128 << 30), ge=1, description="Bytes of uploads no model uses, being received or stored "
        "(uploaded but not yet created); an upload that would pass it gets 507."
    )
    blob_ttl: float = Field(
        default=3600.0, gt=0, description="Seconds an uploaded blob that no model uses is kept for the `create` that "
        "names it; then it is removed. Blobs a model uses are never removed."
    )
    # Clients in the wild
    max_tool_calls: int = Field(
        default=8, ge=1, le=128, description="Tool calls one reply may make when parallel calls are allowed and a "
        "call is forced (the grammar's bound: a small model otherwise repeats calls until the token limit)."
    )
    # Images (issue 32)
    max_image_bytes: ByteSize = Field(
        default=ByteSize(20 << 20), ge=1, description="Largest image file a request may send (its bytes as sent, "
        "before decoding), e.g. 20MiB; past it, 400 (`too_many_bytes`). The request body's own cap (MYLLM_MAX_BODY) "
        "applies first."
    )
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1, le=1 << 30, description="Most pixels (width x height) an image may have; read from "
        "its header and checked before it is decoded, so a small file that would decode to gigabytes (a "
        "decompression bomb) is refused (400, `too_many_pixels`). A decoded image crosses to the model's runner as "
        "3 bytes a pixel."
    )
    max_images: int = Field(
        default=8, ge=1, le=1024, description="Images one request may send, all messages together; past it, 400 "
        "(`too_many_images`)."
    )
    image_urls: Literal["off", "public", "any"] = Field(
        default="off", description="Whether image parts given by http(s) URL (OpenAI's `image_url`, the Responses "
        "API's `input_image`, Anthropic's `url` source) are fetched by the daemon: `off` (a 400 naming this setting; "
        "send images inline), `public` (only from public addresses: every address the host resolves to, and each "
        "redirect's, must be public, not loopback, private, link-local, multicast, reserved or unspecified, and the "
        "connection goes to the address checked), `any` (any address, e.g. a LAN's servers: the daemon then fetches "
        "from wherever its clients point it). Bodies are capped by MYLLM_MAX_IMAGE_BYTES while read."
    )
    image_url_timeout: float = Field(
        default=10.0, gt=0, le=600, description="Seconds fetching one image URL may take, all of it (resolving, "
        "connecting, redirects, reading the body); past it, 400 (`url_timeout`)."
    )
    max_session_image_bytes: ByteSize = Field(
        default=ByteSize(256 << 20), ge=1, description="Bytes of images one stored conversation (a session, a "
        "Responses chain) may hold, all its messages together, e.g. 256MiB; a turn that would pass it gets 400 "
        "(`too_many_bytes`). Stored images are blobs of the store, kept once however many messages send them."
    )

    @field_validator("rpc_servers")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        return ",".join(rpc_endpoints(value))

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def blobs_dir(self) -> Path:
        return self.home_dir / "blobs"

    @property
    def downloads_dir(self) -> Path:
        """Partial hub downloads live here so an interrupted pull can resume."""
        return self.home_dir / "downloads"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'myllm.db'}"

    @property
    def local_model_dirs(self) -> list[Path]:
        """`model_dirs` as folders (none when unset: API clients name no local files)."""
        return [Path(p) for p in (self.model_dirs or "").split(":") if p.strip()]


def rpc_endpoints(text: str) -> tuple[str, ...]:
    """`host:port,host:port` (MYLLM_RPC_SERVERS, a model's `rpc_servers`) as its endpoints, each
    checked: llama.cpp's RPC client aborts the whole process on one it cannot parse. Raises
    ValueError naming the bad one."""
    endpoints = tuple(part.strip() for part in text.split(",") if part.strip())
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"RPC worker {endpoint!r} is not host:port (e.g. 10.0.0.2:50052)")
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"RPC workers {text!r} name one twice")
    return endpoints
