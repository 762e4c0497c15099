"""`llava-pipeline scenes | coco | generate`: argument parsing only; the work is in plain functions
(render_scenes, import_coco, generate, make_question_file) that the pipeline runner calls directly."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from data_gen.coco import import_coco
from data_gen.driver import DEFAULT_TYPES, CacheError, generate
from data_gen.hallucination import make_pope_file
from data_gen.openai_backend import BackendFatal, OpenAIConfig
from data_gen.preference import generate_pairs
from data_gen.prompting import RESPONSE_TYPES
from data_gen.records import InputError
from data_gen.scenes import render_scenes
from data_gen.vqa import check_turns, make_question_file


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per request would bury the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def scenes_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llava-pipeline scenes", description=(
        "Render synthetic scenes: DIR/images/*.png, DIR/captions.jsonl (image paths relative to DIR/images) and "
        "stage-1 webdataset shards DIR/shards/pairs-%%05d.tar (png + txt caption + json id)."),
        epilog="Reads: nothing (every scene is drawn from --seed). Writes: the --out folder: images/, captions.jsonl, "
               "shards/.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=1000, help="number of scenes (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels (default 64)")
    parser.add_argument("--shards-per", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--captions-per-image", type=int, default=3, help="captions per image (default 3)")
    parser.add_argument("--prefix", default="scene", help="image id prefix (default scene -> scene_000000)")
    args = parser.parse_args(argv)
    try:
        result = render_scenes(args.out, args.num, seed=args.seed, size=args.size, shards_per=args.shards_per,
                               captions_per_image=args.captions_per_image, prefix=args.prefix)
    except ValueError as e:
        return _fail(parser.prog, e)
    print(f"rendered {result['images']} scenes: {result['captions']} (images in {result['image_folder']}), "
          f"{len(result['shards'])} shard(s) in {args.out}/shards")
    return 0


def coco_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llava-pipeline coco", description=(
        "Import COCO captions + instances into the captions JSONL format (boxes normalised to 0-1, category names "
        "as labels, crowd regions kept as boxes marked \"crowd\": true). Image paths stay relative to the COCO image "
        "folder, e.g. train2017/."),
        epilog="Reads: COCO's captions_*.json (--captions) and instances_*.json (--instances). Writes: the captions "
               "JSONL (--out), one line per image.")
    parser.add_argument("--captions", required=True, help="COCO captions_*.json")
    parser.add_argument("--instances", required=True, help="COCO instances_*.json")
    parser.add_argument("--out", required=True, help="captions JSONL to write")
    args = parser.parse_args(argv)
    try:
        stats = import_coco(args.captions, args.instances, args.out)
    except InputError as e:
        return _fail(parser.prog, e)
    print(f"wrote {stats['images']} images with {stats['boxes']} boxes ({stats['crowd_regions']} crowd regions) to "
          f"{args.out} (dropped {stats['degenerate_dropped']} empty boxes; "
          f"{stats['images_without_captions']} images had no caption)")
    return 0


def _types(text: str) -> list[str]:
    types = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in RESPONSE_TYPES]
    if unknown or not types:
        raise argparse.ArgumentTypeError(f"unknown type(s) {unknown}; choose from {','.join(RESPONSE_TYPES)}")
    return types


def _turns(text: str) -> tuple[int, int]:
    try:
        return check_turns(tuple(int(v) for v in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FEWEST,MOST with 1 <= FEWEST <= MOST (e.g. 3,5), got "
                                         f"{text!r}") from None


def _pair_types(text: str) -> dict[str, int]:
    from data_gen.preference import PAIR_TYPES

    try:
        counts = {name.strip(): int(n) for name, _, n in (part.partition("=") for part in text.split(","))}
    except ValueError:
        counts = {}
    if not counts or any(t not in PAIR_TYPES or n < 0 for t, n in counts.items()):
        raise argparse.ArgumentTypeError(f"expected TYPE=N,... with types from {','.join(PAIR_TYPES)} (e.g. "
                                         f"description=1,short=2), got {text!r}")
    return counts


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llava-pipeline generate", description=(
        "Write LLaVA instruction JSON from a captions JSONL file, with GPT through any OpenAI-compatible endpoint "
        "(key from OPENAI_API_KEY) or offline from the boxes alone. Resumable: rerun the same command after an "
        "interruption or failures. With --questions-out, also (or only) write an eval question file."),
        epilog="Reads: the captions JSONL (--input), OPENAI_API_KEY for --backend openai. Writes: the instruction JSON "
               "(--out) with its resume cache, failures and summary files beside it; the question files "
               "(--questions-out, --pope-out) and preference pairs (--pairs-out) when asked for.")
    parser.add_argument("--input", required=True, help="captions JSONL: {id, image, captions, boxes} per line")
    parser.add_argument("--out", help="LLaVA instruction JSON to write")
    parser.add_argument("--backend", choices=("openai", "offline"), help="required with --out")
    parser.add_argument("--types", type=_types, default=list(DEFAULT_TYPES),
                        help=f"comma-separated, from {','.join(RESPONSE_TYPES)} (default {','.join(DEFAULT_TYPES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-answer-turns", type=_turns, default=(3, 5), metavar="FEWEST,MOST",
                        help="questions per short_answer sample (default 3,5; LLaVA-1.5 packs all of an image's)")
    parser.add_argument("--short-answer-paraphrases", type=float, default=0.0, metavar="FRACTION",
                        help="share of short_answer questions asked in another wording (data_gen.paraphrases' "
                             "training wordings; default 0)")
    parser.add_argument("--cache", help="finished-items cache (default OUT.cache.jsonl)")
    parser.add_argument("--failures", help="failed items with reasons (default OUT.failures.jsonl)")
    parser.add_argument("--summary", help="summary JSON (default OUT.summary.json)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad input lines instead of stopping")
    parser.add_argument("--limit", type=int, help="use only the first N records (a cheap trial run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="log every retry and invalid reply")
    api = parser.add_argument_group("openai backend")
    defaults = OpenAIConfig()
    api.add_argument("--model", default=defaults.model, help=f"default {defaults.model}")
    api.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
                                                      "(default: OPENAI_BASE_URL or api.openai.com)")
    api.add_argument("--workers", type=int, default=4, help="concurrent requests (default 4)")
    api.add_argument("--rpm", type=float, default=defaults.rpm, help="max requests per minute, 0 = no limit")
    api.add_argument("--temperature", type=float, default=defaults.temperature)
    api.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    api.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request")
    api.add_argument("--max-retries", type=int, default=defaults.max_retries,
                     help="retries per request on 429 / 5xx / timeouts / connection errors")
    api.add_argument("--max-reasks", type=int, default=defaults.max_reasks, help="re-asks after an invalid reply")
    api.add_argument("--base-delay", type=float, default=defaults.base_delay, help="first backoff delay in seconds")
    api.add_argument("--max-delay", type=float, default=defaults.max_delay, help="longest backoff delay in seconds")
    api.add_argument("--price-in", type=float, help="USD per 1M input tokens, for the cost estimate")
    api.add_argument("--price-out", type=float, help="USD per 1M output tokens, for the cost estimate")
    api.add_argument("--no-json-mode", action="store_true", help="never send response_format=json_object")
    questions = parser.add_argument_group("eval question file")
    questions.add_argument("--questions-out", help="write short-answer eval questions (JSONL) for the --input images")
    questions.add_argument("--questions-per-image", type=int, default=3)
    questions.add_argument("--open-every", type=int, default=10, help="one open question every N images (0: none)")
    hallucination = parser.add_argument_group("hallucination (data_gen.preference, data_gen.hallucination)")
    hallucination.add_argument("--pairs-out", help="write preference pairs (chosen / rejected with one hallucination) "
                               "for DPO (llava-pipeline prefer)")
    hallucination.add_argument("--pair-types", type=_pair_types, default={"description": 1, "short": 1},
                               metavar="TYPE=N,...", help="pairs per image: description=N,short=N (default 1 each; "
                               "the openai backend asks their sum, kinds rotating)")
    hallucination.add_argument("--pope-out", help="write POPE questions (random / popular / adversarial) for the "
                               "--input images")
    hallucination.add_argument("--pope-per-image", type=int, default=3, help="present (and as many absent) objects "
                               "asked per image and split (POPE: 3)")
    args = parser.parse_args(argv)
    if not (args.out or args.questions_out or args.pairs_out or args.pope_out):
        parser.error("give --out (instruction data), --questions-out (eval questions), --pairs-out (preference "
                     "pairs) and/or --pope-out (POPE questions)")
    if (args.out or args.pairs_out) and not args.backend:
        parser.error("--backend openai|offline is required with --out and --pairs-out")
    _setup_logging(args.verbose)

    try:
        if args.questions_out:
            stats = make_question_file(args.input, args.questions_out, seed=args.seed,
                                       per_image=args.questions_per_image, open_every=args.open_every,
                                       skip_bad=args.skip_bad)
            print(f"wrote {stats['questions']} questions for {stats['images']} images to {args.questions_out}: "
                  + json.dumps({k: v for k, v in stats.items() if k not in ("images", "questions")}),
                  file=sys.stderr)
        if args.pope_out:
            stats = make_pope_file(args.input, args.pope_out, per_image=args.pope_per_image, seed=args.seed,
                                   skip_bad=args.skip_bad)
            print(f"wrote {stats['questions']} POPE questions for {stats['images']} images to {args.pope_out}: "
                  + json.dumps({k: v for k, v in stats.items() if k not in ("images", "questions")}),
                  file=sys.stderr)
        if not (args.out or args.pairs_out):
            return 0
        config = OpenAIConfig(model=args.model, base_url=args.base_url, temperature=args.temperature,
                              max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                              max_reasks=args.max_reasks, base_delay=args.base_delay, max_delay=args.max_delay,
                              rpm=args.rpm, price_in=args.price_in, price_out=args.price_out,
                              json_mode=not args.no_json_mode)
        if args.pairs_out:
            pairs = generate_pairs(args.input, args.pairs_out, backend=args.backend, types=args.pair_types,
                                   seed=args.seed, workers=args.workers, skip_bad=args.skip_bad, limit=args.limit,
                                   progress=not args.no_progress, openai_config=config)
            print(f"wrote {pairs['written']} preference pairs to {args.pairs_out} ({pairs['already_done']} items from "
                  f"the cache, {pairs['failed']} failed): {json.dumps(pairs['by_kind'])}", file=sys.stderr)
            if pairs["failed"]:
                print(f"rerun the same command to retry the failed items (reasons next to {args.pairs_out})",
                      file=sys.stderr)
                return 1
        if not args.out:
            return 0
        summary = generate(args.input, args.out, backend=args.backend, types=args.types, seed=args.seed,
                           workers=args.workers, cache_path=args.cache, failures_path=args.failures,
                           summary_path=args.summary, skip_bad=args.skip_bad, limit=args.limit,
                           progress=not args.no_progress, openai_config=config,
                           answer_turns=args.short_answer_turns, answer_paraphrases=args.short_answer_paraphrases)
    except (InputError, CacheError, BackendFatal, ValueError) as e:
        return _fail(parser.prog, e)
    _print_summary(summary)
    if summary["failed"]:
        print(f"{summary['failed']} item(s) failed (reasons in {summary['failures']}); rerun the same command to "
              "retry them", file=sys.stderr)
        return 1
    return 0


def _print_summary(s: dict) -> None:
    lines = [f"wrote {s['written']} samples to {s['output']} "
             + ", ".join(f"{t}={n}" for t, n in s["written_by_type"].items()),
             f"items {s['items']}: {s['already_done']} from the cache, {s['generated']} generated, "
             f"{s['failed']} failed, "
             f"{s['filtered']} filtered (leaked context), {s['empty']} with nothing to ask"]
    if s["bad_lines_skipped"] or s["torn_cache_lines_dropped"]:
        lines.append(f"skipped {s['bad_lines_skipped']} bad input line(s); dropped {s['torn_cache_lines_dropped']} "
                     "torn cache line(s)")
    usage = s.get("usage")
    if usage:
        cost = f"${usage['cost_usd']:.4f}" if usage["cost_usd"] is not None else "n/a (set --price-in/--price-out)"
        lines.append(f"{usage['model']}: {usage['requests']} requests ({usage['retries']} retries, {usage['reasks']} "
                     f"re-asks), {usage['input_tokens']} input + {usage['output_tokens']} output tokens, cost {cost}")
    lines.append(f"summary: {s['summary']}")
    print("\n".join(lines), file=sys.stderr)
