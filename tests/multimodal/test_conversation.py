"""Templates render LLaVA's reference strings byte for byte; labels supervise exactly the answers (+ eos)."""
import pytest

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import (ConversationError, get_template, normalize_image_tags, token_lengths,
                                tokenize_conversation)

SYS_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
SYS_LLAVA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the human's questions.")
SYS_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
               "the user provides, and assist the user with a variety of tasks using natural language.")


def conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


ONE = conv("What is in the image?\n<image>", "A cat is sitting on a red mat.")  # tag after the text: moved to front
ONE_TEXT = conv("What is in the image?", "A cat is sitting on a red mat.")
THREE = conv("<image>\nWhat is in the image?", "A cat.", "What colour is the mat?", "It is red.",
             "Is it sleeping?", "No, it is awake.")
THREE_TEXT = conv("What is in the image?", "A cat.", "What colour is the mat?", "It is red.",
                  "Is it sleeping?", "No, it is awake.")

# Written by hand from LLaVA's Conversation.get_prompt (SeparatorStyle.TWO: system + " ", "ROLE: msg" + sep/sep2).
EXPECTED = {
    ("vicuna_v1", "one"): SYS_VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: "
                          "A cat is sitting on a red mat.</s>",
    ("vicuna_v1", "one_text"): SYS_VICUNA + " USER: What is in the image? ASSISTANT: "
                               "A cat is sitting on a red mat.</s>",
    ("vicuna_v1", "three"): SYS_VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                            "USER: What colour is the mat? ASSISTANT: It is red.</s>"
                            "USER: Is it sleeping? ASSISTANT: No, it is awake.</s>",
    ("vicuna_v1", "three_text"): SYS_VICUNA + " USER: What is in the image? ASSISTANT: A cat.</s>"
                                 "USER: What colour is the mat? ASSISTANT: It is red.</s>"
                                 "USER: Is it sleeping? ASSISTANT: No, it is awake.</s>",
    ("llava_v1", "one"): SYS_LLAVA + " USER: <image>\nWhat is in the image? ASSISTANT: "
                         "A cat is sitting on a red mat.</s>",
    ("llava_v1", "one_text"): SYS_LLAVA + " USER: What is in the image? ASSISTANT: A cat is sitting on a red mat.</s>",
    ("llava_v1", "three"): SYS_LLAVA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                           "USER: What colour is the mat? ASSISTANT: It is red.</s>"
                           "USER: Is it sleeping? ASSISTANT: No, it is awake.</s>",
    ("llava_v1", "three_text"): SYS_LLAVA + " USER: What is in the image? ASSISTANT: A cat.</s>"
                                "USER: What colour is the mat? ASSISTANT: It is red.</s>"
                                "USER: Is it sleeping? ASSISTANT: No, it is awake.</s>",
    # SeparatorStyle.LLAMA_2 of conv_llava_llama_2: "<s>[INST] msg [/INST]" / " answer </s>", leading "<s>" stripped.
    ("llama_2", "one"): "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] "
                        "A cat is sitting on a red mat. </s>",
    ("llama_2", "one_text"): "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\nWhat is in the image? [/INST] "
                             "A cat is sitting on a red mat. </s>",
    ("llama_2", "three"): "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] "
                          "A cat. </s><s>[INST] What colour is the mat? [/INST] It is red. </s>"
                          "<s>[INST] Is it sleeping? [/INST] No, it is awake. </s>",
    ("llama_2", "three_text"): "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\nWhat is in the image? [/INST] "
                               "A cat. </s><s>[INST] What colour is the mat? [/INST] It is red. </s>"
                               "<s>[INST] Is it sleeping? [/INST] No, it is awake. </s>",
}
SAMPLES = {"one": ONE, "one_text": ONE_TEXT, "three": THREE, "three_text": THREE_TEXT}


@pytest.mark.parametrize("template,sample", sorted(EXPECTED))
def test_render_matches_reference(template, sample):
    assert get_template(template).render(SAMPLES[sample]) == EXPECTED[(template, sample)]


@pytest.mark.parametrize("template,expected", [
    ("vicuna_v1", SYS_VICUNA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                  "USER: What colour is the mat? ASSISTANT:"),
    ("llava_v1", SYS_LLAVA + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>"
                 "USER: What colour is the mat? ASSISTANT:"),
    ("llama_2", "[INST] <<SYS>>\n" + SYS_LLAMA_2 + "\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST] A cat. </s>"
                "<s>[INST] What colour is the mat? [/INST]"),
])
def test_generation_prompt(template, expected):
    assert get_template(template).render(THREE[:3], add_generation_prompt=True) == expected


def test_plain_renders_image_then_caption():
    # preprocess_plain: the question is replaced by the image tag; caption + "\n" follows.
    assert get_template("plain").render(ONE) == "<image>A cat is sitting on a red mat.\n"
    assert get_template("plain").render(ONE[:1], add_generation_prompt=True) == "<image>"


