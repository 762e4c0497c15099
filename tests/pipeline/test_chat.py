"""`llava-pipeline chat`: one-shot answers and an interactive session driven through stdin, in a subprocess, checked
against the same conversation run in-process."""
import os
import re
import subprocess
import sys
from pathlib import Path

from llava.generate import GenerationConfig
from pipeline.chat import ChatSession
from llava.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 10


def _chat(args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)


def _session(model_dir, image):
    loaded = load_model(model_dir, device="cpu")
    config = GenerationConfig(max_new_tokens=MAX_NEW, stop_token_ids=loaded.stop_token_ids)
    return ChatSession(loaded, image, config)


def test_one_shot_prints_the_answer_and_exits(tiny_model_dir, image_folder):
    image = image_folder / "red.png"
    expected = _session(tiny_model_dir, image).ask("What color is the shape?")
    result = _chat(["--model", str(tiny_model_dir), "--image", str(image), "--prompt", "What color is the shape?",
                    "--temperature", "0", "--max-new-tokens", str(MAX_NEW)])
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_interactive_session_through_stdin(tiny_model_dir, image_folder):
    red, blue = image_folder / "red.png", image_folder / "blue.png"
    session = _session(tiny_model_dir, red)
    first = session.ask("What is in the image?")
    second = session.ask("And its color?")  # multi-turn: sees the first exchange
    session.set_image(blue)
    third = session.ask("What is in the image?")
    session.reset()
    fourth = session.ask("Describe it.")
    stdin = "\n".join(["What is in the image?", "And its color?", f"/image {blue}", "What is in the image?",
                       "/image /no/such/file.png", "/reset", "Describe it.", "/help", "/exit",
                       "never asked"]) + "\n"
    result = _chat(["--model", str(tiny_model_dir), "--image", str(red), "--temperature", "0",
                    "--max-new-tokens", str(MAX_NEW)], stdin)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # a random model's answers can hold any character, so cut them out by the prompts around them
    answers = [a.strip() for a in re.findall(r"ASSISTANT: (.*?)\nUSER: ", out, flags=re.DOTALL)]
    assert answers == [first, second, third, fourth]
    assert f"(image: {blue}; new conversation)" in out
    assert "(cannot use that image:" in out and "(conversation cleared)" in out
    assert "never asked" not in out


def test_end_of_input_quits_cleanly(tiny_model_dir):
    result = _chat(["--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "4"], "hello\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ASSISTANT: ") == 1 and "text only" in result.stdout


def test_bad_model_dir_is_a_clear_error(tmp_path):
    result = _chat(["--model", str(tmp_path / "missing"), "--prompt", "hi"])
    assert result.returncode == 2 and "model directory not found" in result.stderr
