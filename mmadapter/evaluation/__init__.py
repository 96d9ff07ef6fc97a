"""Benchmark evaluation over the composed model: ScienceQA's runner (`scienceqa`), answer parsing
(`parsing`), the official metrics (`metrics`) and result files with a resumable prediction log
(`results`). Prompts and scores come from the model itself (`MMAdapter.prompt_ids`,
`MMAdapter.last_token_logprobs`, `MMAdapter.generate`)."""
