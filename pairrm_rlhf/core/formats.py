"""All text rendering: prompts, completions and conversations into each judge's (source, candidate) text.

PairRM (llm-blender's collator and `compare_conversations`): a plain prompt is the source as is; a conversation
is the fixed instruction sentence followed by `USER: {u}\\nAssistant: <Response k>` lines, and the candidate is
`<Response k>: {a}` lines. Literal `[SEP]` becomes a space. System messages are folded into the next user turn
as `{system}\\n\\n{user}` so that the instruction sentence stays exactly the trained one.

Rendered strings are `Rendered`: PairRM's text (so the PairRM engine sees exactly that), also carrying the prompt's
messages or the bare response, from which the other judges render their own formats here too: Better-PairRM as
reward-bench's `betterpairrm.py` does (`better_pairrm_source`), RLHFlow's context through transformers' chat-template
renderer with RLHFlow's plain template (`rlhflow_context`). Two `Rendered` strings are equal only when their text
and their origin are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Messages = tuple[tuple[str, str], ...]

CONVERSATION_INSTRUCTION = (  # the typo is part of the trained format
    "Finish the following coversation in each i-th turn by filling in <Response i> with your response."
)


# ---- input checks: name the argument and the index -------------------------------------------------
def check_texts(name: str, values: Any) -> list[str]:
    """`values` as a list of strings, or a TypeError/ValueError naming `name[i]`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(value).__name__}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"{name}[{i}] is not valid Unicode text ({err.reason} at {err.start})") from None
    return list(values)


def check_lengths(**named: Sequence) -> None:
    """All named sequences have the first one's length, or a ValueError naming both."""
    (first, reference), *rest = named.items()
    for name, values in rest:
        if len(values) != len(reference):
            raise ValueError(f"{name} has {len(values)} items but {first} has {len(reference)}")


# ---- a sampled response that knows whether it ended -----------------------------------------------------
class Response(str):
    """A sampled response's text that also says whether generation `finished` (ended with an EOS id or a stop
    string) rather than being cut at `max_new_tokens`. Plain strings (existing responses) count as finished."""

    finished: bool

    def __new__(cls, text: str, *, finished: bool = True) -> Response:
        obj = super().__new__(cls, text)
        obj.finished = bool(finished)
        return obj

    def __reduce__(self) -> tuple:
        return (_response, (str(self), self.finished))


def _response(text: str, finished: bool) -> Response:
    return Response(text, finished=finished)


def is_finished(response: Any) -> bool:
    """False only for a `Response` cut at the length limit."""
    return not isinstance(response, Response) or response.finished


# ---- rendered text that remembers where it came from -------------------------------------------------------
class Rendered(str):
    """A string (PairRM's rendering) that also carries the prompt `messages` or the bare `response` it came from."""

    messages: Messages | None
    response: str | None

    def __new__(cls, text: str, *, messages: Messages | None = None, response: str | None = None) -> Rendered:
        obj = super().__new__(cls, text)
        obj.messages, obj.response = messages, response
        return obj

    def __reduce__(self) -> tuple:
        return (_rebuild, (str(self), self.messages, self.response))

    # Equal only with the same text *and* origin: two conversations can share PairRM's text (or a last user turn)
    # and still render differently for the other judges, which look rendered strings up in dicts.
    def __eq__(self, other: object) -> bool:
        return (str.__eq__(self, other) is True and self.messages == getattr(other, "messages", None)
                and self.response == getattr(other, "response", None))

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = str.__hash__


def _rebuild(text: str, messages: Messages | None, response: str | None) -> Rendered:
    return Rendered(text, messages=messages, response=response)


def prompt_messages(source: str) -> Messages:
    """The (role, content) messages of a rendered source; a plain string is one user message."""
    messages = getattr(source, "messages", None)
    return messages if messages is not None else (("user", str(source)),)


def response_text(candidate: str) -> str:
    """The bare response of a rendered candidate (a plain string is already one)."""
    response = getattr(candidate, "response", None)
    return response if response is not None else str(candidate)


# ---- PairRM ------------------------------------------------------------------------------------------------
def pairrm_source(text: str, instruction: str | None = None) -> str:
    """PairRM's source: the instruction (if any) prepended with no separator; literal `[SEP]` becomes a space,
    as in the reference collator (both layouts)."""
    return ((instruction or "") + text).replace("[SEP]", " ")


