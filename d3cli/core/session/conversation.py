"""A multi-turn conversation decoded with D3, reusing the KV cache between turns without ever reading a stale entry.

Each reply restarts the depth schedule at i = 0. After a reply, the layers a late token skipped hold fewer positions
than the core layers; a position that every layer holds was computed at full depth. So before the next turn the
cache is cropped to the longest prefix that (a) every layer holds and (b) is a prefix of the new conversation's
token ids, and everything after it (the end of the previous reply, the new user message) is prefilled at full
depth. The first logits of a turn therefore equal a fresh full-depth prefill of the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d3cli.base.errors import UserError
from d3cli.core.decode import engine
from d3cli.core.decode.results import Reply, reply_record
from d3cli.core.model.loader import LoadedModel
from d3cli.core.model.model_facts import context_length, num_decoder_layers
from d3cli.core.session.plan import plan_for
from d3cli.core.session.prefix_cache import PrefixCache
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import encode_chat, has_chat_template


@dataclass
class TurnPlan:
    """What the next reply decodes: the conversation's token ids and how many of them the cache already holds."""

    token_ids: list[int]
    reused: int
    dropped_turns: int


@dataclass
class Conversation:
    loaded: LoadedModel
    settings: DecodeSettings
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    kept: PrefixCache = field(init=False)  # the KV cache of the turns so far, and the tokens at its positions

    def __post_init__(self) -> None:
        if not has_chat_template(self.loaded.tokenizer):
            raise UserError("d3 chat needs a model whose tokenizer has a chat template; this one has none")
        self.kept = PrefixCache(self.loaded.model)

    @property
    def cache(self):
        return self.kept.cache

    @property
    def num_layers(self) -> int:
        return num_decoder_layers(self.loaded.model)

    @property
    def name(self) -> str:
        return self.loaded.name

    def record(self, reply: Reply, plan: TurnPlan) -> dict:
        """The reply's record, as `d3 generate --json` writes one."""
        return reply_record(reply, self.decode_plan(), self.loaded.name, len(plan.token_ids),
                            weights=self.loaded.weights, loaded=self.loaded, cached_tokens=plan.reused)

    def decode_plan(self, settings: DecodeSettings | None = None):
        """The DecodePlan of `settings` (default: the conversation's) for this model and its calibration."""
        return plan_for(self.loaded, settings or self.settings)

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.messages = []
        self.forget_cache()

    def forget_cache(self) -> None:
        self.kept.forget()

    def set_system(self, system: str | None) -> None:
        self.system = system or None
        self.forget_cache()

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        prefix = [{"role": "system", "content": self.system}] if self.system else []
        return encode_chat(self.loaded.tokenizer, prefix + messages)

    def plan(self, user_text: str) -> TurnPlan:
        """Token ids for the conversation plus `user_text`, dropping the oldest turns while it does not fit."""
        if not user_text.strip():
            raise UserError("the message is empty")
        context = context_length(self.loaded.model)
        messages = [*self.messages, {"role": "user", "content": user_text}]
        dropped = 0
        token_ids = self.encode(messages)
        room = min(self.settings.max_new_tokens, 64)  # keep at least this much room for the reply
        while context is not None and len(token_ids) + room > context and len(messages) > 1:
            messages = messages[2:] if messages[0]["role"] == "user" and len(messages) > 2 else messages[1:]
            dropped += 1
            token_ids = self.encode(messages)
        if context is not None and len(token_ids) >= context:
            raise UserError(f"the message is {len(token_ids)} tokens with the system prompt; the model's context "
                            f"is {context}")
        if dropped:
            self.messages = messages[:-1]
        return TurnPlan(token_ids, self.kept.reusable_length(token_ids), dropped)

    def reply(self, user_text: str, on_event=None, plan: TurnPlan | None = None) -> Reply:
        """Decode the assistant's reply to `user_text` and add both to the conversation.

        On Ctrl-C the partial reply is kept in the conversation and `engine.GenerationInterrupted` is raised.
        """
        plan = plan or self.plan(user_text)
        cache, plan.reused = self.kept.take(plan.token_ids)  # 0 if the cache had to start afresh
        try:
            (reply,) = engine.decode(self.loaded, [plan.token_ids[plan.reused:]], self.decode_plan(),
                                     on_event=on_event, cache=cache, past_length=plan.reused)
        except engine.GenerationInterrupted as stopped:
            self._record(plan, user_text, stopped.replies[0], cache)
            raise
        self._record(plan, user_text, reply, cache)
        return reply

    def _record(self, plan: TurnPlan, user_text: str, reply: Reply, cache) -> None:
        self.kept.keep(cache, plan.token_ids, reply.token_ids)
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply.text}]
