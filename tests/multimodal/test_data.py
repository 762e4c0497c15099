"""Data: LLaVA JSON loading and its errors, image decoding, webdataset shards, collation, grouped batching."""
import io
import json
import random
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import tokenize_conversation
from llava.data.collate import Collator
from llava.data.errors import DataError
from llava.data.images import open_rgb
from llava.data.instruct import InstructDataset
from llava.data.pairs import PairDataset, items_from_folder, items_from_json, write_shards
from llava.data.sampler import ModalityLengthGroupedSampler, padding_waste
from llava.model.vision import ImageProcessor

PROCESSOR = ImageProcessor(32)
N_IMAGE_TOKENS = 16


def save_image(path, size=(24, 16), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def turns(question, answer, *more):
    values = [question, answer, *more]
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    for i in range(4):
        save_image(images / "coco" / f"{i}.png", seed=i)
    return tmp_path


def write_json(folder, entries):
    path = folder / "data.json"
    path.write_text(json.dumps(entries))
    return path


def dataset(folder, entries, **kwargs):
    return InstructDataset(write_json(folder, entries), kwargs.pop("tokenizer"), image_folder=folder / "images",
                           image_processor=PROCESSOR, num_image_tokens=N_IMAGE_TOKENS, **kwargs)


ENTRIES = [
    {"id": "a", "image": "coco/0.png", "conversations": turns("<image>\nWhat is it?", "A cat.")},
    {"id": "b", "image": "coco/1.png", "conversations": turns("What colour?\n<image>", "Blue.", "Sure?", "Yes.")},
    {"id": "c", "conversations": turns("Hello there", "Hi, how can I help?")},  # text only
    {"id": "d", "image": "coco/2.png", "conversations": turns("Describe the picture.", "Two dogs.")},  # no tag
]


def test_instruct_samples_match_the_tokenizer_and_images(folder, tokenizer):
    ds = dataset(folder, ENTRIES, tokenizer=tokenizer, template="vicuna_v1", lengths="exact")
    assert len(ds) == 4 and ds.has_image.tolist() == [True, True, False, True]
    for i, entry in enumerate(ENTRIES):
        sample = ds[i]
        conversations = entry["conversations"]
        if entry["id"] == "d":  # one image, no tag: "<image>\n" goes in front of the first question
            conversations = turns("<image>\nDescribe the picture.", "Two dogs.")
        ids, labels = tokenize_conversation(conversations, tokenizer, "vicuna_v1")
        assert sample["id"] == entry["id"] and sample["skipped"] == 0
        assert sample["input_ids"].tolist() == ids and sample["labels"].tolist() == labels
        assert len(sample["images"]) == ("image" in entry) and all(x.shape == (3, 32, 32) for x in sample["images"])
        assert ds.lengths[i] == len(ids) + len(sample["images"]) * (N_IMAGE_TOKENS - 1)
    expected = PROCESSOR(Image.open(folder / "images" / "coco" / "0.png").convert("RGB"))
    torch.testing.assert_close(ds[0]["images"][0], expected)


def test_estimated_lengths_track_exact_ones(folder, tokenizer):
    entries = [{"id": str(i), "conversations": turns("Question " * (i + 1), "Long answer words. " * (3 * i + 1))}
               for i in range(30)]
    exact = dataset(folder, entries, tokenizer=tokenizer, lengths="exact").lengths
    estimate = dataset(folder, entries, tokenizer=tokenizer).lengths
    assert np.abs(estimate - exact).max() <= 0.1 * exact.max()
    assert (np.argsort(estimate, kind="stable")[-5:] == np.argsort(exact, kind="stable")[-5:]).all()


@pytest.mark.parametrize("path", ["/etc/passwd", "../secret.png", "coco/../../secret.png", "C:\\x.png",
                                  "..\\secret.png"])
def test_image_paths_may_not_leave_the_folder(folder, tokenizer, path):
    entries = [ENTRIES[0], {"id": "evil", "image": path, "conversations": turns("<image>\nHi", "Hello.")}]
    with pytest.raises(DataError, match=r"data.json: entry 1 \(id 'evil'\): image path .*(absolute|'\.\.')"):
        dataset(folder, entries, tokenizer=tokenizer)
    ds = dataset(folder, entries, tokenizer=tokenizer, on_error="skip")
    assert (len(ds), ds.num_malformed) == (1, 1)


def test_symlinks_are_followed_only_inside_the_folder(folder, tokenizer):
    images = folder / "images"
    save_image(folder / "secret.png", seed=9)
    (images / "coco" / "alias.png").symlink_to("0.png")  # inside: fine
    (images / "escape.png").symlink_to(folder / "secret.png")  # outside: refused when read
    (folder / "linked").symlink_to(images, target_is_directory=True)  # the folder itself may be a link
    entries = [{"id": "alias", "image": "coco/alias.png", "conversations": turns("<image>\nQ", "A.")},
               {"id": "evil", "image": "escape.png", "conversations": turns("<image>\nQ", "A.")}]
    ds = InstructDataset(write_json(folder, entries), tokenizer, image_folder=folder / "linked",
                         image_processor=PROCESSOR, num_image_tokens=N_IMAGE_TOKENS)
    torch.testing.assert_close(ds[0]["images"][0], PROCESSOR(open_rgb(images / "coco" / "0.png")))
    with pytest.raises(DataError, match=r"entry 1 \(id 'evil'\): image path 'escape.png' resolves to .*secret.png, "
                                        r"outside the image folder"):
        ds[1]


@pytest.mark.parametrize("entry,message", [
    ("not an object", "entry 1: expected an object"),
    ({"id": "x", "image": "coco/0.png"}, "entry 1 \\(id 'x'\\): missing 'conversations'"),
    ({"id": "x", "conversations": turns("a", "b")[::-1]}, "turn 0 is from 'gpt'"),
    ({"id": "x", "conversations": turns("a", "b", "c")}, "no answer"),
    ({"id": "x", "image": "coco/0.png", "conversations": turns("<image><image> a", "b")},
     "2 <image> tags but 1 images"),
    ({"id": "x", "conversations": turns("<image>\na", "b")}, "1 <image> tags but 0 images"),
    ({"id": "x", "image": 7, "conversations": turns("a", "b")}, "'image' must be a path"),
    ({"id": "x", "conversations": [{"from": "human", "value": None}]}, "string values"),
])
def test_malformed_entries_stop_or_are_counted(folder, tokenizer, entry, message):
    entries = [ENTRIES[2], entry]
    with pytest.raises(DataError, match=message):
        dataset(folder, entries, tokenizer=tokenizer)
    ds = dataset(folder, entries, tokenizer=tokenizer, on_error="skip")
    assert (len(ds), ds.num_malformed) == (1, 1)


@pytest.mark.parametrize("content,message", [(None, "image file not found"), (b"not a png", "cannot decode")])
def test_bad_images_stop_or_are_replaced_and_counted(folder, tokenizer, content, message):
    if content is not None:
        (folder / "images" / "coco" / "bad.png").write_bytes(content)
    entries = [{"id": "bad", "image": "coco/bad.png", "conversations": turns("<image>\nWhat?", "A cat.")},
               *ENTRIES]
    ds = dataset(folder, entries, tokenizer=tokenizer)
    with pytest.raises(DataError, match=f"entry 0 \\(id 'bad'\\): .*coco/bad.png: {message}"):
        ds[0]
    ds = dataset(folder, entries, tokenizer=tokenizer, on_error="skip")
    sample = ds[0]
    assert sample["id"] == "a" and sample["skipped"] == 1  # the next sample with an image stands in
    assert len(sample["images"]) == 1
    assert Collator(tokenizer.pad_id)([sample, ds[3]])["num_skipped"] == 1


def test_a_run_of_missing_images_points_at_the_image_folder(folder, tokenizer):
    entries = [{"id": str(i), "image": f"missing/{i}.png", "conversations": turns("<image>\nQ", "A.")}
               for i in range(3)]
    ds = InstructDataset(write_json(folder, entries), tokenizer, image_folder=folder / "nowhere",
                         image_processor=PROCESSOR, on_error="skip")
    with pytest.raises(DataError, match="3 samples in a row failed .* is image_folder"):
        ds[1]


def test_bad_json_files_name_the_problem(folder, tokenizer):
    (folder / "broken.json").write_text('[{"id": 1,}]')
    with pytest.raises(DataError, match="broken.json: not valid JSON at line 1 column"):
        InstructDataset(folder / "broken.json", tokenizer)
    (folder / "object.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="top level must be a JSON list"):
        InstructDataset(folder / "object.json", tokenizer)
    with pytest.raises(DataError, match="pass image_folder and image_processor"):
        InstructDataset(write_json(folder, ENTRIES), tokenizer)


def test_any_image_mode_becomes_rgb(tmp_path):
    grey16 = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "i16.png")
    loaded = open_rgb(tmp_path / "i16.png")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB"
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    transparent.save(tmp_path / "rgba.png")
    transparent.convert("LA").save(tmp_path / "la.png")
    transparent.convert("P").save(tmp_path / "p.png", transparency=0)
    for name in ("rgba.png", "la.png", "p.png"):  # transparent pixels come out white, not black
        assert open_rgb(tmp_path / name).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_guard(folder, tokenizer):
    ds = dataset(folder, ENTRIES[:1], tokenizer=tokenizer, max_pixels=100)
    with pytest.raises(DataError, match="24x16 = 384 pixels is above max_pixels=100"):
        ds[0]


# ---- webdataset shards ---------------------------------------------------------------------------------------------

@pytest.fixture
def pairs_folder(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i in range(7):
        suffix = (".png", ".jpg", ".bmp")[i % 3]
        save_image(folder / f"img.{i}{suffix}", seed=i)  # dots in names: keys must not depend on them
        (folder / f"img.{i}.txt").write_text(f"A photo of thing {i}.\n")
    return folder


def captions_of(samples, tokenizer):
    out = {}
    for s in samples:
        supervised = [t for t, label in zip(s["input_ids"].tolist(), s["labels"].tolist()) if label != IGNORE_INDEX]
        assert s["input_ids"][:2].tolist() == [tokenizer.bos_id, IMAGE_TOKEN_INDEX]
        out[s["id"]] = tokenizer.decode(supervised)
    return out


def test_shards_round_trip_from_a_folder(tmp_path, pairs_folder, tokenizer):
    index = write_shards(items_from_folder(pairs_folder), tmp_path / "shards", shard_size=3)
    assert index["total"] == 7 and [s["count"] for s in index["shards"]] == [3, 3, 1]
    ds = PairDataset(tmp_path / "shards", tokenizer, PROCESSOR, shuffle_buffer=4)
    samples = list(ds)
    assert len(samples) == len(ds) == 7
    expected = {f"img.{i}{('.png', '.jpg', '.bmp')[i % 3]}": f"A photo of thing {i}.\n" for i in range(7)}
    assert captions_of(samples, tokenizer) == expected
    with tarfile.open(tmp_path / "shards" / "pairs-000000.tar") as tar:
        names = sorted(m.name for m in tar)
    assert {n.split(".", 1)[0] for n in names} == {"000000000", "000000001", "000000002"}  # ids live in the json
    assert {n.split(".", 1)[1] for n in names} <= {"png", "jpg", "txt", "json"}  # bmp re-encoded as png
    first = Image.open(io.BytesIO((pairs_folder / "img.1.jpg").read_bytes()))
    torch.testing.assert_close(samples[0]["images"][0].shape, PROCESSOR(first.convert("RGB")).shape)


def test_shards_command_line_and_shard_patterns(tmp_path, pairs_folder, tokenizer, capsys):
    from llava.data.pairs import shards_main

    assert shards_main(["--images", str(pairs_folder), "--out", str(tmp_path / "cli"), "--shard-size", "3"]) == 0
    assert "wrote 7 pairs in 3 shards" in capsys.readouterr().out
    pattern = str(tmp_path / "cli" / "pairs-{000000..000001}.tar")  # brace pattern, counts from the tar headers
    assert len(PairDataset(pattern, tokenizer, PROCESSOR)) == 6


def test_shards_from_llava_stage1_json_and_bad_items(tmp_path, pairs_folder, tokenizer):
    entries = [{"id": f"p{i}", "image": f"img.{i}.png",
                "conversations": turns("Describe the image briefly.\n<image>", f"Thing {i}.")} for i in (0, 3, 6)]
    entries.append({"id": "gone", "image": "missing.png", "conversations": turns("<image>", "x")})
    entries.append({"id": "escape", "image": "../x.png", "conversations": turns("<image>", "x")})
    (tmp_path / "stage1.json").write_text(json.dumps(entries))
    items = items_from_json(tmp_path / "stage1.json", pairs_folder)
    with pytest.raises(DataError, match="id 'gone'.*missing.png: image file not found"):
        write_shards(items, tmp_path / "stopped")
    index = write_shards(items, tmp_path / "shards", on_error="skip")
    assert (index["total"], index["skipped"]) == (3, 2)
    samples = list(PairDataset(tmp_path / "shards", tokenizer, PROCESSOR))
    assert captions_of(samples, tokenizer) == {f"p{i}": f"Thing {i}.\n" for i in (0, 3, 6)}


def test_every_rank_and_worker_yields_its_quota(tmp_path, pairs_folder, tokenizer):
    write_shards(items_from_folder(pairs_folder), tmp_path / "shards", shard_size=2)  # 4 shards: 2 2 2 1
    per_rank = []
    for rank in range(2):
        ds = PairDataset(tmp_path / "shards", tokenizer, PROCESSOR, rank=rank, world_size=2, seed=5)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        per_rank.append([s["id"] for s in loader])
    assert [len(ids) for ids in per_rank] == [3, 3]  # 7 // 2 each, whatever the shard sizes
    assert len(set(per_rank[0]) | set(per_rank[1])) >= 5
    ds = PairDataset(tmp_path / "shards", tokenizer, PROCESSOR, rank=0, world_size=1, seed=5)
    first, again = [s["id"] for s in ds], [s["id"] for s in ds]
    ds.set_epoch(1)
    assert first == again and sorted(first) == sorted(s["id"] for s in ds) and first != [s["id"] for s in ds]


def test_bad_shards_stop_or_are_skipped(tmp_path, tokenizer):
    shard = tmp_path / "raw" / "bad-000000.tar"
    shard.parent.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.png", png.getvalue()), ("k2.png", png.getvalue()), ("k2.txt", b"A caption.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="sample 'k1'.*needs a jpg or png image and a txt caption"):
        list(PairDataset(str(shard), tokenizer, PROCESSOR))
    samples = list(PairDataset(str(shard), tokenizer, PROCESSOR, on_error="skip"))
    # The quota (2, from the tar headers) is still met, by reading the shard again; skip events are counted.
    assert [s["id"] for s in samples] == ["k2", "k2"] and sum(s["skipped"] for s in samples) >= 1
    truncated = tmp_path / "raw" / "cut-000000.tar"
    truncated.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(DataError, match="cut-000000.tar"):
        list(PairDataset([str(truncated)], tokenizer, PROCESSOR))


def cut_at_member(shard, member_index):
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[member_index].offset
    shard.write_bytes(shard.read_bytes()[:offset])


def test_a_shard_cut_at_a_member_boundary_is_caught_by_its_recorded_count(tmp_path, pairs_folder, tokenizer):
    index = write_shards(items_from_folder(pairs_folder), tmp_path / "shards", shard_size=3)  # 3 3 1
    cut = tmp_path / "shards" / index["shards"][1]["file"]
    cut_at_member(cut, 3)  # 3 members per sample: one whole sample left of 3, a valid (shorter) tar
    message = re.escape(f"{cut}: holds 1 samples but index.json says 3: the file is truncated; copy it again")
    with pytest.raises(DataError, match=message):
        list(PairDataset(tmp_path / "shards", tokenizer, PROCESSOR))
    with pytest.raises(DataError, match=message):  # a list of the paths finds the index beside them too
        list(PairDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), tokenizer, PROCESSOR))
    samples = list(PairDataset(tmp_path / "shards", tokenizer, PROCESSOR, on_error="skip", shuffle_buffer=1))
    assert len(samples) == 7 and sum(s["skipped"] for s in samples) >= 2  # the two lost samples, not "a shard"
    (tmp_path / "shards" / "index.json").unlink()  # as data_gen.scenes writes them: no recorded count to check
    assert len(list(PairDataset(tmp_path / "shards", tokenizer, PROCESSOR))) == 5