def pairrm_candidate(text: str) -> str:
    """PairRM's candidate text: literal `[SEP]` becomes a space."""
    return text.replace("[SEP]", " ")


def conversation_lines(turns: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """PairRM's multi-turn (source body, candidate) for (user, assistant) turns, before the instruction."""
    source = "\n".join(f"USER: {u}\nAssistant: <Response {k + 1}>" for k, (u, _) in enumerate(turns))
    candidate = "\n".join(f"<Response {k + 1}>: {a}" for k, (_, a) in enumerate(turns))
    return source, candidate


CONVERSATION_FORMATS = ("pairrm", "plain")  # how `render` writes a single-turn conversation (see `render`)


def render(prompt: Any, completion: Any, *, name: str = "completion", conversation_format: str = "pairrm"
           ) -> tuple[str, str]:
    """PairRM's prepared (source, candidate) text for one prompt and one completion.

    Plain text: source = prompt, candidate = completion. Conversational (prompt is a list of messages, completion a
    string or a list of assistant messages): PairRM's multi-turn format, exactly as `PairRM.compare_conversations`
    renders it, with the prompt's own assistant turns (identical for every completion of that prompt) and then the
    completion as the last response. `conversation_format="plain"` renders a *single-turn* conversation (system
    messages and one user message) as plain text instead: source = the user text (a system message folded in as
    `{system}\n\n{user}`), candidate = the bare response, as SPPO's `scripts/rank.py` passes prompts and responses
    to llm-blender (see docs/labeling.md); multi-turn conversations keep the multi-turn format. Both strings are
    `Rendered` (see the module docstring).
    """
    if conversation_format not in CONVERSATION_FORMATS:
        raise ValueError(f"conversation_format must be one of {CONVERSATION_FORMATS}, got {conversation_format!r}")
    if isinstance(prompt, str):
        text = completion_text(name, completion)
        return pairrm_source(prompt), Rendered(pairrm_candidate(text), response=text)
    if isinstance(prompt, Sequence):
        turns = prompt_turns(f"{name} prompt", prompt)
        text = completion_text(name, completion)
        messages = tuple(
            (str(m.get("role", "")).lower(), content_text(f"{name} prompt[{i}]", m)) for i, m in enumerate(prompt))
        if conversation_format == "plain" and len(turns) == 1:
            return (Rendered(pairrm_source(turns[0][0]), messages=messages),
                    Rendered(pairrm_candidate(text), response=text))
        source, candidate = conversation_lines([(u, a) for u, a in turns[:-1]] + [(turns[-1][0], text)])
        return (
            Rendered(pairrm_source(source, CONVERSATION_INSTRUCTION), messages=messages),
            Rendered(pairrm_candidate(candidate), response=text),
        )
    raise TypeError(f"prompt of {name} must be a string or a list of messages, got {type(prompt).__name__}")


def content_text(name: str, message: Any) -> str:
    """A message's text content (a string, or a list of text parts joined by newlines)."""
    if not isinstance(message, dict):
        raise TypeError(f"{name} must be a message dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise TypeError(f"{name} content must be a string or a list of text parts")


def completion_text(name: str, completion: Any) -> str:
    """A completion's text: a string, or the joined contents of a list of assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        for i, message in enumerate(completion):
            if not isinstance(message, dict) or str(message.get("role", "")).lower() != "assistant":
                raise ValueError(f"{name}[{i}] must be an assistant message, got {message!r:.80}")
        return "\n".join(content_text(f"{name}[{i}]", m) for i, m in enumerate(completion))
    raise TypeError(f"{name} must be a string or a non-empty list of assistant messages, got {completion!r:.80}")


def prompt_turns(name: str, prompt: Sequence) -> list[tuple[str, str | None]]:
    """(user, assistant) turns of a prompt, system messages folded into the next user turn; the last turn is open
    (its assistant is None: the completion answers it)."""
    turns: list[list] = []
    system: list[str] = []
    for i, message in enumerate(prompt):
        text = content_text(f"{name}[{i}]", message)
        role = str(message.get("role", "")).lower()
        if role == "system":
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise ValueError(f"{name}[{i}] is a user message right after another user message")
            turns.append(["\n\n".join([*system, text]), None])
            system = []
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise ValueError(f"{name}[{i}] is an assistant message that does not answer a user message")
            turns[-1][1] = text
        else:
            raise ValueError(f"{name}[{i}] has role {message.get('role')!r}; expected system, user or assistant")
    if system:
        raise ValueError(f"{name} has a system message that no user message follows")
    if not turns or turns[-1][1] is not None:
        raise ValueError(f"{name} must end with a user message (the turn the completion answers)")
    return [(u, a) for u, a in turns]


def conversation_turns(name: str, conversation: Any) -> list[tuple[str, str]]:
    """(user, assistant) pairs of a whole conversation that alternates USER / ASSISTANT messages (any case)."""
    if isinstance(conversation, (str, dict)) or not isinstance(conversation, Sequence):
        raise TypeError(f"{name} must be a list of messages, got {type(conversation).__name__}")
    if not conversation or len(conversation) % 2:
        raise ValueError(f"{name} must have an even, non-zero number of messages (USER, ASSISTANT, ...)")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise TypeError(f"{name}[{i}] must be a dict with a string 'content'")
        expected = "USER" if i % 2 == 0 else "ASSISTANT"
        if str(message.get("role", "")).upper() != expected:
            raise ValueError(f"{name}[{i}] has role {message.get('role')!r}; expected {expected}")
    return [(conversation[i]["content"], conversation[i + 1]["content"]) for i in range(0, len(conversation), 2)]


def render_conversations(
    conversations_a: Sequence[Sequence[dict]], conversations_b: Sequence[Sequence[dict]]
) -> tuple[list[str], list[str], list[str]]:
    """Validate two lists of conversations and render them in PairRM's multi-turn format (before the instruction)."""
    if isinstance(conversations_a, (str, dict)) or not isinstance(conversations_a, Sequence):
        raise TypeError("conversations_a must be a list of conversations (lists of messages)")
    if isinstance(conversations_b, (str, dict)) or not isinstance(conversations_b, Sequence):
        raise TypeError("conversations_b must be a list of conversations (lists of messages)")
    check_lengths(conversations_a=conversations_a, conversations_b=conversations_b)
    inputs, cands_a, cands_b = [], [], []
    for k, (conv_a, conv_b) in enumerate(zip(conversations_a, conversations_b)):
        turns_a = conversation_turns(f"conversations_a[{k}]", conv_a)
        turns_b = conversation_turns(f"conversations_b[{k}]", conv_b)
        if len(turns_a) != len(turns_b):
            raise ValueError(
                f"conversations_a[{k}] has {len(turns_a)} turns but conversations_b[{k}] has {len(turns_b)}")
        for t, ((user_a, _), (user_b, _)) in enumerate(zip(turns_a, turns_b)):
            if user_a != user_b:
                raise ValueError(f"USER turn {t} of conversations_a[{k}] and conversations_b[{k}] differ")
        source, cand_a = conversation_lines(turns_a)
        inputs.append(source)
        cands_a.append(cand_a)
        cands_b.append(conversation_lines(turns_b)[1])
    return inputs, cands_a, cands_b


def conversation_history(turns: Sequence[tuple[str, str]]) -> Rendered:
    """A conversation's context up to its last user turn, as a `Rendered` source (the other judges' input)."""
    messages = tuple(m for u, a in turns[:-1] for m in (("user", u), ("assistant", a))) + (("user", turns[-1][0]),)
    return Rendered(turns[-1][0], messages=messages)


def conversation_sides(turns_a: Sequence[tuple[str, str]], turns_b: Sequence[tuple[str, str]]) -> tuple:
    """(x_A, x_B, last answer A, last answer B): each conversation's own history and its last answer."""
    return conversation_history(turns_a), conversation_history(turns_b), turns_a[-1][1], turns_b[-1][1]


def conversation_triples(conversations_a: Sequence[Sequence[dict]], conversations_b: Sequence[Sequence[dict]]) -> list:
    """(context, last answer A, last answer B) for judges other than PairRM; the histories must be identical."""
    triples = []
    for k, (conv_a, conv_b) in enumerate(zip(conversations_a, conversations_b)):
        turns_a = conversation_turns(f"conversations_a[{k}]", conv_a)
        turns_b = conversation_turns(f"conversations_b[{k}]", conv_b)
        if turns_a[:-1] != turns_b[:-1] or turns_a[-1][0] != turns_b[-1][0]:
            raise ValueError(
                f"conversations_a[{k}] and conversations_b[{k}] differ before their last answer; this judge compares "
                "one pair of answers in a shared context (PairRM and Better-PairRM compare whole conversations)"
            )
        triples.append((conversation_history(turns_a), turns_a[-1][1], turns_b[-1][1]))
    return triples


# ---- Better-PairRM -------------------------------------------------------------------------------------------
BETTER_PAIRRM_ROLES = {"system": "SYSTEM MESSAGE", "user": "USER", "assistant": "ASSISTANT"}
BETTER_PAIRRM_SEPARATOR = "\n    \n    "  # what reward-bench's indented template emits after every message


def better_pairrm_source(source: str) -> str:
    """Better-PairRM's source text: the prompt's messages as reward-bench's `BETTER_PAIRRM_TEMPLATE` renders them
    with `add_generation_prompt=True` (allenai/reward-bench, `rewardbench/models/betterpairrm.py`).

    Each message is `{ROLE}: {content.strip()}` followed by the separator `"\\n    \\n    "` (the template is an
    indented string rendered by a plain `jinja2.Environment`, so its indentation is part of the output), and the
    source ends in `ASSISTANT: ` unless the last message is an assistant one. A plain-string prompt is one USER
    turn, as reward-bench's dataset loader wraps it. Roles: SYSTEM MESSAGE / USER / ASSISTANT.
    """
    messages = prompt_messages(source)
    text = "".join(
        f"{BETTER_PAIRRM_ROLES[role]}: {content.strip()}{BETTER_PAIRRM_SEPARATOR}" for role, content in messages)
    return text if messages and messages[-1][0] == "assistant" else text + "ASSISTANT: "


# ---- RLHFlow -------------------------------------------------------------------------------------------------
RLHFLOW_PROMPT = "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \n"
# The "plain" chat template of RLHFlow/RLHF-Reward-Modeling (`pair-pm/README.md`, `pair-pm/process_pair_data.py`;
# also reward-bench's `rewardbench/models/slicpairpm.py`): turns alternate by position, whatever their role.
RLHFLOW_PLAIN_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)


def rlhflow_context_messages(source: str) -> list[dict[str, str]]:
    """The context's messages for RLHFlow's plain template: the prompt's turns, each system message folded into the
    next user message as `{system}\\n\\n{user}` (the plain template alternates by position and has no system role)."""
    messages: list[dict[str, str]] = []
    system: list[str] = []
    for role, content in prompt_messages(source):
        if role == "system":
            system.append(content)
        else:
            messages.append({"role": role, "content": "\n\n".join([*system, content]) if role == "user" else content})
            system = []
    return messages


def rlhflow_context(tokenizer: Any, source: str) -> str:
    """RLHFlow's context text, rendered by transformers' own chat-template engine (`apply_chat_template` with the
    plain template): transformers renders with `trim_blocks` and `lstrip_blocks`, and jinja drops the template's
    final newline, so `[Hi, Hello, Q2?]` gives
    `'\\n\\n<turn> user\\n Hi\\n<turn> assistant\\n Hello\\n<turn> user\\n Q2?\\n'`."""
    return tokenizer.apply_chat_template(
        rlhflow_context_messages(source), chat_template=RLHFLOW_PLAIN_TEMPLATE, tokenize=False
    )


def check_candidates(name: str, candidates: Any, n_inputs: int, same_count: bool = True) -> list[list[str]]:
    """Each input's list of candidate strings, or an error naming `name[i]`."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"{name} must be a list of lists of strings, got {type(candidates).__name__}")
    if len(candidates) != n_inputs:
        raise ValueError(f"{name} has {len(candidates)} items but inputs has {n_inputs}")
    checked = [check_texts(f"{name}[{i}]", c) for i, c in enumerate(candidates)]
    for i, c in enumerate(checked):
        if not c:
            raise ValueError(f"{name}[{i}] is empty: each input needs at least one candidate")
        if same_count and len(c) != len(checked[0]):
            raise ValueError(f"{name}[{i}] has {len(c)} candidates but {name}[0] has {len(checked[0])}")
    return checked

