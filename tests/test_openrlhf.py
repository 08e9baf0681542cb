"""OpenRLHF as a client: a client that behaves like OpenRLHF v0.11's (`openrlhf/utils/agent.py`,
`SingleTurnAgentExecutor`: one sample per request, `{"query", "prompts", "labels"}`, query = decode(prompt ids, cut
from the left to fit, + response ids), no auth header, the token in the URL, reads `scores` else `rewards`, and
`extra_logs`) gets the in-process `PairwiseReward` numbers, also for a left-truncated prompt."""

import asyncio

import httpx2
import numpy as np
import pytest
from transformers import AutoTokenizer

from pairrm_rlhf import PairwiseReward
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.serve import BackgroundServer, ServeArguments
from pairrm_rlhf.serve.openrlhf import MIN_OVERLAP, QueryParser, prompt_end

TOKEN = "rm-secret"
SYSTEM = {"role": "system", "content": "You are kind."}
SAMPLES = [  # (messages, response, label = the reference), the last one's prompt is cut from the left
    ([{"role": "user", "content": "Explain the sun."}], "It is a hot star.", "The sun is a star."),
    ([SYSTEM, {"role": "user", "content": "Describe the ocean."}], "Water, mostly salty.", "The ocean is big."),
    (
        [
            SYSTEM,
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me about green tea and why people like to drink it so much."},
        ],
        "It is a drink made from leaves.",
        "Green tea is a drink.",
    ),
]
MAX_PROMPT_TOKENS = [None, None, 30]


class OpenRLHFLikeClient:
    """What OpenRLHF v0.11 does around a remote reward model, for one sample per request (the HTTP part of
    `SingleTurnAgentExecutor.execute` and `_fetch_rewards_via_http`: five tries, 1 s apart)."""

    def __init__(self, url, tokenizer):
        self.url, self.tokenizer = url, tokenizer

    async def reward(self, http, prompt, response, label, max_prompt_tokens=None):
        prompt_ids = self.tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
            prompt_ids = prompt_ids[-max_prompt_tokens:]  # `prompt_token_ids[-max_prompt_length:]`
        action_ids = self.tokenizer(text=response + self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        query = self.tokenizer.decode(prompt_ids + action_ids, skip_special_tokens=False)
        payload = {"query": [query], "prompts": [prompt], "labels": [label]}
        for _ in range(5):
            try:
                answer = await http.post(self.url, json=payload)
                answer.raise_for_status()
                info = answer.json()
                break
            except httpx2.HTTPError:
                await asyncio.sleep(1)
        else:
            raise RuntimeError("Request error for 5 times")
        score = info.get("scores")
        if score is None:
            score = info.get("rewards")
        return {
            "query": query,
            "reward": info.get("rewards"),
            "scores": score,
            "extra_logs": info.get("extra_logs") or {},
        }

    async def run(self, samples, limits):
        async with httpx2.AsyncClient(timeout=180) as http:  # no auth header
            return await asyncio.gather(
                *(self.reward(http, p, r, label, k) for (p, r, label), k in zip(samples, limits))
            )


def test_openrlhf_v011_client_gets_the_in_process_rewards(hf_model):
    tokenizer = AutoTokenizer.from_pretrained(bundled("policy"))  # a ChatML policy tokenizer, as OpenRLHF's actor's
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _, _ in SAMPLES]
    samples = [(p, r, label) for p, (_, r, label) in zip(prompts, SAMPLES)]
    config = ServeArguments(port=0, token=TOKEN, labels_as_reference=True, max_wait_ms=2)
    with BackgroundServer(config, hf_model) as server:
        assert httpx2.post(server.url + "/get_reward", json={"query": ["x"]}).status_code == 401  # no token, no reward
        client = OpenRLHFLikeClient(f"{server.url}/get_reward?token={TOKEN}", tokenizer)
        results = asyncio.run(client.run(samples, MAX_PROMPT_TOKENS))
    assert not results[2]["query"].startswith(prompts[2])  # the prompt really was cut from the left
    assert "Hello! How can I help?" not in results[2]["query"]
    # What the server sees is the rendered prompt: the policy's template adds its default system message (as Qwen2.5's
    # does) when a conversation has none, so the in-process reference scores that conversation.
    default = {"role": "system", "content": "You are a helpful assistant."}
    assert all(default["content"] in p for p, (m, _, _) in zip(prompts, SAMPLES) if m[0]["role"] != "system")
    messages = [m if m[0]["role"] == "system" else [default, *m] for m, _, _ in SAMPLES]
    responses = [r for _, r, _ in SAMPLES]
    references = [label for _, _, label in SAMPLES]
    want = PairwiseReward(hf_model)(messages, responses, reference=references)
    logits = PairwiseReward(hf_model, output="logit")(messages, responses, reference=references)
    for k, result in enumerate(results):
        assert len(result["reward"]) == len(result["scores"]) == 1  # one sample per request, lists like serve_rm.py
        np.testing.assert_allclose(result["scores"], [want[k]], atol=1e-5)
        np.testing.assert_allclose(result["reward"], [want[k]], atol=1e-5)
        np.testing.assert_allclose(
            result["extra_logs"]["pairrm_logit"], [logits[k]], atol=1e-5 * max(1.0, abs(logits[k]))
        )


def test_prompt_end():
    prompt = "<|im_start|>user\nTell me about green tea.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_end(prompt + "Yes.", prompt) == len(prompt)
    cut = prompt[20:]
    assert prompt_end(cut + "Yes.", prompt) == len(cut)
    assert prompt_end("\ufffd" + cut + "Yes.", prompt) == 1 + len(cut)  # a token cut inside a UTF-8 character
    assert prompt_end(prompt[-MIN_OVERLAP:] + "Yes.", prompt) == MIN_OVERLAP
    assert prompt_end(prompt[-(MIN_OVERLAP - 1) :] + "Yes.", prompt) is None  # too short to trust
    assert prompt_end("Something else.", prompt) is None
    assert prompt_end("a" * 20 + "b", "x" + "a" * 20) == 20  # the longest overlap, not a shorter partial match


def test_split_falls_back_to_the_assistant_header_when_the_prompt_is_not_found():
    parser = QueryParser()
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # the prompt's text differs from what the query holds (e.g. a tokenizer that does not round-trip)
    query = "<|im_start|>user\nHI<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"
    assert parser.split("query[0]", query, prompt) == ([{"role": "user", "content": "Hi"}], "Hello.")
    with pytest.raises(ValueError, match="query.0. neither starts with its prompt"):
        QueryParser(chat_format="plain").split("query[0]", "Q: hi A: yo", "Q: hello A:")
