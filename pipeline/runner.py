"""`llava-pipeline run --config F`: every stage of a run, in order, from one config file.

    scenes -> generate -> base (demo only) -> align -> instruct -> prefer (optional) -> eval
    scenes/   data/       base/              align/   instruct/   prefer/               eval/

(folders under out_dir; the final model is instruct/final, or prefer/final when the config has a prefer section)

Each stage writes only inside its own folder. When it finishes, `<stage>/DONE.json` is written atomically with a
fingerprint of what it was made from: its resolved settings, the completion ids of the stages it read from, and the
size and mtime of outside files it read. A rerun skips a stage whose fingerprint still matches; a stage whose
settings or inputs changed is cleared and run again, and so is everything after it (their inputs changed). A stage
that was interrupted (`STARTED.json` without `DONE.json`, same fingerprint) is run again in place, so the training
stages resume from their last checkpoint. `--from STAGE` reruns that stage and the ones after it from scratch;
`--only STAGE` reruns just that one.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llava.io import atomic_write_json, atomic_write_text
from stages.config import ConfigError, bind, dump_yaml, load_config, to_dict
from stages.lifeline import FolderInUse, hold_folder

DONE = "DONE.json"
STARTED = "STARTED.json"


class PipelineError(RuntimeError):
    """A stage cannot start: an input is missing or an earlier stage has not run. The message says what to do."""


# ---- fingerprints ----------------------------------------------------------------------------------------------

def path_fingerprint(path: str | Path) -> dict:
    """Cheap identity of an outside input: size and mtime of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if path.is_dir():
        digest, files, size = hashlib.sha256(), 0, 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                stat = (Path(root) / name).stat()
                digest.update(f"{Path(root, name).relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                files, size = files + 1, size + stat.st_size
        return {"path": str(path), "files": files, "size": size, "digest": digest.hexdigest()[:16]}
    return {"path": str(path), "missing": True}


def fingerprint(stage: str, settings: dict, upstream: dict[str, str], inputs: list[dict]) -> str:
    blob = json.dumps({"stage": stage, "settings": settings, "upstream": upstream, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ---- stages --------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a stage will do, resolved against the run: `settings` is saved and fingerprinted, `execute()` does the
    work inside the stage folder and returns the outputs later stages read (paths, metrics)."""
    settings: dict
    execute: Callable[[], dict]
    inputs: list[str] = field(default_factory=list)  # outside files/folders that go into the fingerprint


@dataclass(frozen=True)
class Stage:
    name: str  # the --from/--only name and the config section
    folder: str  # its folder under out_dir
    plan: Callable[["Run", Any], Plan]  # (run, bound section) -> Plan; raises PipelineError for missing inputs
    # dataclass the section binds to (strictly: a typo'd key is an error); None for a training stage, whose own
    # module (stages/<name>.py) binds the section and prints its resolved config
    schema: type | None
    aliases: tuple[str, ...] = ()


class Run:
    """One pipeline run: the config, the output folder, and what earlier stages recorded."""

    def __init__(self, config: Any, out_dir: Path, config_path: str | None, stages: list[Stage], nproc: int = 1,
                 log: Callable[[str], None] = print):
        self.config, self.out_dir, self.config_path, self.nproc, self.log = config, out_dir, config_path, nproc, log
        self.stages = {s.name: s for s in stages}
        self._read: dict[str, str] = {}  # stage -> run_id of the upstream outputs the current plan used

    def dir(self, stage: str) -> Path:
        return self.out_dir / self.stages[stage].folder

    def record(self, stage: str) -> dict | None:
        path = self.dir(stage) / DONE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None  # a marker is written atomically; an unreadable one was edited by hand: treat as not done

    def configured(self, stage: str) -> bool:
        return getattr(self.config, stage, None) is not None

    def output(self, stage: str, key: str, *, needed_by: str, setting: str | None = None) -> Any:
        """`key` from a finished earlier stage's outputs; the error says which stage to run or what to set."""
        how = f" or set {needed_by}.{setting} in the config" if setting else ""
        if not self.configured(stage):
            raise PipelineError(f"stage {needed_by!r} needs {key} from stage {stage!r}, which this config does not "
                                f"have: add the {stage!r} section{how}")
        record = self.record(stage)
        if record is None:
            raise PipelineError(f"stage {needed_by!r} needs {key} from stage {stage!r}, which has not finished: run "
                                f"`llava-pipeline run --config {self.config_path or 'F'} --from {stage}` first{how}")
        self._read[stage] = record["run_id"]
        return record["outputs"][key]

    def take_reads(self) -> dict[str, str]:
        reads, self._read = self._read, {}
        return reads


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def run_stages(run: Run, stages: list[Stage], *, from_stage: str | None = None, only: str | None = None) -> dict:
    """Run (or skip) each configured stage in order; return {stage: outputs}."""
    names = [s.name for s in stages]
    forced: set[str] = set()
    if only is not None:
        forced = {only}
    elif from_stage is not None:
        forced = set(names[names.index(from_stage):])
    results: dict[str, dict] = {}
    for stage in stages:
        section = getattr(run.config, stage.name)
        if section is None:
            run.log(f"[{stage.name}] not configured: skipped")
            continue
        if only is not None and stage.name != only:
            continue
        stage_dir = run.dir(stage.name)
        plan = stage.plan(run, section)
        upstream = run.take_reads()
        inputs = [path_fingerprint(p) for p in plan.inputs]
        print_ = fingerprint(stage.name, plan.settings, upstream, inputs)
        done = run.record(stage.name)
        if done is not None and done.get("fingerprint") == print_ and stage.name not in forced:
            run.log(f"[{stage.name}] up to date (finished {done['completed_at']} in {done['seconds']:.0f} s): "
                    f"skipped")
            results[stage.name] = done["outputs"]
            continue
        started = _read_json(stage_dir / STARTED)
        if stage.name in forced or done is not None or (started or {}).get("fingerprint") != print_:
            why = ("asked to rerun" if stage.name in forced else
                   "its settings or inputs changed" if done is not None or started is not None else None)
            if why and stage_dir.exists():
                run.log(f"[{stage.name}] {why}: clearing {stage_dir} and running it again")
                shutil.rmtree(stage_dir)
        else:
            run.log(f"[{stage.name}] interrupted earlier: running it again in place (training resumes from its "
                    f"last checkpoint)")
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage_dir / STARTED, {"fingerprint": print_, "started_at": _now()})
        atomic_write_text(stage_dir / "stage_config.yaml", dump_yaml(plan.settings))
        if stage.schema is not None:  # the training stages print their fully resolved config themselves
            run.log(f"[{stage.name}] running with\n" + _indent(dump_yaml(plan.settings)))
        else:
            run.log(f"[{stage.name}] running")
        started_at, cpu_before = time.perf_counter(), _cpu_seconds()
        outputs = plan.execute()
        seconds, cpu = time.perf_counter() - started_at, _cpu_seconds() - cpu_before
        atomic_write_json(stage_dir / DONE, {
            "stage": stage.name, "fingerprint": print_, "run_id": uuid.uuid4().hex, "completed_at": _now(),
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 1), "settings": plan.settings,
            "upstream": upstream, "inputs": inputs, "outputs": outputs})
        run.log(f"[{stage.name}] done in {seconds:.1f} s ({cpu:.0f} CPU s)")
        results[stage.name] = outputs
    return results


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ranks): a load-independent measure of a stage's work."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _indent(text: str) -> str:
    return "".join("    " + line + "\n" for line in text.rstrip().splitlines())


