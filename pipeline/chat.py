"""`llava-pipeline chat`: talk to a trained model about an image.

`--prompt TEXT` answers once and exits. Without it, an interactive multi-turn chat: the answer streams as it is
generated; `/image PATH` switches to another image (and starts a new conversation, since the image belongs to the
first turn), `/reset` starts over with the same image, `/exit` (or end of input) quits. The conversation template
comes from the saved model, so a model chats the way it was trained.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TextIO

HELP = "commands: /image PATH (new image, new conversation), /reset (start over), /exit (quit), /help"


class ChatSession:
    """The conversation so far and its image; `ask()` adds a question, generates the answer and records it."""

    def __init__(self, loaded, image: str | Path | None, generation, template: str | None = None):
        self.loaded, self.generation, self.template = loaded, generation, template
        self.turns: list[dict] = []
        self.image_path: Path | None = None
        self.pixels = None
        if image is not None:
            self.set_image(image)

    def set_image(self, path: str | Path) -> None:
        """Load `path` (errors leave the current image in place) and start a new conversation about it."""
        pixels = self.loaded.open_image(path)
        self.image_path, self.pixels, self.turns = Path(path), pixels, []

    def reset(self) -> None:
        self.turns = []

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        from llava.constants import DEFAULT_IMAGE_TOKEN

        question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        first = not self.turns
        value = f"{DEFAULT_IMAGE_TOKEN}\n{question}" if first and self.pixels is not None else question
        turns = self.turns + [{"from": "human", "value": value}]
        has_image = self.pixels is not None and turns[0]["value"].startswith(DEFAULT_IMAGE_TOKEN)
        stream = None if on_text is None else (lambda _index, delta: on_text(delta))
        answer = self.loaded.generate_texts([turns], [self.pixels if has_image else None], self.generation,
                                            on_text=stream, template=self.template)[0]
        self.turns = turns + [{"from": "gpt", "value": answer or "..."}]  # an empty turn would not render
        return answer


def interactive(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    image = session.image_path or "none (text only; /image PATH to add one)"
    write(f"image: {image}\n{HELP}\n")
    while True:
        write("USER: ")
        line = stdin.readline()
        if not line:  # end of input
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                write("(conversation cleared)\n")
            elif command == "/image":
                if not argument.strip():
                    write("usage: /image PATH\n")
                    continue
                try:
                    session.set_image(argument.strip())
                    write(f"(image: {session.image_path}; new conversation)\n")
                except (OSError, ValueError) as e:
                    write(f"(cannot use that image: {e})\n")
            elif command == "/help":
                write(HELP + "\n")
            else:
                write(f"unknown command {command}; {HELP}\n")
            continue
        write("ASSISTANT: ")
        session.ask(line, on_text=write)
        write("\n")


def generation_config(args, loaded):
    from llava.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            stop_token_ids=loaded.stop_token_ids, stop_strings=loaded.stop_strings(args.conv_mode),
                            seed=args.seed)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model to load and how (llava.loading.load_model's arguments); `chat` and `serve`
    load a model the same way."""
    parser.add_argument("--model", "--model-path", dest="model", required=True,
                        help="trained model dir (full, adapter, merged, or a LLaVA-1.5 HF dir)")
    parser.add_argument("--model-base", help="base model dir for an adapter dir that does not record its base")
    parser.add_argument("--vision-tower", help="local HF CLIP dir, for a LLaVA-1.5 directory")
    parser.add_argument("--conv-mode", help="template name (default: the one saved with the model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline chat", description=__doc__.split("\n\n")[0],
        epilog="Reads: the model directory (--model) and the image (--image). Writes: nothing to disk; the answers "
               "stream to the console.")
    add_model_arguments(parser)
    parser.add_argument("--image", help="image file to talk about (optional)")
    parser.add_argument("--prompt", help="answer this once and exit (default: interactive chat)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2, as LLaVA's CLI)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, help="fixes sampling")
    args = parser.parse_args(argv)

    from llava.loading import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, base=args.model_base, vision_tower_dir=args.vision_tower, device=args.device,
                            dtype=args.dtype, template=args.conv_mode)
        config = generation_config(args, loaded)
        session = ChatSession(loaded, args.image, config, template=args.conv_mode)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"llava-pipeline chat: {e}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(session.ask(args.prompt))
        return 0
    try:
        interactive(session)
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