def test_a_share_with_no_usable_sample_stops_instead_of_looping(tmp_path, tokenizer):
    shard = tmp_path / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("k1.png", b"not a png"), ("k1.txt", b"A caption.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"none of the 1 samples in its share .* could be used \(1 skipped\)"):
        list(PairDataset(str(shard), tokenizer, PROCESSOR, on_error="skip"))


# ---- collation and grouped batching ---------------------------------------------------------------------------------

def test_collator_pads_right_and_stacks_images_in_order(folder, tokenizer):
    ds = dataset(folder, ENTRIES, tokenizer=tokenizer)
    samples = [ds[2], ds[0], ds[1]]
    batch = Collator(tokenizer.pad_id)(samples)
    width = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == s["input_ids"].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
        assert set(batch["input_ids"][row, n:].tolist()) <= {tokenizer.pad_id}
    torch.testing.assert_close(batch["images"], torch.stack([ds[0]["images"][0], ds[1]["images"][0]]))
    assert batch["ids"] == ["c", "a", "b"]
    assert Collator(tokenizer.pad_id)([ds[2]])["images"] is None


def skewed_lengths(n, seed=0):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(60, 200), rng.randint(600, 900), rng.randint(1200, 2048)]) for _ in range(n)]
    has_image = [rng.random() < 0.7 for _ in range(n)]
    return lengths, has_image