# ---- the run config ------------------------------------------------------------------------------------------------

@dataclass
class ScenesSection:
    """Synthetic scenes (data_gen.scenes): `num` for training, `heldout` more (another seed) for evaluation only."""
    num: int = 2000
    heldout: int = 200
    size: int = 64
    seed: int = 0
    captions_per_image: int = 3
    shards_per: int = 1000


@dataclass
class GenerateSection:
    """Instruction data (data_gen.driver.generate) and the held-out eval question file (data_gen.vqa)."""
    backend: str = "offline"  # offline | openai (key from OPENAI_API_KEY)
    # response types (one sample of each per image), or {type: samples per image} to set the data mix: 0.25 gives a
    # quarter of the images one, 2 gives every image two (different questions: the second copy uses seed + 1)
    types: Any = field(default_factory=lambda: ["conversation", "detail", "reasoning", "short_answer"])
    input: str | None = None  # captions JSONL; default: the scenes stage's training captions
    heldout_input: str | None = None  # captions JSONL of held-out images; default: the scenes stage's held-out ones
    seed: int = 0
    workers: int = 4
    limit: int | None = None
    skip_bad: bool = False
    short_answer_turns: list = field(default_factory=lambda: [3, 5])  # [fewest, most] questions per short_answer sample
    short_answer_paraphrases: float = 0.0  # share of those questions asked in another wording (data_gen.paraphrases)
    questions_per_image: int = 3
    open_every: int = 10  # one open (sentence-answer) question every N held-out images
    openai: dict = field(default_factory=dict)  # data_gen.openai_backend.OpenAIConfig keys (model, base_url, rpm, ...)


