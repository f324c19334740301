"""Gateway configuration: which models it serves and where their worker groups are."""
from __future__ import annotations

from dataclasses import dataclass

from gateway.tenants import TenantConfig
from privlm.base.config import check
from privlm.base.transport import TransportConfig


@dataclass(frozen=True)
class ModelRoute:
    model_dir: str          # Hugging Face folder: the gateway loads only its tokenizer files
    worker_target: str      # host:port of the worker group's rank 0
    model_id: str = ""      # empty: the folder name


@dataclass(frozen=True)
class GatewayConfig:
    models: tuple[ModelRoute, ...]           # the first one is the default model
    transport: TransportConfig               # mTLS for clients and the worker hop, or explicit plaintext_dev
    host: str = "127.0.0.1"
    port: int = 0
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_stop_sequences: int = 16
    max_stop_length: int = 256
    # Input text (prompt, or every chat message's content together) is bounded before any tokenizer
    # work, by the model's context window: natural text is 3-5 characters per token, 16 leaves room
    # for code and whitespace runs while an 8k-token model tokenizes at most 128 Ki characters.
    input_chars_per_token: int = 16
    max_input_chars: int = 1_000_000          # ceiling whatever the context window
    max_chat_messages: int = 1024
    max_model_chars: int = 128
    max_request_id_chars: int = 128
    tokenizer_threads: int = 2                # chat template + tokenization run here, off the event loop
    max_queued_tokenizations: int = 64        # beyond this many waiting: RESOURCE_EXHAUSTED at once
    worker_health_period_s: float = 0.5       # how often each worker group's grpc.health.v1 is checked
    worker_health_timeout_s: float = 2.0
    max_message_bytes: int = 8 * 1024 * 1024
    grace_seconds: float = 10.0
    tenants: tuple[TenantConfig, ...] = ()   # bearer-token tenants; required unless allow_anonymous
    allow_anonymous: bool = False            # development only: no authentication (warned at startup)

    def __post_init__(self):
        check(bool(self.tenants) != self.allow_anonymous,
              "gateway: configure tenants (authentication) or set allow_anonymous for development, not both")
        check(len(self.models) >= 1, "gateway needs at least one model route")
        check(self.default_max_new_tokens >= 1, "default_max_new_tokens must be >= 1")
        check(self.max_new_tokens_limit >= self.default_max_new_tokens,
              "max_new_tokens_limit must be >= default_max_new_tokens")
        check(self.input_chars_per_token >= 1 and self.max_input_chars >= 1, "input character limits must be >= 1")
        check(self.tokenizer_threads >= 1 and self.max_queued_tokenizations >= 1,
              "tokenizer_threads and max_queued_tokenizations must be >= 1")
        check(self.worker_health_period_s > 0 and self.worker_health_timeout_s > 0,
              "worker_health_period_s and worker_health_timeout_s must be > 0")