def test_grouped_batches_are_single_modality_disjoint_and_deterministic():
    lengths, has_image = skewed_lengths(203)
    options = dict(batch_size=4, world_size=3, grad_accum=2, seed=7)
    ranks = [ModalityLengthGroupedSampler(lengths, has_image, rank=r, **options) for r in range(3)]
    per_rank = [s.batches() for s in ranks]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    assert all(len(batch) == 4 for batches in per_rank for batch in batches)
    assert [list(s) for s in ranks] == [[i for b in batches for i in b] for batches in per_rank]
    assert all(len(list(s)) == len(s) for s in ranks)
    for step in zip(*per_rank):
        modality = {has_image[i] for batch in step for i in batch}
        assert len(modality) == 1  # one modality per step, across ranks
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(203))  # everything, plus a few repeats that fill the last steps
    assert len(seen) - 203 < 2 * 4 * 3
    again = ModalityLengthGroupedSampler(lengths, has_image, rank=0, **options)
    assert again.batches() == per_rank[0]
    again.set_epoch(1)
    assert again.batches() != per_rank[0]


def test_one_modality_works_and_signed_lengths_follow_llava():
    sampler = ModalityLengthGroupedSampler([5, 9, 3, 7, 1], batch_size=2)
    seen = [i for b in sampler.batches() for i in b]
    assert set(seen) == {0, 1, 2, 3, 4} and len(seen) == 6  # one repeat fills the last batch
    signed = ModalityLengthGroupedSampler.from_signed_lengths([5, -9, 3, -7, 1, -2], batch_size=1)
    assert signed.has_image == [True, False, True, False, True, False] and signed.lengths == [5, 9, 3, 7, 1, 2]
    text_only = ModalityLengthGroupedSampler([4, 4, 4], [False] * 3, batch_size=2)
    assert len(text_only.batches()) == 2


