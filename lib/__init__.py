"""The machinery the entry points share: the command line (cli), the settings of a run (settings), its directory
(rundir) and checkpoints (checkpoints), the memory plan (memory), the Hugging Face format (hf), the tokenizer
(tokenizer), the prompts of the retrieval tests (prompts) and the evaluation loader (evaluation).

The method itself is at the top level: pose.py, rope.py, model.py, train.py."""
