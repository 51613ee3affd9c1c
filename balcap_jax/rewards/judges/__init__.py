"""Judge backends behind one protocol (`protocol.Judge`: async `generate(JudgeRequest) -> JudgeReply`).

  openai_compatible.py  vLLM / SGLang / hosted APIs over HTTP: retries, round-robin, concurrency, disk cache,
                        structured output (response_format)
  openai_pair.py        the (text, visual) judge pair from the run config or CLI flags, one shared cache
  wire_images.py        images as HTTP judges get them: downscaled, PNG/JPEG, prepared once per image
  jax_local.py          our own JAX models and sampler in-process (imports JAX; import it explicitly)
  scripted.py           deterministic rule-based answers to our prompts (tests, dry runs)
  response_cache.py     the SQLite response cache
"""

# config.rewards.judge.backend: who scores the captions (trainer/judges.py builds the components of each).
BACKENDS = ("shapes_world", "openai", "jax_local")  # shapes_world: rewards/shapes_world/, exact, no judge model
