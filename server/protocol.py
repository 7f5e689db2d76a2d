"""The OpenAI-compatible request and response bodies: the API's single source of truth.

Unknown fields are ignored (as vLLM does); known fields are checked here, so a bad value becomes a 400
with the field's name before it reaches the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rheads.engine import SamplingParams
from rheads.engine.sequence import MIN_REPETITION_PENALTY

from . import structured

MAX_N = 16
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _enforceable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            structured.json_schema_grammar(value)
        return value


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema')
        return self

    def grammar(self) -> str | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.type == "json_schema" else None
        return structured.json_schema_grammar(schema if schema is not None else {"type": "object"})


GUIDES = ("response_format", "guided_json", "guided_regex", "guided_choice")


def constrains(value) -> bool:
    return value is not None and getattr(value, "type", None) != "text"


def one_guide(value, info: ValidationInfo):
    """The field's value, unless a field before it constrains the output already (they validate in order)."""
    earlier = [name for name in GUIDES[:GUIDES.index(info.field_name)] if constrains(info.data.get(name))]
    if value is not None and earlier:
        raise ValueError(f"give one of {', '.join(GUIDES)} ({earlier[0]} is given)")
    return value


class SamplingFields(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: FiniteFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: FiniteFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat = Field(default=0.0, ge=-2.0, le=2.0)
    # vLLM's extensions, as min_tokens
    repetition_penalty: FiniteFloat = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=2.0)
    min_tokens: int = Field(default=0, ge=0)
    logit_bias: dict[str, FiniteFloat] | None = None  # token id (as a string, OpenAI's JSON) -> bias
    # what the output must be: OpenAI's response_format, or one of vLLM's guided_* extensions (in this order)
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = Field(default=None, max_length=4096)
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("guided_json")
    @classmethod
    def _json_guide(cls, value, info: ValidationInfo):
        if value is not None:
            structured.json_schema_grammar(structured.json_text_schema(value))
        return one_guide(value, info)

    @field_validator("guided_regex")
    @classmethod
    def _regex_guide(cls, value, info: ValidationInfo):
        if value is not None:
            structured.regex_grammar(value)
        return one_guide(value, info)

    @field_validator("guided_choice")
    @classmethod
    def _choice_guide(cls, value, info: ValidationInfo):
        if value is not None and any(not choice for choice in value):
            raise ValueError("guided_choice takes non-empty strings")
        return one_guide(value, info)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 16 non-empty strings of at most 256 characters")
        return stops

    @model_validator(mode="after")
    def _min_within_max(self) -> "SamplingFields":
        if self.asked_max_tokens is not None and self.min_tokens > self.asked_max_tokens:
            raise ValueError("min_tokens must not exceed the maximum number of tokens asked for")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > 300 or any(not key.isdigit() or not -100 <= bias <= 100 for key, bias in value.items()):
            raise ValueError("logit_bias maps up to 300 token ids to biases between -100 and 100")
        return value

    default_max_tokens: ClassVar[int | None] = None  # None: as many as the context and the cache leave

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """None: no logprobs; 0: the chosen token's; k: the chosen and the top k."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def guide(self) -> str | None:
        """The field that constrains the output, if one does."""
        return next((name for name in GUIDES if constrains(getattr(self, name))), None)

    def grammar(self) -> str | None:
        """The llguidance grammar the output must follow, if any (`structured`)."""
        if self.response_format is not None:
            return self.response_format.grammar()
        if self.guided_json is not None:
            return structured.json_schema_grammar(structured.json_text_schema(self.guided_json))
        if self.guided_regex is not None:
            return structured.regex_grammar(self.guided_regex)
        if self.guided_choice is not None:
            return structured.choice_grammar(self.guided_choice)
        return None

    def to_sampling_params(self, max_tokens: int, grammar: str | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=max(self.top_k, 0), seed=self.seed, stop=self.stop or [],
                              stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                              logprobs=self.num_logprobs, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                              min_tokens=min(self.min_tokens, max_tokens), grammar=grammar)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    default_max_tokens: ClassVar[int | None] = 16  # OpenAI's default for completions

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (a string, token ids, or a batch of either)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        structured.json_object(value, "arguments")
        return value


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict:
        """As chat templates read a call: its arguments an object (they serialize them themselves)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.function.name, "arguments": json.loads(self.function.arguments)}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with their results
    tool_call_id: str | None = None  # a tool message's: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self

    def for_template(self) -> dict:
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _enforceable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            structured.json_schema_grammar(value)
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # False: a forced call is one call (a named function's always is)

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in value or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, value, info: ValidationInfo):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        forced = value == "required" or isinstance(value, NamedToolChoice)
        if forced and not names:
            raise ValueError("tool_choice other than none or auto needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not among the tools")
        if forced and any(constrains(info.data.get(name)) for name in GUIDES):
            raise ValueError(f"a forced tool call takes none of {', '.join(GUIDES)}")
        return value

    @property
    def calls_tools(self) -> bool:
        """The model is offered the tools (tool_choice "none" keeps them out of the prompt)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tools(self) -> list[Tool] | None:
        """The tools one of which the output must call (tool_choice "required" or a named one), else None."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return self.tools if self.tool_choice == "required" else None

    @property
    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with messages, as in a chat request

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache instead of computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=status)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def completion_logprobs(tokens: list[str], logprobs: list[Any], top: list[dict[str, float]],
                        offsets: list[int]) -> dict[str, Any]:
    """The legacy completions `logprobs` object."""
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
