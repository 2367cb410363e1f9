"""Request bodies of Ollama's model-management routes (docs/api.md), as its clients send them.
Ollama's older name for `model` (`name`) is accepted too; unknown keys are ignored, as Ollama
ignores them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, Field

ModelName = Annotated[str, Field(min_length=1, validation_alias=AliasChoices("model", "name"))]


class ModelRequest(BaseModel):
    """`show` and `delete`."""

    model: ModelName


class CopyRequest(BaseModel):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class PullRequest(BaseModel):
    model: ModelName
    stream: bool = True
    register_as: str | None = Field(None, description="extension: the name to register it under (`myllm pull --name`)")


class CreateMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class CreateRequest(BaseModel):
    """Ollama's JSON form of `create`: a new model `from` a registered one, or from `files`
    (`{file name: "sha256:<hex>"}` of a GGUF uploaded with `POST /api/blobs`), with the
    Modelfile's settings as fields."""

    model: ModelName
    from_: str | None = Field(None, alias="from")
    files: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[CreateMessage] | None = None
    license: str | list[str] | None = None
    stream: bool = True
    quantize: str | None = Field(None, description="refused: myllm does not quantize")
    adapters: dict[str, str] | None = Field(None, description="LoRA adapters (GGUF) uploaded to /api/blobs: file name to "
                                                "digest, applied over the model in order")
    adapters: dict[str, str] | None = Field(None, description="refused: myllm loads no LoRA adapters")
    draft: str | None = Field(None, min_length=1, description="extension: a registered model of the same "
                              "vocabulary that drafts for this one (speculative decoding; Modelfile `DRAFT`)")
