"""`llava-pipeline serve` answered by the real `openai` client: plain, image, multi-turn and streaming requests give
what `llava-pipeline chat` gives for the same conversation, and a burst of concurrent requests (batched) gives what
the same requests get one at a time."""
import asyncio
import http.client
import json
from urllib.parse import urlsplit

import openai
import pytest
from serve_helpers import data_url

from llava.conversation import get_template, tokenize_conversation
from llava.generate import GenerationConfig
from pipeline.chat import ChatSession
from pipeline.serve import Prompter
from pipeline.serve_requests import ImageLimits, parse_chat_request

MAX_NEW = 12


@pytest.fixture(scope="module")
def server(serve, image_folder):
    with serve(image_limits=ImageLimits(folder=image_folder)) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _session(loaded, image):
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=loaded.stop_token_ids)
    return ChatSession(loaded, image, config)


def _ask(client, messages, **options):
    options = {"temperature": 0, "max_tokens": MAX_NEW, **options}
    return client.chat.completions.create(model="tiny", messages=messages, **options)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    connection = http.client.HTTPConnection(urlsplit(server[0]).netloc, timeout=30)
    connection.request("GET", "/health")
    health = json.loads(connection.getresponse().read())
    assert health["status"] == "ok" and health["model"] == "tiny" and health["max_batch"] == 16


def test_plain_request_answers_as_chat_does(client, loaded):
    expected = _session(loaded, None).ask("What color is the circle?")
    reply = _ask(client, [{"role": "user", "content": "What color is the circle?"}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip() == expected
    prompt_ids = tokenize_conversation([{"from": "human", "value": "What color is the circle?"}], loaded.tokenizer,
                                       loaded.template, add_generation_prompt=True)[0]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason == ("length" if reply.usage.completion_tokens == MAX_NEW else "stop")


@pytest.mark.parametrize("how", ["data_url", "folder_path"])
def test_image_request_answers_as_chat_does(client, loaded, image_folder, how):
    image = image_folder / "red.png"
    expected = _session(loaded, image).ask("What is in the image?")
    url = data_url(image) if how == "data_url" else "red.png"
    reply = _ask(client, [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
                                                       {"type": "image_url", "image_url": {"url": url}}]}])
    assert reply.choices[0].message.content.strip() == expected
    n_text = len(tokenize_conversation([{"from": "human", "value": "<image>\nWhat is in the image?"}],
                                       loaded.tokenizer, loaded.template, add_generation_prompt=True)[0])
    assert reply.usage.prompt_tokens == n_text - 1 + loaded.model.num_image_tokens  # the tag becomes the patches


def test_multi_turn_renders_the_prompt_chat_renders(client, loaded, image_folder):
    image = image_folder / "mixed.png"
    session = _session(loaded, image)
    first = session.ask("Describe the image.")
    second = session.ask("And the colors?")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And the colors?"}]
    chat = parse_chat_request({"model": "tiny", "messages": messages})
    chat_prompt = session.turns[:3]  # what chat rendered for its second question
    template = get_template(loaded.template)
    assert template.render(chat.conversation, add_generation_prompt=True) == \
        template.render(chat_prompt, add_generation_prompt=True)
    ids = Prompter(loaded, ImageLimits()).prepare(chat)[0]
    assert ids == tokenize_conversation(chat_prompt, loaded.tokenizer, loaded.template, add_generation_prompt=True)[0]
    assert _ask(client, messages).choices[0].message.content.strip() == second


def test_system_message_replaces_the_template_system_prompt(loaded):
    chat = parse_chat_request({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"}]})
    template = Prompter(loaded, ImageLimits()).template(chat.system)
    assert template.render(chat.conversation, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"


def test_streaming_sends_openai_chunks(client, server, image_folder):
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"},
                                             {"type": "image_url", "image_url": {"url": data_url(image_folder /
                                                                                                 "red.png")}}]}]
    whole = _ask(client, messages)
    chunks = list(_ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    deltas = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(deltas) > 1 and all(deltas)  # text arrives piece by piece
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1

    # the wire format itself: `data: {json}` events and the closing `data: [DONE]`
    connection = http.client.HTTPConnection(urlsplit(server[0]).netloc, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "tiny", "messages": messages, "stream": True, "max_tokens": 3, "temperature": 0}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_end_the_answer_before_them(client):
    messages = [{"role": "user", "content": "How many shapes are there?"}]
    free = _ask(client, messages, max_tokens=20).choices[0].message.content
    # two characters from the second half; not U+FFFD, which also stands for a byte sequence still being decoded
    stop = next(free[i:i + 2] for i in range(len(free) // 2, len(free) - 1)
                if free[i:i + 2].strip() and "\ufffd" not in free[i:i + 2])
    cut = _ask(client, messages, max_tokens=20, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[:free.index(stop)]


def test_seeded_sampling_repeats(client):
    messages = [{"role": "user", "content": "Is there a blue square?"}]
    answers = {_ask(client, messages, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)}
    assert len(answers) == 1


def test_concurrent_burst_equals_one_by_one(server, image_folder):
    """Batching must not change answers: 8 concurrent requests (mixed lengths, images, a seeded sampled one) give
    exactly what each gets alone."""
    url, app = server
    red, mixed = data_url(image_folder / "red.png"), data_url(image_folder / "mixed.png")
    questions = ["What color is the circle?", "How many shapes are there?", "Is there a blue square?", "hello",
                 "Describe the image in detail please.", "Where is the red circle?", "What is this?", "Count them."]
    requests = []
    for i, question in enumerate(questions):
        content = question if i % 3 == 0 else [{"type": "image_url", "image_url": {"url": red if i % 2 else mixed}},
                                               {"type": "text", "text": question}]
        options = {"temperature": 0.0, "max_tokens": 6 + 3 * i}
        if i == 5:
            options = {"temperature": 0.8, "top_p": 0.9, "seed": 3, "max_tokens": 15}
        requests.append(({"role": "user", "content": content}, options))

    async def ask(client, message, options):
        reply = await client.chat.completions.create(model="tiny", messages=[message], **options)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        alone = [await ask(client, m, o) for m, o in requests]
        together = await asyncio.gather(*(ask(client, m, o) for m, o in requests))
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert app.state.engine.peak_running > 1  # they really shared forward passes
