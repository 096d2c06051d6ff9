"""The in-process engine as a Backend: harmony prompts in, token ids split into channels out."""

from __future__ import annotations

from ..engine import LLMEngine, SequenceOutput
from ..harmony import HarmonyStreamParser, get_tokenizer, render_messages
from ..request import GenerateRequest
from ..stream import ChannelSource, Finished, QueueChannel, TokenEvent


class LocalSource(ChannelSource):
    """One request on the engine. The engine thread puts SequenceOutputs on the channel; the
    consumer turns them into events (harmony parsing stays off the engine thread)."""

    def __init__(self, engine: LLMEngine, prompt_token_ids: list[int], request: GenerateRequest, channel: QueueChannel):
        self._seq = None
        super().__init__(channel, engine.name, prompt_token_ids)
        if engine.inline:
            channel.pump = engine.pump
        self._engine = engine
        self._parser = HarmonyStreamParser(get_tokenizer())
        self._seq = engine.submit(prompt_token_ids, request.params, channel.sink, request.id, request.cache_salt)

    def _convert(self, outs: list[SequenceOutput]) -> list[TokenEvent | Finished]:
        items: list[TokenEvent | Finished] = []
        feed = self._parser.feed
        for out in outs:
            lps, tops = out.logprobs, out.top_logprobs
            for i, tid in enumerate(out.token_ids):
                _, text, channel, special = feed(tid)
                items.append(TokenEvent(text, channel, tid, special, lps[i] if lps else None, tops[i] if tops else None))
            if out.finish_reason is not None:
                parser = self._parser
                tail = parser.flush()
                if tail:
                    items.append(TokenEvent(tail, parser.channel, None))
                items.append(Finished(out.finish_reason, out.error, out.num_cached_tokens))
        return items

    def cancel(self) -> None:
        if self._seq is not None:
            self._engine.cancel(self._seq)


class LocalBackend:
    kind = "local"

    def __init__(self, engine: LLMEngine, is_tiny: bool = False):
        self.engine = engine
        self.name = engine.name
        self.generation = engine.generation
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.engine_config.max_num_seqs
        self.max_queued_requests = engine.engine_config.max_queued_requests
        self.is_tiny = is_tiny

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def open(self, request: GenerateRequest, channel: QueueChannel) -> LocalSource:
        ids = render_messages(request.messages, reasoning_effort=request.reasoning_effort, system=request.system)
        return LocalSource(self.engine, ids, request, channel)

    def stats(self) -> dict:
        return self.engine.snapshot()

    def describe(self) -> dict:
        c = self.engine.engine_config
        return {"backend": self.kind, "model": self.name, "is_tiny": self.is_tiny, "device": str(c.device),
                "dtype": str(c.dtype).removeprefix("torch."), "ops": c.ops, "max_model_len": self.max_model_len}

    def shutdown(self) -> None:
        self.engine.shutdown()
