"""Data: manifests -> array_record (tfds, no TensorFlow) -> grain batches; and the synthetic ShapesWorld.

  manifest.py            JSONL manifest schema, validation, skip tally
  tfds_builder.py        ManifestCaptions builder (array_record), open_split, prepare_manifest_dataset
  records.py             stored record -> CaptionExample | Skipped
  bucketing.py           length-bucketed, checkpointable batching (grain IterDataset) and collation
  pipeline.py            make_dataset: shuffle, host sharding, decode, preprocess, bucket; SkipCounter
  qwen_inputs.py         QwenCaptionProcessor: the pipeline's processor for Qwen2.5-VL prompts
  shapes_world.py        the procedural world: scenes, images, facts, references, questions
  shapes_world_grammar.py  the world's closed English: caption -> claims, grammar rules
  shapes_world_records.py  ShapesWorld as manifests (then built like any other dataset)
"""
