"""Instruction-data generation: captions + boxes in, LLaVA instruction JSON out. Knows nothing about models.

Entry points (plain functions; `data_gen.cli` wraps them for `llava-pipeline scenes | coco | generate`):
- `data_gen.scenes.render_scenes(out_dir, num, seed, size, shards_per)`: synthetic images, captions JSONL, shards
- `data_gen.coco.import_coco(captions_json, instances_json, out_jsonl)`: COCO to captions JSONL
- `data_gen.driver.generate(input, out, backend="openai"|"offline", types=...)`: resumable instruction data
- `data_gen.vqa.make_question_file(captions_jsonl, out_jsonl, seed, per_image)`: eval questions with references
"""