def test_image_tag_moves_to_front_of_its_turn():
    turns = normalize_image_tags(conv("Look: <image> what is this?  ", "A dog."))
    assert turns[0]["value"] == "<image>\nLook:  what is this?"
    assert normalize_image_tags(conv("<image>", "x"))[0]["value"] == "<image>"


def supervised_runs(ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(label)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llama_2"])
@pytest.mark.parametrize("sample", [ONE, THREE, THREE_TEXT])
def test_labels_supervise_exactly_answers_and_eos(tokenizer, template, sample):
    ids, labels = tokenize_conversation(sample, tokenizer, template)
    answers = [t["value"] for t in sample if t["from"] == "gpt"]
    runs = supervised_runs(ids, labels)
    assert len(runs) == len(answers)
    suffix = " " if template == "llama_2" else ""  # llama_2 answers are rendered " answer </s>"
    for run, answer in zip(runs, answers):
        assert run[-1] == tokenizer.eos_id
        assert tokenizer.decode(run[:-1]) == answer + suffix
    assert ids[0] == tokenizer.bos_id
    assert ids.count(IMAGE_TOKEN_INDEX) == sum(t["value"].count("<image>") for t in sample)
    assert ids.count(tokenizer.eos_id) == len(answers)
    if template == "llama_2":  # every round after the first starts with a bos id, never supervised
        assert ids.count(tokenizer.bos_id) == len(answers)


def test_plain_labels_supervise_caption_and_newline(tokenizer):
    ids, labels = tokenize_conversation(ONE, tokenizer, "plain")
    assert ids[:2] == [tokenizer.bos_id, IMAGE_TOKEN_INDEX] and labels[:2] == [IGNORE_INDEX] * 2
    assert supervised_runs(ids, labels) == [ids[2:]]
    assert tokenizer.decode(ids[2:]) == "A cat is sitting on a red mat.\n"


def test_token_ids_follow_llava_chunking(tokenizer):
    # tokenizer_image_token: encode the text between <image> tags chunk by chunk; eos is an id, not the text "</s>".
    ids, _ = tokenize_conversation(ONE, tokenizer, "vicuna_v1")
    enc = tokenizer.encode
    assert ids == ([tokenizer.bos_id] + enc(SYS_VICUNA + " USER: ") + [IMAGE_TOKEN_INDEX]
                   + enc("\nWhat is in the image? ASSISTANT:") + enc("A cat is sitting on a red mat.")
                   + [tokenizer.eos_id])


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "llama_2"])
def test_batched_lengths_equal_tokenized_lengths(tokenizer, template):
    samples = [ONE, conv("<image>\nDescribe it.", "Two dogs play in the park.")]
    if template != "plain":
        samples.append(THREE_TEXT)
    assert token_lengths(samples, tokenizer, template) == [
        len(tokenize_conversation(s, tokenizer, template)[0]) for s in samples]


def test_max_len_cuts_ids_and_labels_together(tokenizer):
    ids, labels = tokenize_conversation(THREE, tokenizer, "vicuna_v1", max_len=10)
    full_ids, full_labels = tokenize_conversation(THREE, tokenizer, "vicuna_v1")
    assert (ids, labels) == (full_ids[:10], full_labels[:10])


def test_generation_prompt_tokens_continue_the_training_tokens(tokenizer):
    ids, labels = tokenize_conversation(THREE[:3], tokenizer, "vicuna_v1", add_generation_prompt=True)
    full_ids, _ = tokenize_conversation(THREE[:4], tokenizer, "vicuna_v1")
    assert full_ids[:len(ids)] == ids  # the answer's tokens follow the prompt's unchanged
    answer_start = len(ids)
    assert tokenizer.decode(full_ids[answer_start:-1]) == "It is red."
    assert labels[-3:] == [IGNORE_INDEX] * 3


def test_unknown_template_lists_valid_names():
    with pytest.raises(KeyError, match="plain, vicuna_v1, llava_v1, llama_2"):
        get_template("vicuna")


@pytest.mark.parametrize("turns,message", [
    (conv("hi", "hello")[::-1], "turn 0 is from 'gpt' but 'human' was expected"),
    (conv("hi", "hello", "more?"), "last turn is a human turn with no answer"),
    (conv("hi"), "no assistant"),
    ([{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}], "valid roles are 'human' and 'gpt'"),
    (conv("hi", ""), "empty"),
    ([], "non-empty list"),
])
def test_bad_conversations_name_the_sample(tokenizer, turns, message):
    with pytest.raises(ConversationError, match="sample 'abc-7'") as info:
        tokenize_conversation(turns, tokenizer, "vicuna_v1", sample_id="abc-7")
    assert message in str(info.value)


def test_plain_rejects_multi_turn_and_missing_image(tokenizer):
    with pytest.raises(ConversationError, match="one \\(image, caption\\) pair"):
        tokenize_conversation(THREE, tokenizer, "plain")
    with pytest.raises(ConversationError, match="needs an <image>"):
        tokenize_conversation(ONE_TEXT, tokenizer, "plain")


def test_generation_prompt_needs_a_final_question():
    with pytest.raises(ConversationError, match="end with a human turn"):
        get_template("vicuna_v1").render(ONE, add_generation_prompt=True)
