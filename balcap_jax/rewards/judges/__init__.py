"""Judge backends behind one protocol (`protocol.Judge`: async `generate(JudgeRequest) -> JudgeReply`).

  openai_compatible.py  vLLM / SGLang / hosted APIs over HTTP: retries, round-robin, concurrency, disk cache,
                        structured output (response_format)
  openai_pair.py        the (text, visual) judge pair from the run config or CLI flags, one shared cache
  wire_images.py        images as HTTP judges get them: downscaled, PNG/JPEG, prepared once per image
  jax_local.py          our own JAX models and sampler in-process (imports JAX; import it explicitly)
  scripted.py           deterministic rule-based answers to our prompts (tests, dry runs)
  shapes_world.py       exact reward components for the synthetic ShapesWorld (scene graphs, no judge model)
  response_cache.py     the SQLite response cache
"""