def _answer_turns(value) -> tuple[int, int]:
    from data_gen.vqa import check_turns

    try:
        return check_turns(value)
    except ValueError:
        raise ConfigError(f"generate.short_answer_turns: expected [fewest, most] with 1 <= fewest <= most, got "
                          f"{value!r}") from None


@dataclass
class EvalSection:
    """Held-out evaluation of the final model (llava.evaluation)."""
    model: str | None = None  # default: the instruct stage's final model
    question_file: str | None = None  # default: the generate stage's held-out questions
    image_folder: str | None = None  # default: the scenes stage's held-out images
    batch_size: int = 16
    max_new_tokens: int = 64
    limit: int | None = None
    conv_mode: str | None = None
    # Also score what memorised pixels or wording cannot explain (needs the scenes stage's held-out scenes): the
    # questions reworded by the evaluation-only paraphrases, the held-out scenes redrawn on background shades no
    # training image has, and CHAIR object hallucination of the open answers.
    robustness: bool = False
    unseen_backgrounds: list = field(default_factory=lambda: [120, 180])  # gray shades; training scenes: 190-250


@dataclass
class ChatExample:
    """One question put to the final model at the end of a run, printed with its answer."""
    prompt: str = "Describe the image."
    image: str | None = None  # default: the first held-out question's image
    max_new_tokens: int = 96


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    nproc: int = 1  # ranks for the training stages (base, align, instruct)
    # TrainConfig keys applied to every training section of base/align/instruct where the stage does not set them
    # (e.g. precision, zero_stage, deepspeed_config: configs/deepspeed/zero2.json).
    train: dict = field(default_factory=dict)
    scenes: dict | None = None
    generate: dict | None = None
    base: dict | None = None
    align: dict | None = None
    instruct: dict | None = None
    prefer: dict | None = None  # stage 3 (stages/prefer.py): DPO on the instruct stage's model
    eval: dict | None = None
    chat_example: dict | None = None


# ---- stage plans ---------------------------------------------------------------------------------------------------

def _get(section: dict, dotted: str) -> Any:
    node: Any = section
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def _set_default(section: dict, dotted: str, value: Callable[[], Any]) -> Any:
    """Fill `dotted` from an earlier stage unless the config sets it; `value` is only called when needed."""
    current = _get(section, dotted)
    if current is not None:
        return current
    node = section
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value()
    return node[parts[-1]]


def plan_scenes(run: Run, cfg: ScenesSection) -> Plan:
    out = run.dir("scenes")

    def execute() -> dict:
        from data_gen.scenes import render_scenes

        train = render_scenes(out / "train", cfg.num, seed=cfg.seed, size=cfg.size, shards_per=cfg.shards_per,
                              captions_per_image=cfg.captions_per_image, prefix="scene")
        outputs = {"captions": train["captions"], "image_folder": train["image_folder"], "shards": train["shards"],
                   "images": train["images"]}
        if cfg.heldout:
            # Another seed: held-out scenes are new draws from the same world, never copies of training scenes.
            held = render_scenes(out / "heldout", cfg.heldout, seed=cfg.seed + 1, size=cfg.size,
                                 shards_per=cfg.shards_per, captions_per_image=cfg.captions_per_image,
                                 prefix="heldout")
            outputs.update(heldout_captions=held["captions"], heldout_image_folder=held["image_folder"],
                           heldout_images=held["images"])
        run.log(f"[scenes] {outputs['images']} training scenes, {outputs.get('heldout_images', 0)} held out")
        return outputs

    return Plan(to_dict(cfg), execute)


def type_fractions(types: Any) -> dict[str, float]:
    return {t: 1.0 for t in types} if isinstance(types, list) else dict(types)


