"""The target model as files on disk: its shape from config.json alone, and the few weights the
trainer side needs (embedding, lm_head) read without loading the model. Below every role, so the
engine, the draft strategies and evaluation all read the target the same way."""
