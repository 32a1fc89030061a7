"""What the demo model is: one frozen recipe, fingerprinted.

The fingerprint names the recipe (hyperparameters + builder version), not the machine: a cached
or committed artifact is reused only if its recorded fingerprint equals the current one.

Example:
    >>> spec = DemoSpec()
    >>> spec.fingerprint() == DemoSpec().fingerprint()
    True
    >>> DemoSpec(steps=10).fingerprint() == spec.fingerprint()
    False
    >>> DemoSpec(tool_steps=0).fingerprint() == spec.base_fingerprint() != spec.fingerprint()
    True
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the corpus, tokenizer or training code changes what a recipe produces.
BUILDER_VERSION = 2

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
)

# Roles become <|role|> markers; each message ends with <|end|>; generation stops at <|end|>.
# With ``tools`` a system block lists them (one JSON object each); an assistant's tool calls are
# written as <tool_call>{"name": ..., "arguments": {...}}</tool_call> (the format the "specserve"
# tool parser reads) and a tool's result is a <|tool|> message. Without tools the rendering is the
# same as before they existed, so plain chat prompts (and the training data) are unchanged.
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|system|>\\nYou can call these tools. To call one, answer with '"
    "'<tool_call>{\"name\": <name>, \"arguments\": <arguments>}</tool_call>.\\n' }}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool['function'] is defined else tool -%}"
    "{{ {'name': fn['name'], 'description': fn.get('description'), 'parameters': fn.get('parameters')} | tojson }}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{{ '<|assistant|>\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] -%}"
    "{{ '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) -}}"
    "{{ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|end|>\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|tool|>\\n' + (message['content'] or '') + '<|end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class DemoSpec:
    """Hyperparameters of the demo model and its training run (Llama architecture)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    context: int = 512  # max_position_embeddings (what vLLM serves)
    train_context: int = 256  # window length used in training (cheaper on 2 cores)
    # Training: batch_size sequences of `context` tokens per step.
    steps: int = 420
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.1
    json_fraction: float = 0.15  # share of training rows drawn from the JSON corpus
    chat_fraction: float = 0.5  # share of JSON/code snippets wrapped in the chat template
    heldout_modulus: int = 40  # a file is held out when hash(relpath) % modulus == 0
    json_documents: int = 6000
    eval_batches: int = 8
    seed: int = 1234
    threads: int = 2
    compile: bool = False  # inductor's first compile costs minutes on 2 loaded cores
    extra: dict[str, str] = field(default_factory=dict)
    # Second stage (demo/tool_tuning.py): tool-call chats, assistant turns only, with base-corpus
    # windows replayed each step. tool_steps = 0 is the base model alone.
    tool_steps: int = 1500
    tool_lr: float = 2e-3
    tool_batch: int = 8
    tool_base_rows: int = 2
    tool_base_weight: float = 0.5
    tool_chats: int = 8000
    tool_eval_chats: int = 60
    tool_call_share: float = 0.75
    tool_max_tokens: int = 320
    tool_seed: int = 77

    def _payload(self, tools: bool) -> dict[str, object]:
        fields = asdict(self)
        if not tools:
            fields = {k: v for k, v in fields.items() if not k.startswith("tool_")}
        return {"builder": BUILDER_VERSION, **fields}

    def base_fingerprint(self) -> str:
        """The fingerprint of the first stage alone (the model before tool tuning)."""
        return _digest(self._payload(tools=False))

    def fingerprint(self) -> str:
        """The whole recipe's fingerprint; equal to :meth:`base_fingerprint` without a tool stage."""
        return _digest(self._payload(tools=self.tool_steps > 0))


def _digest(payload: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