def plan_generate(run: Run, cfg: GenerateSection) -> Plan:
    from data_gen.openai_backend import OpenAIConfig

    out = run.dir("generate")
    openai_config = bind(OpenAIConfig, cfg.openai, "generate.openai")
    captions = cfg.input or run.output("scenes", "captions", needed_by="generate", setting="input")
    heldout = cfg.heldout_input
    if heldout is None and run.configured("scenes") and run.config.scenes.get("heldout", 1):
        heldout = run.output("scenes", "heldout_captions", needed_by="generate", setting="heldout_input")
    settings = {**to_dict(cfg), "input": captions, "heldout_input": heldout}

    def execute() -> dict:
        from data_gen.driver import generate
        from data_gen.records import read_captions
        from data_gen.vqa import make_question_file

        records = len(read_captions(captions, skip_bad=cfg.skip_bad)[0])
        samples: list = []
        by_type: dict[str, int] = {}
        for response_type, amount in type_fractions(cfg.types).items():
            # `amount` samples of this type per image: copy k uses seed + k (other questions about the same image);
            # a fractional part gives the last copy to that share of the images. One file and cache per copy.
            copies = math.ceil(amount)
            by_type[response_type] = 0
            for k in range(copies):
                limit = max(1, round(min(1.0, amount - k) * records))
                limit = min(limit, cfg.limit) if cfg.limit else limit
                name = response_type if k == 0 else f"{response_type}.{k}"
                summary = generate(captions, out / f"{name}.json", backend=cfg.backend, types=[response_type],
                                   seed=cfg.seed + k, workers=cfg.workers, skip_bad=cfg.skip_bad, limit=limit,
                                   progress=False, openai_config=openai_config,
                                   answer_turns=_answer_turns(cfg.short_answer_turns),
                                   answer_paraphrases=cfg.short_answer_paraphrases)
                if summary["failed"]:
                    raise PipelineError(f"generate: {summary['failed']} {response_type} item(s) failed (reasons in "
                                        f"{summary['failures']}); run the pipeline again to retry them (finished "
                                        "items are cached)")
                copy_samples = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
                if k:
                    copy_samples = [{**sample, "id": f"{sample['id']}.{k}"} for sample in copy_samples]
                samples += copy_samples
                by_type[response_type] += summary["written"]
        atomic_write_json(out / "train.json", samples, indent=None)
        run.log(f"[generate] {len(samples)} samples: " + ", ".join(f"{t} {n}" for t, n in by_type.items()))
        outputs = {"train_json": str(out / "train.json"), "samples": len(samples), "by_type": by_type}
        if heldout:
            stats = make_question_file(heldout, out / "questions.jsonl", seed=cfg.seed,
                                       per_image=cfg.questions_per_image, open_every=cfg.open_every,
                                       skip_bad=cfg.skip_bad)
            run.log(f"[generate] {stats['questions']} held-out questions for {stats['images']} images")
            outputs.update(questions=str(out / "questions.jsonl"), question_counts=stats)
        return outputs

    return Plan(settings, execute, inputs=[p for p in (cfg.input, cfg.heldout_input) if p])


def _with_train_defaults(run: Run, section: dict, train_sections: dict) -> dict:
    """The run-wide `train:` settings under every training section of a stage (the stage's own keys win)."""
    for path in train_sections:
        node = _set_default(section, path, dict)
        for key, value in run.config.train.items():
            node.setdefault(key, value)
    return section


def _training_plan(run: Run, name: str, section: dict, outputs: Callable[[Path], dict]) -> Plan:
    """A plan that runs the stage's `main(--config <stage>/stage_config.yaml --nproc N)`; `section` is wired."""
    from stages.common import bind_stage

    module, schema = TRAINING_STAGES[name]()
    out = run.dir(name)
    section["output_dir"] = str(out)
    _with_train_defaults(run, section, module.TRAIN_SECTIONS)
    bind_stage(schema, section, name=name, train_sections=module.TRAIN_SECTIONS)  # strict: typos fail here

    def execute() -> dict:
        code = module.main(["--config", str(out / "stage_config.yaml"), "--nproc", str(run.nproc)])
        if code:
            raise PipelineError(f"stage {name!r} failed (exit code {code}; its message is above). Fix it and run "
                                "the pipeline again: finished stages are skipped and this one resumes from its "
                                "last checkpoint")
        found = outputs(out)
        missing = [str(p) for p in found.values() if isinstance(p, str) and not Path(p).exists()]
        if missing:
            raise PipelineError(f"stage {name!r} finished without writing {', '.join(missing)}")
        return found

    return Plan(section, execute)


def plan_base(run: Run, section: dict) -> Plan:
    section = copy.deepcopy(section)
    if _get(section, "captions") is None:
        section["captions"] = run.output("scenes", "captions", needed_by="base", setting="captions")
        _set_default(section, "image_folder",
                     lambda: run.output("scenes", "image_folder", needed_by="base", setting="image_folder"))
    if not section.get("instruct_data") and run.configured("generate"):
        section["instruct_data"] = [run.output("generate", "train_json", needed_by="base")]
    return _training_plan(run, "base", section, lambda out: {
        "tokenizer": str(out / "tokenizer.model"), "vision_tower": str(out / "clip"), "llm": str(out / "llm")})


