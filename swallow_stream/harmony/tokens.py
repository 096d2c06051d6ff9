"""Harmony's token ids and vocabulary sizes (o200k_harmony): the one place they are defined."""

from __future__ import annotations

# o200k_base has 199998 mergeable tokens (ids 0..199997); o200k_harmony puts specials at
# 199998..201087, so the model's embedding/lm_head has 201088 rows.
N_ORDINARY = 199998
VOCAB_SIZE = 201088

TOKEN_STARTOFTEXT = 199998
TOKEN_ENDOFTEXT = 199999
TOKEN_RETURN = 200002
TOKEN_CONSTRAIN = 200003
TOKEN_CHANNEL = 200005
TOKEN_START = 200006
TOKEN_END = 200007
TOKEN_MESSAGE = 200008
TOKEN_CALL = 200012

# Generation ends on these: a final answer (`<|return|>`) or a tool call (`<|call|>`). Never on
# `<|end|>`, which closes the analysis message before the final one.
STOP_TOKEN_IDS = frozenset({TOKEN_RETURN, TOKEN_CALL})

# Names as openai_harmony 0.0.8 decodes them. 200018 is `<|endofprompt|>` in tiktoken's
# o200k_base but `<|reserved_200018|>` in harmony (and tiktoken's o200k_harmony maps both names
# to it); harmony is what renders prompts, so its name wins.
NAMED_SPECIALS = {
    TOKEN_STARTOFTEXT: "<|startoftext|>",
    TOKEN_ENDOFTEXT: "<|endoftext|>",
    TOKEN_RETURN: "<|return|>",
    TOKEN_CONSTRAIN: "<|constrain|>",
    TOKEN_CHANNEL: "<|channel|>",
    TOKEN_START: "<|start|>",
    TOKEN_END: "<|end|>",
    TOKEN_MESSAGE: "<|message|>",
    TOKEN_CALL: "<|call|>",
}


def special_name(token_id: int) -> str:
    return NAMED_SPECIALS.get(token_id) or f"<|reserved_{token_id}|>"


# Channels whose text is the answer: the final message, and commentary with no recipient (a
# preamble; tool calls are not supported, so commentary never carries one), as vLLM reports them.
ANSWER_CHANNELS = ("final", "commentary")