def test_grouping_cuts_padding_waste():
    lengths, has_image = skewed_lengths(4096)
    rng = random.Random(1)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_waste = padding_waste(lengths, [order[i:i + 16] for i in range(0, len(order), 16)])
    for world_size in (1, 8):
        grouped = ModalityLengthGroupedSampler(lengths, has_image, batch_size=16, world_size=world_size, seed=1)
        grouped_waste = padding_waste(lengths, [b for step in grouped.global_batches() for b in step])
        assert grouped_waste <= 0.05 < 0.3 < random_waste
    llava = ModalityLengthGroupedSampler(lengths, has_image, batch_size=16, world_size=1, group_batches=1, seed=1)
    assert padding_waste(lengths, llava.batches()) > 0.3  # a one-step mega-batch on one GPU groups nothing


def test_group_batches_1_is_llavas_megabatch_of_one_optimizer_step():
    lengths, _ = skewed_lengths(96, seed=3)
    has_image = [i % 2 == 0 for i in range(96)]  # 48 + 48: whole mega-batches of 12 only
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=2, world_size=2, grad_accum=3,
                                           group_batches=1, seed=0)
    steps = sampler.global_batches()
    assert len(steps) == 24
    for k in range(0, len(steps), 3):  # every 3 steps (one optimizer step) form one sorted mega-batch of 12
        megabatch = [i for step in steps[k:k + 3] for batch in step for i in batch]
        assert [lengths[i] for i in megabatch] == sorted((lengths[i] for i in megabatch), reverse=True)
        assert len({has_image[i] for i in megabatch}) == 1