def _model_parts_from_base(run: Run, section: dict, path: str, needed_by: str) -> None:
    """Fill `<path>.llm / vision_tower / tokenizer` from the base stage unless the config names them."""
    if _get(section, f"{path}.llm") is None:
        section.setdefault(path, {})["llm"] = run.output("base", "llm", needed_by=needed_by, setting=f"{path}.llm")
        _set_default(section, f"{path}.tokenizer", lambda: run.output("base", "tokenizer", needed_by=needed_by))
        if _get(section, f"{path}.vision_tower") is None:
            section[path]["vision_tower"] = run.output("base", "vision_tower", needed_by=needed_by,
                                                       setting=f"{path}.vision_tower")


def plan_align(run: Run, section: dict) -> Plan:
    section = copy.deepcopy(section)
    _model_parts_from_base(run, section, "model", "align")
    _set_default(section, "shards", lambda: str(Path(run.output("scenes", "shards", needed_by="align",
                                                                   setting="shards")[0]).parent))
    return _training_plan(run, "align", section, lambda out: {
        "projector": str(out / "mm_projector.safetensors"), "model_config": str(out / "model_config.json")})


def plan_instruct(run: Run, section: dict) -> Plan:
    section = copy.deepcopy(section)
    if section.get("align_dir") is None:
        if section.get("model") is None and run.configured("align"):
            section["align_dir"] = str(Path(run.output("align", "model_config", needed_by="instruct",
                                                       setting="align_dir")).parent)
        else:  # no stage 1 (or the model named here): start from the parts, the projector untrained unless given
            _model_parts_from_base(run, section, "model", "instruct")
    if section.get("data") is None:
        section["data"] = run.output("generate", "train_json", needed_by="instruct", setting="data")
        _set_default(section, "image_folder",
                     lambda: run.output("scenes", "image_folder", needed_by="instruct", setting="image_folder"))
    if isinstance(section.get("eval"), dict) and section["eval"].get("question_file") is None:
        section["eval"]["question_file"] = run.output("generate", "questions", needed_by="instruct",
                                                      setting="eval.question_file")
        _set_default(section, "eval.image_folder", lambda: run.output(
            "scenes", "heldout_image_folder", needed_by="instruct", setting="eval.image_folder"))
    return _training_plan(run, "instruct", section, lambda out: {"final_model": str(out / "final")})


def plan_prefer(run: Run, section: dict) -> Plan:
    """Stage 3 on the instruct stage's model; without `data`, offline pairs about the training scenes."""
    section = copy.deepcopy(section)
    _set_default(section, "model", lambda: run.output("instruct", "final_model", needed_by="prefer", setting="model"))
    if section.get("data") is None and section.get("captions") is None:
        section["captions"] = run.output("scenes", "captions", needed_by="prefer", setting="data")
        _set_default(section, "image_folder",
                     lambda: run.output("scenes", "image_folder", needed_by="prefer", setting="image_folder"))
    return _training_plan(run, "prefer", section, lambda out: {"final_model": str(out / "final")})


def plan_eval(run: Run, cfg: EvalSection) -> Plan:
    out = run.dir("eval")
    last = "prefer" if run.configured("prefer") else "instruct"  # the run's final model
    model = cfg.model or run.output(last, "final_model", needed_by="eval", setting="model")
    question_file = cfg.question_file
    image_folder = cfg.image_folder
    if question_file is None:
        question_file = run.output("generate", "questions", needed_by="eval", setting="question_file")
        if image_folder is None:
            image_folder = run.output("scenes", "heldout_image_folder", needed_by="eval", setting="image_folder")
    settings = {**to_dict(cfg), "model": model, "question_file": question_file, "image_folder": image_folder}
    outside = [p for p in (cfg.model, cfg.question_file, cfg.image_folder) if p]
    heldout = run.output("scenes", "heldout_captions", needed_by="eval.robustness") if cfg.robustness else None

    def execute() -> dict:
        from llava.evaluation import evaluate_model, format_score_table, read_questions
        from llava.loading import load_model

        loaded = load_model(model)
        started = time.perf_counter()
        rows, scores = evaluate_model(loaded, question_file, image_folder, out / "answers.jsonl", limit=cfg.limit,
                                batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                template_name=cfg.conv_mode, progress=True)
        seconds = time.perf_counter() - started
        run.log(f"[eval] {len(rows)} answers in {seconds:.1f} s -> {out / 'answers.jsonl'}")
        outputs: dict = {"answers": str(out / "answers.jsonl"), "questions": len(rows)}
        questions = {str(q.question_id): q for q in read_questions(question_file)}
        open_answers = [r for r in rows if questions[str(r["question_id"])].answer is None]
        for row in open_answers[:3]:
            run.log(f"[eval] open question: {row['prompt']!r} -> {row['text']!r}")
        if scores is not None:
            run.log(format_score_table(scores))
            atomic_write_json(out / "scores.json", scores)
            outputs.update(scores=str(out / "scores.json"), accuracy=scores["overall"]["accuracy"],
                           chance=scores["overall"]["chance"],
                           by_category={k: v["accuracy"] for k, v in scores["categories"].items()})
        if heldout:
            descriptions = [(questions[str(row["question_id"])].image, row["text"]) for row in open_answers]
            outputs["robustness"] = robustness_checks(run, cfg, loaded, heldout, descriptions, out)
            if scores is not None and cfg.question_file is None:  # the run's own questions: its held-out scenes
                said = {str(r["question_id"]): r["text"] for r in rows}
                outputs["by_objects"] = scores_by_objects(questions.values(), said, heldout)
                run.log("[eval] by objects in the image: " + "; ".join(
                    f"{name} {100 * row['accuracy']:.1f} % of {row['questions']} (chance {100 * row['chance']:.1f} %)"
                    for name, row in outputs["by_objects"].items()))
                atomic_write_json(out / "by_objects.json", outputs["by_objects"])
        return outputs

    return Plan(settings, execute, inputs=outside)


