"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict: "0.5" is not a number, true is not 1).

Unknown fields are ignored, as OpenAI-compatible servers usually do, so clients that send `frequency_penalty`,
`user` and the like keep working. Extensions beyond OpenAI: `top_k`, `ignore_eos` (as in vLLM) and `verifier`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            kinds = {p.get("type") for p in content if isinstance(p, dict)} - {"text"}
            if kinds:
                raise ValueError(f"only text content parts are supported (the models served here read text); "
                                 f"got {', '.join(map(repr, sorted(map(str, kinds))))}")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = True      # unlike OpenAI, on unless set false: the usage chunk carries tier and cost


class VerifierSpec(_Strict):
    type: Literal["python_tests"]
    tests: str = Field(min_length=1, max_length=20_000, description="Python; every top-level assert is a test")
    timeout: float | None = Field(None, gt=0, le=60, description="seconds per candidate (capped by the server)")


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="extension: 0 = no top-k filter")
    n: int = Field(1, ge=1, le=128, description="candidates per prompt (the server may cap it lower)")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63,
                             description="candidate i samples with seed + i; reproducible whatever else runs on the "
                                         "standard tier, and on the ultraspeed tier with whole-block verification "
                                         "(serve --verify full, or the static runtime): adaptive verification picks "
                                         "one verify length for the whole batch")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence")
    verifier: VerifierSpec | None = Field(None, description="extension: pick the best of n candidates by tests")

    # Known OpenAI parameters this server does not implement: accepted when unset or neutral, else a 400, so a
    # client never gets a silently different answer (e.g. no logprobs when it asked for them).
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI declares the optional parameters nullable, and clients that serialise unset fields send null.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def unsupported(self) -> str | None:
        """The first parameter the request really uses that this server does not implement."""
        if self.logprobs is not None and self.logprobs is not False:    # completions' logprobs: 0 asks too
            return "logprobs"
        for name in ("top_logprobs", "logit_bias", "tools", "echo", "suffix"):
            if getattr(self, name, None):
                return name
        if getattr(self, "best_of", None) not in (None, 1):
            return "best_of"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            return "response_format"
        return None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens when both are set")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description="text(s) or token id list(s)")
    echo: Any = None        # not implemented (see `unsupported`)
    suffix: Any = None
    best_of: Any = None     # candidates ranked by log-probability: not implemented (n + verifier picks by tests)
