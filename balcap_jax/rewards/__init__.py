"""Rewards: K components scoring P x G captions -> `rewards[P, G, K]` (NaN = unscorable), judged by LLMs/VLMs.

  types.py            RewardItem, ComponentScore, RewardComponent (the contract)
  precision.py        claims -> visual verification with pointability -> fraction credited
  recall.py           reference claims (decomposed once per image) -> coverage by the caption -> fraction
  linguistic.py       clarity, fluency, coherence -> mean -> [0, 1]
  caprl_qa.py         CapRL QA utility: multiple-choice questions answered from the caption alone
  manager.py          RewardManager: all components concurrently, metrics, futures for overlap
  score.py            `python -m balcap_jax.rewards.score`: score a captions JSONL for debugging
  claims.py, structured_call.py, json_output.py, prompt_templates.py, prompts/*.vN.txt: shared machinery
  judges/             protocol, openai_compatible (HTTP), jax_local (in-process), scripted, shapes_world
"""