def scores_by_objects(questions, predictions: dict[str, str], captions: str) -> dict:
    """Exact match on the questions about images of one object and on those about images of two or more (objects
    counted from `captions`, the images' boxes). A one-object image can be answered from what is in it at all; a
    question about one object of several needs the answer bound to that object (its colour, not the other's).
    {"one object" | "two or more": {"questions", "accuracy", "chance", "by_category"}}; an image that `captions`
    does not list raises, naming it."""
    from data_gen.records import read_captions
    from llava.evaluation import score_answers

    records, _ = read_captions(captions)
    objects = {r.image: len(r.boxes) for r in records}
    groups: dict[str, list] = {"one object": [], "two or more": []}
    for question in questions:
        if question.answer is None:
            continue
        if question.image not in objects:
            raise ConfigError(f"question {question.question_id!r}: image {question.image!r} is not in {captions}")
        groups["one object" if objects[question.image] == 1 else "two or more"].append(question)
    out = {}
    for name, group in groups.items():
        if group:
            scores = score_answers(group, predictions)
            out[name] = {"questions": len(group), "accuracy": scores["overall"]["accuracy"],
                         "chance": scores["overall"]["chance"],
                         "by_category": {k: v["accuracy"] for k, v in scores["categories"].items()}}
    return out


def robustness_checks(run: Run, cfg: EvalSection, loaded, heldout_captions: str,
                      descriptions: list[tuple[str, str]], out: Path) -> dict:
    """Held-out accuracy on (a) the held-out scenes redrawn on unseen background shades (same scenes and questions:
    the scene seed fixes everything but the shade) and (b) the questions reworded by the evaluation-only
    paraphrases (data_gen/prompts/eval_paraphrases.json); (c) CHAIR-i/-s of the open answers."""
    from data_gen.hallucination import ChairVocabulary, chair_scores, image_objects
    from data_gen.paraphrases import make_paraphrase_file
    from data_gen.records import read_captions
    from data_gen.scenes import render_scenes
    from data_gen.vqa import make_question_file
    from llava.evaluation import evaluate_model, format_score_table

    scenes = bind(ScenesSection, run.config.scenes or {}, "scenes")
    generate = bind(GenerateSection, run.config.generate or {}, "generate")
    seed, per_image = generate.seed, generate.questions_per_image
    records, _ = read_captions(heldout_captions)
    redrawn = render_scenes(out / "unseen_backgrounds", len(records), seed=scenes.seed + 1,  # plan_scenes' seed
                            size=scenes.size, prefix="heldout", background=tuple(cfg.unseen_backgrounds))
    make_question_file(redrawn["captions"], out / "unseen_backgrounds.jsonl", seed=seed, per_image=per_image,
                       open_every=0)
    make_paraphrase_file(heldout_captions, out / "paraphrases.jsonl", seed=seed, per_image=per_image)
    results = {}
    for name, question_file, folder in (
            ("unseen_backgrounds", out / "unseen_backgrounds.jsonl", redrawn["image_folder"]),
            ("paraphrases", out / "paraphrases.jsonl", str(Path(heldout_captions).parent / "images"))):
        _, scores = evaluate_model(loaded, question_file, folder, out / f"answers_{name}.jsonl",
                                   batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                   template_name=cfg.conv_mode)
        run.log(f"[eval] {name}:\n" + format_score_table(scores))
        results[name] = {"accuracy": scores["overall"]["accuracy"],
                         "by_category": {k: v["accuracy"] for k, v in scores["categories"].items()}}
    vocabulary = ChairVocabulary.scene()
    chair = chair_scores(descriptions, image_objects(records, vocabulary), vocabulary)
    run.log(f"[eval] object hallucination of {chair['descriptions']} open answers: CHAIR-i {chair['chair_i']:.3f} "
            f"({chair['hallucinated_mentions']} of {chair['mentions']} objects named are not in the image), "
            f"CHAIR-s {chair['chair_s']:.3f}")
    results["chair"] = {k: v for k, v in chair.items() if k != "per_description"}
    atomic_write_json(out / "robustness.json", results)
    return results


