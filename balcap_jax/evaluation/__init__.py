"""Evaluation harnesses behind `python -m balcap_jax.evaluate`: pure metric functions, judged protocols, a
resumable per-item results store and the report.

  dcscore.py            DCScore-style (DeCapBench): decompose -> match to oracle facts -> verify on the image
  captionqa.py          CaptionQA-style: multiple-choice questions answered from the caption alone
  caparena.py           CapArena-style: pairwise battles against baseline captions
  shapes_world_eval.py  ShapesWorld exact metrics (offline judge)
  judging.py            judges pair, majority votes; judge_setup.py: judges from the config; scripted_judge.py
  results_store.py      append-only per-item JSONL, resumable after kill -9
  runner.py             one protocol over captions (cached items skipped); report.py: results.json + summary.md
  captioning.py         greedy captions from a training workdir or an HF directory
  driver.py             the whole run; prompts/*.vN.txt: the judge prompts
"""