def print_chat_example(run: Run, cfg: ChatExample) -> None:
    """Ask the final model one question about a held-out image, the way `llava-pipeline chat` would."""
    from pipeline.chat import ChatSession
    from llava.evaluation import read_questions
    from llava.loading import load_model

    model = (run.config.eval or {}).get("model") or run.output("instruct", "final_model", needed_by="chat_example")
    image = cfg.image
    if image is None:
        questions = read_questions(run.output("generate", "questions", needed_by="chat_example", setting="image"))
        folder = run.output("scenes", "heldout_image_folder", needed_by="chat_example", setting="image")
        image = str(Path(folder) / next(q.image for q in questions if q.image))
    loaded = load_model(model)
    from llava.generate import GenerationConfig

    session = ChatSession(loaded, image, GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                                          stop_token_ids=loaded.stop_token_ids))
    answer = session.ask(cfg.prompt)
    run.log(f"\n[chat] llava-pipeline chat --model {model} --image {image} --prompt {cfg.prompt!r} "
            f"--temperature 0\nUSER: {cfg.prompt}\nASSISTANT: {answer}")


def _training_modules(name: str) -> Callable[[], tuple[Any, type]]:
    def load() -> tuple[Any, type]:
        import importlib

        module = importlib.import_module(f"stages.{name}")
        return module, getattr(module, f"{name.capitalize()}Config")

    return load


TRAINING_STAGES = {name: _training_modules(name) for name in ("base", "align", "instruct", "prefer")}


STAGES = [
    Stage("scenes", "scenes", lambda run, section: plan_scenes(run, bind(ScenesSection, section, "scenes")),
          ScenesSection),
    Stage("generate", "data", lambda run, section: plan_generate(run, bind(GenerateSection, section, "generate")),
          GenerateSection, aliases=("data",)),
    Stage("base", "base", plan_base, None),
    Stage("align", "align", plan_align, None),
    Stage("instruct", "instruct", plan_instruct, None),
    Stage("prefer", "prefer", plan_prefer, None),
    Stage("eval", "eval", lambda run, section: plan_eval(run, bind(EvalSection, section, "eval")), EvalSection),
]
# Keys the runner fills from earlier stages; they stand in as placeholders when a config is checked up front.
WIRED = {"base": ("captions",), "align": ("model.llm", "shards"), "instruct": ("data",), "prefer": ("model",)}


def validate_sections(config: RunConfig, where: str) -> None:
    """Bind every configured section strictly before anything runs: a typo in `eval` must not wait for training."""
    from stages.common import bind_stage

    for stage in STAGES:
        section = getattr(config, stage.name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: {stage.name}: expected a mapping of settings, got {section!r}")
        if stage.schema is not None:
            bound = bind(stage.schema, section, f"{where}: {stage.name}")
            if isinstance(bound, GenerateSection):
                _check_generate(bound, f"{where}: generate")
            continue
        module, schema = TRAINING_STAGES[stage.name]()
        trial = copy.deepcopy(section)
        for key in WIRED[stage.name]:
            _set_default(trial, key, lambda: "<from an earlier stage>")
        if isinstance(trial.get("eval"), dict):
            _set_default(trial, "eval.question_file", lambda: "<from an earlier stage>")
        trial["output_dir"] = f"{config.out_dir}/{stage.folder}"
        fake_run = Run(config, Path(config.out_dir), where, STAGES)
        _with_train_defaults(fake_run, trial, module.TRAIN_SECTIONS)
        bind_stage(schema, trial, name=f"{where}: {stage.name}", train_sections=module.TRAIN_SECTIONS)
    if config.chat_example is not None:
        bind(ChatExample, config.chat_example, f"{where}: chat_example")
    if config.nproc < 1:
        raise ConfigError(f"{where}: nproc={config.nproc} must be >= 1")


def _check_generate(cfg: GenerateSection, where: str) -> None:
    from data_gen.openai_backend import OpenAIConfig
    from data_gen.prompting import RESPONSE_TYPES
    from data_gen.paraphrases import check_paraphrase_fraction

    if cfg.backend not in ("offline", "openai"):
        raise ConfigError(f"{where}.backend: {cfg.backend!r} is not a backend; use offline or openai")
    if not isinstance(cfg.types, (list, dict)) or not cfg.types:
        raise ConfigError(f"{where}.types: expected a list of response types or a mapping {{type: fraction}}, got "
                          f"{cfg.types!r}")
    _answer_turns(cfg.short_answer_turns)
    try:
        check_paraphrase_fraction(cfg.short_answer_paraphrases)
    except ValueError as e:
        raise ConfigError(f"{where}.short_answer_paraphrases: {e}") from None
    fractions = type_fractions(cfg.types)
    unknown = [t for t in fractions if t not in RESPONSE_TYPES]
    if unknown:
        raise ConfigError(f"{where}.types: unknown response type(s) {unknown}; choose from {', '.join(RESPONSE_TYPES)}")
    bad = {t: f for t, f in fractions.items() if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0}
    if bad:
        raise ConfigError(f"{where}.types: samples per image must be positive numbers, got {bad}")
    bind(OpenAIConfig, cfg.openai, f"{where}.openai")


def _stage_name(value: str) -> str:
    for stage in STAGES:
        if value == stage.name or value in stage.aliases:
            return stage.name
    raise argparse.ArgumentTypeError(f"unknown stage {value!r}; stages: {', '.join(s.name for s in STAGES)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline run", description="Run every configured stage in order (scenes, generate, base, align, "
        "instruct, prefer, eval), skipping finished ones and resuming an interrupted one.",
        epilog="Reads: the run config and what its sections name (captions, images, shards, model directories). "
               "Writes: out_dir/config.yaml and one folder per stage under out_dir (its outputs, stage_config.yaml, "
               "STARTED.json, then DONE.json when it finished); the folder is locked while any rank runs.")
    parser.add_argument("--config", required=True, help="run config (YAML/JSON), e.g. configs/tiny-demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. instruct.train.lr=1e-4")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_stage", type=_stage_name, help="rerun this stage and every later one")
    which.add_argument("--only", type=_stage_name, help="rerun just this stage (earlier ones must have finished)")
    parser.add_argument("--nproc", type=int, help="ranks for the training stages (overrides the config's nproc)")
    args = parser.parse_intermixed_args(argv)
    try:
        config = bind(RunConfig, load_config(args.config, args.overrides), args.config)
        if args.nproc is not None:
            config.nproc = args.nproc
        validate_sections(config, args.config)
        for name in (args.from_stage, args.only):
            if name is not None and getattr(config, name) is None:
                raise ConfigError(f"{args.config}: --from/--only {name}: the config has no {name!r} section")
    except ConfigError as e:
        print(f"llava-pipeline run: {e}", file=sys.stderr)
        return 2
    out = Path(config.out_dir)
    text = dump_yaml(config)
    print(f"[run] resolved config ({args.config}{' + overrides' if args.overrides else ''}):\n{_indent(text)}",
          flush=True)
    started = time.perf_counter()
    try:
        # One runner per output folder, and it keeps the folder while any of its training ranks lives: a second
        # runner would interleave writes into the same stage folders (FolderInUse names the pids that hold it).
        with hold_folder(out):
            atomic_write_text(out / "config.yaml", text)
            run = Run(config, out, args.config, STAGES, nproc=config.nproc, log=lambda m: print(m, flush=True))
            results = run_stages(run, STAGES, from_stage=args.from_stage, only=args.only)
            if config.chat_example is not None and args.only in (None, "eval"):
                print_chat_example(run, bind(ChatExample, config.chat_example, "chat_example"))
    except (PipelineError, ConfigError, FolderInUse) as e:
        print(f"llava-pipeline run: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C; any training ranks are gone by now (stages.launch stops them first)
        print("llava-pipeline run: interrupted. The same command resumes: finished stages are skipped, training "
              "continues from its last checkpoint", file=sys.stderr)
        return 130
    print(f"[run] finished in {time.perf_counter() - started:.1f} s: " + ", ".join(results) + f" (outputs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
